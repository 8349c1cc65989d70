"""Optional task evals through lm-eval-harness (``evaluation.tasks``), run on one engine.

lm-eval is an optional extra (``pip install 'kiln-llm[eval]'``). When it is missing, or a task's data
cannot be loaded here (``HF_DATASETS_OFFLINE=1`` and nothing cached, no network), the task is recorded
as ``skipped`` with the reason: a build never fails on an optional eval and never reports a made-up number.
A task YAML's relative ``dataset_kwargs.data_files`` resolve against the YAML's folder.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kiln.constants import TOKENIZER_CONFIG
from kiln.engine.base import Engine
from kiln.host import package_version
from kiln.profiles import Evaluation, is_task_yaml

LM_EVAL_MISSING = "lm-eval is not installed: pip install 'kiln-llm[eval]'"
NO_TOKENIZER = "the engine dir has no tokenizer files (tokenizer_config.json): rebuild it with its tokenizer"


@dataclass(frozen=True)
class TaskEval:
    """One ``evaluation.tasks`` entry: ``ran`` with its metrics, ``skipped`` (why) or ``error`` (what
    broke)."""

    status: Literal["ran", "skipped", "error"]
    source: str
    reason: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """``metric`` (e.g. ``acc``; ``metric_filter`` for a non-default filter); ``subtask/metric`` for a
    group's members."""
    samples: int | None = None
    limit: int | None = None
    truncated_inputs: int = 0
    """Inputs cut from the left to fit the engine's max_seq_len / max_input_len."""
    lm_eval_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lm_eval_available() -> bool:
    try:
        return importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # sys.modules["lm_eval"] = None, or a broken install
        return False


def lm_eval_version() -> str | None:
    return package_version("lm-eval") if lm_eval_available() else None


def task_key(spec: str) -> str:
    """Results key of a tasks entry: the name itself, or the YAML file's stem."""
    return Path(spec).stem if is_task_yaml(spec) else spec


def metric_name(task: str, metric: str) -> str:
    """Flat metric name of a task metric (``task_hellaswag_acc_norm``): what MLflow, gates and reports
    read."""
    return "task_" + re.sub(r"[^a-z0-9]+", "_", f"{task}_{metric}".lower()).strip("_")


def task_metrics(task_evals: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics of every task that ran (``task_evals`` values are TaskEvals or their dicts)."""
    out: dict[str, float] = {}
    for key, entry in task_evals.items():
        data = entry.to_dict() if isinstance(entry, TaskEval) else entry
        if data.get("status") == "ran":
            out.update({metric_name(key, m): float(v) for m, v in (data.get("metrics") or {}).items()})
    return out


def task_notes(task_evals: Mapping[str, Any]) -> dict[str, str]:
    """``{task: "skipped: why"}`` for every task that did not run (what the build report lists)."""
    out = {}
    for key, entry in task_evals.items():
        data = entry.to_dict() if isinstance(entry, TaskEval) else entry
        if data.get("status") != "ran":
            out[key] = f"{data.get('status')}: {data.get('reason')}"
    return out


def cache_inputs(evaluation: Evaluation) -> dict[str, Any]:
    """What a cached task eval depends on beyond the profile: lm-eval's version, task YAML and local data
    bytes.

    For the validation step's cache key, so installing lm-eval or editing a task file re-measures.
    """
    if not evaluation.tasks:
        return {}
    from kiln.registry.store import sha256_file

    files: dict[str, str | None] = {}
    for spec in filter(is_task_yaml, evaluation.tasks):
        path = Path(spec)
        files[spec] = sha256_file(path) if path.is_file() else None
        if lm_eval_available() and path.is_file():
            data = (_yaml_spec(path).get("dataset_kwargs") or {}).get("data_files")
            for item in _flat(data):
                if Path(item).is_file():
                    files[item] = sha256_file(Path(item))
    return {"lm_eval": lm_eval_version(), "files": files}


def _flat(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [leaf for item in items for leaf in _flat(item)]


@functools.cache
def _task_manager() -> Any:
    # Indexing lm-eval's ~15k task YAMLs takes seconds: once per process (pre-flight, then each engine).
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_problems(evaluation: Evaluation) -> list[tuple[Literal["error", "warning"], str]]:
    """Pre-flight findings of ``evaluation.tasks``: unknown task names (errors), lm-eval missing (a
    warning)."""
    if not evaluation.tasks:
        return []
    if not lm_eval_available():
        return [("warning", f"{LM_EVAL_MISSING}; evaluation.tasks {evaluation.tasks} will be skipped")]
    return [("error", problem) for problem in unknown_task_problems(evaluation)]


def unknown_task_problems(evaluation: Evaluation) -> list[str]:
    """``evaluation.tasks[i]: ...`` for each task name lm-eval does not know (empty if lm-eval is missing).

    Indexing lm-eval's task registry takes seconds, so this is a pre-flight check, not a profile check.
    """
    names = [(i, s) for i, s in enumerate(evaluation.tasks) if not is_task_yaml(s)]
    if not names or not lm_eval_available():
        return []
    manager = _task_manager()
    known = set(manager.all_tasks)
    problems = []
    for index, name in names:
        if name in known or ("*" in name and manager.match_tasks([name])):
            continue
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        problems.append(
            f"evaluation.tasks[{index}]: unknown lm-eval task {name!r}; {hint}"
            "`lm-eval ls tasks` lists them, or give a task .yaml path"
        )
    return problems


def _yaml_spec(path: Path) -> dict[str, Any]:
    """The task YAML as lm-eval reads it, with relative data_files resolved against the YAML's folder."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = copy.deepcopy(load_yaml(path, resolve_func=True))
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
            return str((path.parent / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        return value

    if files is not None:
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": resolve(files)}
    return cfg


def _load_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    if isinstance(exc, FileNotFoundError):
        return f"task data is not available ({text}): check the task YAML's dataset_path / data_files"
    if isinstance(exc, OSError) or "offline" in text.lower():  # ConnectionError: offline mode or no network
        return (
            f"task data is not available offline ({text}); cache the dataset once where the hub is reachable "
            "(HF_DATASETS_OFFLINE unset), or point a task YAML at local files"
        )
    return f"could not load the task ({text})"


def _finite_metrics(entry: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    metrics = {}
    for raw, value in entry.items():
        if (
            "," not in raw
            or "_stderr" in raw
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            continue
        metric, filt = raw.split(",", 1)
        name = metric if filt == "none" else f"{metric}_{filt}"
        if math.isfinite(float(value)):
            metrics[prefix + name] = float(value)
    return metrics


def run_tasks(
    engine: Engine,
    engine_dir: Path,
    evaluation: Evaluation,
    *,
    max_seq_len: int,
    max_input_len: int,
    batch_size: int = 1,
) -> dict[str, TaskEval]:
    """Run ``evaluation.tasks`` on ``engine``; every entry gets a TaskEval (ran, skipped or error)."""
    specs = list(evaluation.tasks)
    if not specs:
        return {}
    version = lm_eval_version()
    if not lm_eval_available():
        return {task_key(s): TaskEval("skipped", s, LM_EVAL_MISSING) for s in specs}
    if not (Path(engine_dir) / TOKENIZER_CONFIG).is_file():
        return {task_key(s): TaskEval("skipped", s, NO_TOKENIZER, lm_eval_version=version) for s in specs}
    import lm_eval

    from kiln.hub import load_tokenizer
    from kiln.validation.lm_adapter import EngineLM

    lm = EngineLM(
        engine,
        load_tokenizer(engine_dir),
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        batch_size=batch_size,
    )
    manager = _task_manager()
    out: dict[str, TaskEval] = {}
    for spec in specs:
        key = task_key(spec)
        try:
            loaded = manager.load([_yaml_spec(Path(spec)) if is_task_yaml(spec) else spec])
        except Exception as exc:  # noqa: BLE001 - any load failure skips this optional task, with its reason
            out[key] = TaskEval("skipped", spec, _load_reason(exc), lm_eval_version=version)
            continue
        lm.truncated = 0
        # top-level items only, so a group's aggregate score is computed as lm-eval does for that group
        members = {child for children in (loaded.get("group_map") or {}).values() for child in children}
        top = [
            obj
            for name, obj in {**(loaded.get("groups") or {}), **loaded["tasks"]}.items()
            if name not in members
        ]
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=top,
                task_manager=manager,
                limit=evaluation.task_limit,
                bootstrap_iters=0,
                log_samples=False,
            )
        except Exception as exc:  # noqa: BLE001 - recorded as an error row, the build goes on
            out[key] = TaskEval(
                "error",
                spec,
                f"{type(exc).__name__}: {exc}",
                limit=evaluation.task_limit,
                truncated_inputs=lm.truncated,
                lm_eval_version=version,
            )
            continue
        per_task = results["results"]
        own = next((n for n in (key, spec) if n in per_task), None)
        if own is None and len(per_task) == 1:
            own = next(iter(per_task))
        metrics = _finite_metrics(per_task[own]) if own else {}
        for name, entry in per_task.items():
            if name != own:
                metrics.update(_finite_metrics(entry, f"{name}/"))
        samples = sum(int(v.get("effective", 0)) for v in (results.get("n-samples") or {}).values())
        out[key] = TaskEval(
            "ran",
            spec,
            metrics=metrics,
            samples=samples,
            limit=evaluation.task_limit,
            truncated_inputs=lm.truncated,
            lm_eval_version=version,
        )
    return out
