"""The build report: one row per recipe x target with accuracy, speed, size, gate verdict, recommendation.

The same rows render as markdown (the Prefect artifact), as a rich table (``kiln report``) and as
``KILN_HOME/reports/<build>/results.json`` next to the PNG plots, so every view shows the same numbers.
Rows come from the build's outcomes (any object or mapping with ``recipe``, ``target``, ``status``,
``verdict``, ``metrics``, ``recommended``...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.table import Table

from kiln import constants
from kiln.errors import KilnInputError, writing
from kiln.validation import plots
from kiln.validation.gates import recommend

RESULTS_SCHEMA = "kiln.build-results/1"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PARETO_PLOT = "pareto.png"


class ReportRow(BaseModel):
    """One engine of the build; ``passed`` is None when it was skipped (never validated)."""

    model_config = ConfigDict(from_attributes=True, extra="ignore")

    recipe: str
    target: str
    status: str = "validated"
    verdict: str = ""
    passed: bool | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    recommended: bool = False
    model_name: str | None = None
    version: str | None = None
    uri: str | None = None
    task_notes: dict[str, str] = Field(default_factory=dict)
    """lm-eval tasks that did not run on this engine, with why (``skipped: lm-eval is not installed ...``)."""

    @model_validator(mode="after")
    def _derive_passed(self) -> ReportRow:
        if self.passed is None and self.status != "skipped":
            self.passed = self.verdict.startswith("pass") if self.verdict else self.status == "registered"
        return self


class BuildResults(BaseModel):
    """Everything ``kiln report`` shows for one build (``results.json``)."""

    model_config = ConfigDict(populate_by_name=True)

    schema_id: Literal["kiln.build-results/1"] = Field(RESULTS_SCHEMA, alias="schema")
    build: str
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    model: str | None = None
    select: Literal["fastest", "smallest"] = "fastest"
    rows: list[ReportRow]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def rows_from(outcomes: Iterable[Any]) -> list[ReportRow]:
    """Report rows from the build's outcomes (dataclasses, pydantic models or mappings)."""
    return [ReportRow.model_validate(o, from_attributes=not isinstance(o, Mapping)) for o in outcomes]


def mark_recommended(rows: Sequence[ReportRow], select: Literal["fastest", "smallest"]) -> list[ReportRow]:
    """Per target, the passing row ``recommend`` picks gets ``recommended=True``; every other row False."""
    best = {}
    for target in dict.fromkeys(r.target for r in rows):
        best[target] = recommend(
            {r.recipe: r.metrics for r in rows if r.target == target and r.passed}, select
        )
    return [r.model_copy(update={"recommended": best[r.target] == r.recipe}) for r in rows]


def _num(metrics: Mapping[str, float], key: str, fmt: str, scale: float = 1.0) -> str:
    value = metrics.get(key)
    return "-" if value is None else format(value * scale, fmt)


_COLUMNS: tuple[tuple[str, str, str, float], ...] = (
    # header, metric, format, scale
    ("ppl", "perplexity", ".3f", 1.0),
    ("Δppl %", "ppl_increase_pct", "+.2f", 1.0),
    ("KL", "kl_divergence", ".4f", 1.0),
    ("top-1", "top1_agreement", ".3f", 1.0),
    ("greedy", "greedy_prefix_match", ".2f", 1.0),
    ("tok/s", "tokens_per_s", ".1f", 1.0),
    ("TTFT p90 ms", "ttft_p90_ms", ".1f", 1.0),
    ("size MiB", "size_bytes", ".1f", 1 / 2**20),
)


def _verdict(row: ReportRow) -> str:
    if row.status == "skipped":
        return row.verdict or "skipped"
    return "pass" if row.passed else "FAIL"


def _version(row: ReportRow) -> str:
    return f"{row.model_name} v{row.version}" if row.version else "-"


def markdown(results: BuildResults) -> str:
    """The report as markdown (what the build's Prefect artifact shows); failing gates listed with their
    numbers."""
    header = ["recipe", "target", *[c[0] for c in _COLUMNS], "verdict", "version"]
    lines = [f"# kiln build `{results.build}`", ""]
    if results.model:
        lines += [f"model `{results.model}`", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results.rows:
        cells = [
            row.recipe + (" ★" if row.recommended else ""),
            row.target,
            *[_num(row.metrics, metric, fmt, scale) for _, metric, fmt, scale in _COLUMNS],
            _verdict(row),
            _version(row),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += [
        "",
        f"★ recommended for its target: the {results.select} engine among those that pass every gate.",
    ]
    failed = [r for r in results.rows if r.passed is False]
    if failed:
        lines += ["", "## Gate failures (not registered)", ""]
        for row in failed:
            reasons = re.sub(r"^fail:\s*", "", row.verdict).split("; ") if row.verdict else ["failed"]
            lines += [f"- **{row.recipe} x {row.target}**"] + [f"  - {reason}" for reason in reasons]
    lines += task_lines(results)
    skipped = [r for r in results.rows if r.status == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""] + [
            f"- {r.recipe} x {r.target}: {r.verdict or 'skipped'}" for r in skipped
        ]
    return "\n".join(lines) + "\n"


def task_lines(results: BuildResults) -> list[str]:
    """A markdown section of the lm-eval task scores (``task_*`` metrics) and the tasks that did not run."""
    body = []
    for row in results.rows:
        scores = ", ".join(
            f"{k.removeprefix('task_')} {v:.4g}"
            for k, v in sorted(row.metrics.items())
            if k.startswith("task_")
        )
        notes = [f"{task}: {note}" for task, note in sorted(row.task_notes.items())]
        if scores or notes:
            body.append(
                f"- **{row.recipe} x {row.target}**: " + "; ".join(([scores] if scores else []) + notes)
            )
    return ["", "## Task evals (lm-eval)", "", *body] if body else []


def rich_table(results: BuildResults) -> Table:
    """The same table for the terminal (``kiln report``)."""
    table = Table(
        title=f"kiln build {results.build}" + (f" — {results.model}" if results.model else ""),
        caption=f"★ recommended ({results.select} passing engine per target)",
    )
    table.add_column("recipe")
    table.add_column("target")
    for title, *_ in _COLUMNS:
        table.add_column(title, justify="right")
    table.add_column("verdict")
    table.add_column("version")
    for row in results.rows:
        style = {True: "green", False: "red"}.get(row.passed, "dim")
        verdict = _verdict(row)  # failing gates are listed under the table, with their numbers
        table.add_row(
            row.recipe + (" ★" if row.recommended else ""),
            row.target,
            *[_num(row.metrics, metric, fmt, scale) for _, metric, fmt, scale in _COLUMNS],
            f"[{style}]{verdict}[/]",
            _version(row),
        )
    return table


def failure_lines(results: BuildResults) -> list[str]:
    """``recipe x target: gate reason`` for each failing row (what ``kiln report`` prints under the table)."""
    lines = []
    for row in results.rows:
        if row.passed is False:
            reasons = re.sub(r"^fail:\s*", "", row.verdict).split("; ") if row.verdict else ["failed"]
            lines += [f"{row.recipe} x {row.target}: {reason}" for reason in reasons]
    return lines


def curve_from_metrics(metrics: Mapping[str, float]) -> dict[str, Any]:
    """A concurrency sweep rebuilt from flat metrics (``tokens_per_s_c4``, ``itl_p50_ms_c4``...) for
    plotting."""
    levels = sorted(int(k.rsplit("_c", 1)[1]) for k in metrics if re.fullmatch(r"tokens_per_s_c\d+", k))
    points = []
    for c in levels:
        itl = {"p50": metrics[f"itl_p50_ms_c{c}"]} if f"itl_p50_ms_c{c}" in metrics else None
        ttft = {"p90": metrics[f"ttft_p90_ms_c{c}"]} if f"ttft_p90_ms_c{c}" in metrics else None
        points.append(
            {
                "concurrency": c,
                "output_tokens_per_s": metrics[f"tokens_per_s_c{c}"],
                "itl_ms": itl,
                "ttft_ms": ttft,
            }
        )
    return {"points": points}


def report_dir(build: str) -> Path:
    return constants.kiln_home() / "reports" / build


@dataclass(frozen=True)
class WrittenReport:
    """What :func:`write_report` produced: the markdown (for the Prefect artifact) and the files."""

    markdown: str
    results_path: Path
    plots: list[Path] = field(default_factory=list)


def write_report(results: BuildResults, output_dir: Path | None = None) -> WrittenReport:
    """Write ``results.json``, ``report.md`` and the plots (Pareto, latency vs throughput per target)."""
    out = Path(output_dir) if output_dir else report_dir(results.build)
    with writing("report", out):
        return _write_report(results, out)


def _write_report(results: BuildResults, out: Path) -> WrittenReport:
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out / REPORT_FILE).write_text(text)
    results_path = out / RESULTS_FILE
    results_path.write_text(results.to_json())
    rows = [r.model_dump() for r in results.rows if r.metrics]
    written = [
        plots.accuracy_pareto(rows, out / PARETO_PLOT, title=f"{results.build}: perplexity vs size and speed")
    ]
    for target in dict.fromkeys(r.target for r in results.rows):
        curves = {
            r.recipe: curve_from_metrics(r.metrics) for r in results.rows if r.target == target and r.metrics
        }
        if any(c["points"] for c in curves.values()):
            name = f"latency_vs_throughput-{target}.png"
            written.append(plots.latency_throughput(curves, out / name, title=f"{results.build} on {target}"))
    return WrittenReport(text, results_path, written)


def load_results(build_or_path: str | Path) -> BuildResults:
    """A build's results by name (under ``KILN_HOME/reports``) or from a ``results.json`` path."""
    candidate = Path(build_or_path)
    if candidate.suffix != ".json" and not re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", str(build_or_path)
    ):
        raise KilnInputError(
            f"{str(build_or_path)!r} is neither a build name (letters, digits, _ . -) nor a "
            "results .json file"
        )
    path = candidate if candidate.suffix == ".json" else report_dir(str(build_or_path)) / RESULTS_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in (constants.kiln_home() / "reports").glob(f"*/{RESULTS_FILE}"))
        raise KilnInputError(
            f"no build results at {path}; known builds under {constants.kiln_home() / 'reports'}: "
            f"{', '.join(known) or 'none'} (run `kiln build` first, or pass a results.json path)"
        )
    try:
        return BuildResults.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise KilnInputError(f"{path}: not a kiln build results file ({RESULTS_SCHEMA}): {exc}") from None


def latest_build() -> str | None:
    """The build whose results were written last, for ``kiln report`` without arguments."""
    found = sorted(
        (constants.kiln_home() / "reports").glob(f"*/{RESULTS_FILE}"), key=lambda p: p.stat().st_mtime
    )
    return found[-1].parent.name if found else None


REPORT_RUN_TAG = "kiln.build_report"


def log_to_mlflow(written: WrittenReport, results: BuildResults, tracking_uri: str, model: str) -> str:
    """Log the report (markdown, results.json, plots) and per-row metrics to one MLflow run per build.

    The run lives in the model's experiment (next to the engines' runs), named and tagged after the build;
    a rerun of the same build logs into the same run. Returns its run id.
    """
    from kiln.registry import mlflow_registry as R

    client = R.client(tracking_uri)
    with R.mlflow_errors(tracking_uri, f"log report {results.build}"):
        experiment_id = R.ensure_experiment(client, tracking_uri, model)
        runs = client.search_runs(
            [experiment_id], f"tags.`{REPORT_RUN_TAG}` = '{results.build}'", max_results=1
        )
        run_id = (
            runs[0].info.run_id
            if runs
            else client.create_run(
                experiment_id,
                run_name=f"report.{results.build}",
                tags={REPORT_RUN_TAG: results.build, "kiln.model": model},
            ).info.run_id
        )
        for row in results.rows:
            client.set_tag(run_id, f"kiln.verdict.{row.recipe}.{row.target}", _verdict(row))
            task_keys = sorted(k for k in row.metrics if k.startswith("task_"))
            for key in (
                "perplexity",
                "ppl_increase_pct",
                "top1_agreement",
                "tokens_per_s",
                "size_bytes",
                *task_keys,
            ):
                if key in row.metrics:
                    client.log_metric(run_id, f"{row.recipe}.{row.target}.{key}", row.metrics[key])
        out = written.results_path.parent
        for path in [out / REPORT_FILE, written.results_path, *written.plots]:
            client.log_artifact(run_id, str(path), "report")
        client.set_terminated(run_id, "FINISHED")  # a report run is complete once logged, not left RUNNING
    return run_id
