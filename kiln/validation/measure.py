"""Validate one engine dir end to end: load it and its baseline, measure accuracy and speed, write the JSON.

This is what the build's ``validate`` task runs per recipe x target. It reads the engine's limits and
device from its ``kiln-engine.json``, so the windows, prompts and concurrency levels always fit what
the engine was built for.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kiln.engine import manifest as engine_manifest
from kiln.engine.base import Engine, get_backend
from kiln.engine.manifest import EngineManifest
from kiln.errors import CalibrationDataError
from kiln.profiles import BuildLimits, Evaluation
from kiln.validation.accuracy import evaluate_accuracy, prompts_from
from kiln.validation.perf import decode_cost_from_dir, measure_performance, sweep_settings
from kiln.validation.results import build_document, flat_metrics, validate_document

RESULT_FILE = "validation.json"
LATENCY_PLOT = "latency_vs_throughput.png"


def heldout_token_ids(heldout: Any) -> tuple[list[list[int]], dict[str, Any]]:
    """Token ids and provenance of a ``TokenSet`` (or its JSON form, as it crosses deployment runs)."""
    if isinstance(heldout, dict):
        ids, sha, source = heldout.get("token_ids"), heldout.get("sha256"), heldout.get("source")
    elif hasattr(heldout, "token_ids"):
        ids, sha, source = (
            heldout.token_ids,
            getattr(heldout, "sha256", None),
            getattr(heldout, "source", None),
        )
    else:
        ids, sha, source = heldout, None, None
    if not ids or not all(isinstance(seq, Sequence) for seq in ids):
        raise CalibrationDataError(
            "held-out set is empty or not a list of token-id lists: check evaluation.heldout "
            "and evaluation.heldout_tokens in the profile"
        )
    token_ids = [list(map(int, seq)) for seq in ids]
    info = {
        "sha256": sha,
        "source": source,
        "num_sequences": len(token_ids),
        "num_tokens": sum(len(s) for s in token_ids),
    }
    return token_ids, info


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@contextmanager
def _progress(description: str) -> Iterator[Progress]:
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        yield progress


def load_engine(engine_dir: Path, manifest: EngineManifest) -> Engine:
    return get_backend(manifest.backend).load(Path(engine_dir))


def _task_evals(
    engine: Engine, engine_dir: Path, evaluation: Evaluation, limits: BuildLimits
) -> dict[str, Any]:
    """lm-eval tasks of ``evaluation.tasks`` on the engine; skipped ones are said on the console too."""
    if not evaluation.tasks:
        return {}
    from kiln.validation.lm_eval_tasks import run_tasks

    with _progress("tasks") as progress:
        progress.add_task(f"lm-eval tasks {engine_dir.name}", total=None)
        evals = run_tasks(
            engine,
            engine_dir,
            evaluation,
            max_seq_len=limits.max_seq_len,
            max_input_len=limits.max_input_len,
            batch_size=limits.max_batch_size,
        )
    console = Console(stderr=True)
    for key, result in evals.items():
        if result.status != "ran":
            console.print(f"[yellow]task {key} {result.status}[/]: {result.reason}", highlight=False)
    return {key: result.to_dict() for key, result in evals.items()}


def measure_engine(
    engine_dir: Path,
    baseline_dir: Path,
    heldout: Any,
    evaluation: Evaluation,
    *,
    output_dir: Path | None = None,
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Accuracy vs the baseline engine and the performance sweep of ``engine_dir``.

    Returns the flat metrics and ``{"validation.json": document}`` (schema-checked); with ``output_dir``
    the document and the latency-vs-throughput plot are written there too.
    """
    started = time.perf_counter()
    engine_dir, baseline_dir = Path(engine_dir), Path(baseline_dir)
    token_ids, heldout_info = heldout_token_ids(heldout)
    manifest = engine_manifest.read(engine_dir)
    same = baseline_dir.resolve() == engine_dir.resolve()
    base_manifest = manifest if same else engine_manifest.read(baseline_dir)
    limits, base_limits = manifest.limits, base_manifest.limits
    engine = load_engine(engine_dir, manifest)
    baseline = engine if same else load_engine(baseline_dir, base_manifest)
    try:
        loaded = time.perf_counter()
        window = min(limits.max_seq_len, base_limits.max_seq_len)
        gen_len = evaluation.max_new_tokens
        perf_requests, perf_gen_len = sweep_settings(evaluation, manifest.device)
        prompt_len = min(
            evaluation.prompt_len,
            limits.max_input_len,
            base_limits.max_input_len,
            window - max(gen_len, perf_gen_len),
        )
        if prompt_len < 1:
            raise CalibrationDataError(
                f"evaluation.max_new_tokens ({gen_len}) / perf_max_new_tokens ({perf_gen_len}) "
                f"leave no room for a prompt in the engine's max_seq_len ({window}); lower "
                f"them below {window}"
            )
        prompts = prompts_from(token_ids, evaluation.prompts, prompt_len)
        task_evals = _task_evals(engine, engine_dir, evaluation, limits)
        measured_tasks = time.perf_counter()
        with _progress("accuracy") as progress:
            task = progress.add_task(f"accuracy {engine_dir.name}", total=None)
            accuracy = evaluate_accuracy(
                engine,
                baseline,
                token_ids,
                window=window,
                prompts=prompts,
                max_new_tokens=gen_len,
                batch_size=min(limits.max_batch_size, base_limits.max_batch_size),
                task_evals=task_evals,
                on_window=lambda done, total: progress.update(task, completed=done, total=total),
            )
        measured_accuracy = time.perf_counter()
        with _progress("performance") as progress:
            task = progress.add_task(f"perf {engine_dir.name}", total=len(set(evaluation.concurrency)))
            perf = measure_performance(
                engine,
                evaluation,
                prompt_len=prompt_len,
                gen_len=perf_gen_len,
                seed=seed,
                device=manifest.device,
                vocab_size=None,
                max_batch_size=limits.max_batch_size,
                decode_cost=decode_cost_from_dir(engine_dir),
                min_requests=perf_requests,
                on_level=lambda _c: progress.advance(task),
            )
        finished = time.perf_counter()
    finally:
        engine.close()
        if baseline is not engine:
            baseline.close()
    size = dir_size(engine_dir)
    document = build_document(
        engine={
            "engine_dir": str(engine_dir),
            "backend": manifest.backend,
            "device": manifest.device,
            "size_bytes": size,
            "manifest": manifest.to_dict(),
        },
        baseline={
            "engine_dir": str(baseline_dir),
            "backend": base_manifest.backend,
            "device": base_manifest.device,
            "size_bytes": dir_size(baseline_dir),
        },
        heldout=heldout_info,
        accuracy=accuracy,
        perf=perf,
        timings_s={
            "load": loaded - started,
            "tasks": measured_tasks - loaded,
            "accuracy": measured_accuracy - measured_tasks,
            "performance": finished - measured_accuracy,
            "total": finished - started,
        },
    )
    validate_document(document)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULT_FILE).write_text(json.dumps(document, indent=2))
        from kiln.validation import plots  # matplotlib only where a plot is drawn (not for `kiln bench`)

        plots.latency_throughput({engine_dir.name: document["performance"]}, output_dir / LATENCY_PLOT)
    return flat_metrics(accuracy, perf, size), {RESULT_FILE: document}
