"""Gate verdicts: which thresholds of a profile's ``gates:`` an engine missed, and by how much.

A gate that is set but whose metric was not measured fails: an engine is only a candidate when every
gate the profile asks for was checked and met. Gates are decided from flat metrics, so a cached
measurement can be re-judged against tightened gates without re-measuring.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

from kiln.profiles import Gates
from kiln.validation.accuracy import AccuracyResult
from kiln.validation.lm_eval_tasks import metric_name
from kiln.validation.perf import PerfResult
from kiln.validation.results import flat_metrics


@dataclass(frozen=True)
class GateSpec:
    """The metric a gate reads and which side of the threshold passes."""

    metric: str
    bound: Literal["max", "min"]
    unit: str
    accuracy: bool


GATES: dict[str, GateSpec] = {
    "max_ppl_increase_pct": GateSpec("ppl_increase_pct", "max", "%", accuracy=True),
    "min_top1_agreement": GateSpec("top1_agreement", "min", "", accuracy=True),
    "max_kl_divergence": GateSpec("kl_divergence", "max", "nats", accuracy=True),
    "min_tokens_per_s": GateSpec("tokens_per_s", "min", "tok/s", accuracy=False),
    "max_ttft_p90_ms": GateSpec("ttft_p90_ms", "max", "ms", accuracy=False),
    "min_task_score": GateSpec("task_<task>_<metric>", "min", "", accuracy=True),
}
"""Every field of :class:`kiln.profiles.Gates`. ``tokens_per_s`` is the peak output rate over the
concurrency sweep; ``ttft_p90_ms`` is p90 time to first token at the sweep's lowest concurrency;
``min_task_score`` maps ``TASK/METRIC`` to a minimum lm-eval score (a skipped task was not measured: it
fails)."""


@dataclass(frozen=True)
class GateFailure:
    """One missed gate; ``margin`` is how far past the threshold (in its unit), None if not measured."""

    gate: str
    metric: str
    threshold: float
    observed: float | None
    margin: float | None

    def __str__(self) -> str:
        spec = GATES[self.gate]
        unit = f" {spec.unit}" if spec.unit else ""
        if self.observed is None:
            return f"{self.gate}: {self.metric} was not measured (threshold {self.threshold:g}{unit})"
        op, word = (">", "over") if spec.bound == "max" else ("<", "short")
        return (
            f"{self.gate}: {self.metric} {self.observed:.4g}{unit} {op} {self.threshold:g}{unit} "
            f"({word} by {self.margin:.3g}{unit})"
        )


@dataclass(frozen=True)
class GateVerdict:
    """``passed`` only when no checked gate failed; ``checked`` maps each set gate to its threshold."""

    passed: bool
    failures: list[GateFailure] = field(default_factory=list)
    checked: dict[str, float] = field(default_factory=dict)

    @property
    def messages(self) -> list[str]:
        """One human-readable line per failure (what reports and Prefect states show)."""
        return [str(failure) for failure in self.failures]

    @property
    def accuracy_passed(self) -> bool:
        """Whether every accuracy gate passed (the speed gates may still have failed)."""
        return not any(GATES[f.gate].accuracy for f in self.failures)

    def to_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "accuracy_passed": self.accuracy_passed,
            "checked": dict(self.checked),
            "failures": [{**asdict(f), "message": str(f)} for f in self.failures],
        }


def decide(
    gates: Gates, accuracy: AccuracyResult | Mapping[str, float], perf: PerfResult | None = None
) -> GateVerdict:
    """Check every set gate against the measured metrics (an AccuracyResult + PerfResult, or flat metrics)."""
    metrics = accuracy if isinstance(accuracy, Mapping) else flat_metrics(accuracy, perf)
    failures, checked = [], {}
    thresholds = [
        (gate, spec.metric, getattr(gates, gate)) for gate, spec in GATES.items() if gate != "min_task_score"
    ]
    thresholds += [
        ("min_task_score", metric_name(*key.split("/", 1)), value)
        for key, value in (gates.min_task_score or {}).items()
    ]
    for gate, metric, threshold in thresholds:
        spec = GATES[gate]
        if threshold is None:
            continue
        checked[gate if gate != "min_task_score" else metric] = float(threshold)
        observed = metrics.get(metric)
        if observed is None or (isinstance(observed, float) and math.isnan(observed)):
            failures.append(GateFailure(gate, metric, float(threshold), None, None))
            continue
        margin = observed - threshold if spec.bound == "max" else threshold - observed
        if margin > 0:
            failures.append(GateFailure(gate, metric, float(threshold), float(observed), float(margin)))
    return GateVerdict(passed=not failures, failures=failures, checked=checked)


def recommend(
    candidates: Mapping[str, Mapping[str, float]], select: Literal["fastest", "smallest"]
) -> str | None:
    """The recommended name among ``candidates`` (name -> flat metrics of engines that passed their gates).

    ``fastest``: highest ``tokens_per_s`` (ties: smaller ``size_bytes``); ``smallest``: lowest
    ``size_bytes`` (ties: faster). None when there is no candidate or none has the deciding metric.
    """
    primary, secondary = (
        ("tokens_per_s", "size_bytes") if select == "fastest" else ("size_bytes", "tokens_per_s")
    )
    sign = {"tokens_per_s": -1.0, "size_bytes": 1.0}
    ranked = [
        (sign[primary] * m[primary], sign[secondary] * m.get(secondary, math.inf * sign[secondary]), name)
        for name, m in candidates.items()
        if m.get(primary) is not None
    ]
    return min(ranked)[2] if ranked else None
