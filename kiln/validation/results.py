"""The validation result document (JSON, with a JSON Schema in ``kiln/schemas``) and its flat metrics.

The document is what gets stored next to an engine (MLflow artifact, step cache); the flat metrics
(``perplexity``, ``tokens_per_s``, ``ttft_p90_ms_c4``, ``task_hellaswag_acc`` ...) are what gates, MLflow
metrics and the report table read.
"""

from __future__ import annotations

import functools
import json
import math
import platform
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import jsonschema
import torch

from kiln.validation.accuracy import AccuracyResult
from kiln.validation.lm_eval_tasks import task_metrics
from kiln.validation.perf import PerfResult

SCHEMA_ID = "kiln.validation-result/1"
SCHEMA_FILE = "validation-result.schema.json"

_ACCURACY_METRICS = (
    "perplexity",
    "baseline_perplexity",
    "ppl_increase_pct",
    "kl_divergence",
    "kl_divergence_p99",
    "top1_agreement",
    "greedy_exact_match",
    "greedy_prefix_match",
)


def flat_metrics(
    accuracy: AccuracyResult | None, perf: PerfResult | None, size_bytes: int | None = None
) -> dict[str, float]:
    """Every finite number worth a metric, under stable names; per-concurrency ones end in ``_c{N}``."""
    metrics: dict[str, float] = {}
    if accuracy is not None:
        metrics.update({name: getattr(accuracy, name) for name in _ACCURACY_METRICS})
        metrics.update(task_metrics(accuracy.task_evals))
    if perf is not None:
        metrics["tokens_per_s"] = perf.best_tokens_per_s
        metrics["ttft_p90_ms"] = perf.ttft_p90_ms
        metrics["peak_memory_bytes"] = perf.peak_memory_bytes
        metrics["roofline_pct"] = max(
            (p.roofline_pct for p in perf.points if p.roofline_pct is not None), default=None
        )
        for p in perf.points:
            c = p.concurrency
            metrics[f"tokens_per_s_c{c}"] = p.output_tokens_per_s
            metrics[f"requests_per_s_c{c}"] = p.requests_per_s
            metrics[f"roofline_pct_c{c}"] = p.roofline_pct
            for kind, stats in (("ttft", p.ttft_ms), ("itl", p.itl_ms)):
                for q in ("p50", "p90", "p99"):
                    metrics[f"{kind}_{q}_ms_c{c}"] = getattr(stats, q) if stats else None
    if size_bytes is not None:
        metrics["size_bytes"] = size_bytes
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def environment() -> dict[str, Any]:
    """Where the numbers were taken: they only compare between equal environments."""
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cuda_device": cuda,
    }


def build_document(
    *,
    engine: dict[str, Any],
    baseline: dict[str, Any],
    heldout: dict[str, Any],
    accuracy: AccuracyResult | None,
    perf: PerfResult | None,
    timings_s: dict[str, float],
    verdict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The validation result of one engine as a JSON-ready dict that conforms to the schema."""
    document = {
        "schema": SCHEMA_ID,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "baseline": baseline,
        "heldout": heldout,
        "accuracy": _finite(accuracy.to_dict()) if accuracy else None,
        "performance": _finite(perf.to_dict()) if perf else None,
        "metrics": flat_metrics(accuracy, perf, engine.get("size_bytes")),
        "environment": environment(),
        "timings_s": timings_s,
    }
    if verdict is not None:
        document["gates"] = verdict
    return document


def _finite(value: Any) -> Any:
    """NaN/inf become null: they are not JSON, and a reader should see 'not measured', not a parse error."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of the validation result document (``kiln/schemas/validation-result.schema.json``)."""
    return json.loads(resources.files("kiln").joinpath("schemas", SCHEMA_FILE).read_text())


def validate_document(document: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` (naming the failing path) if ``document`` breaks the schema."""
    jsonschema.validate(document, schema(), format_checker=jsonschema.FormatChecker())
