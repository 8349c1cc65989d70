"""Validated profiles: targets, recipes and build requests, loaded from YAML.

A build request names recipes and targets either inline (mappings) or by name; names resolve in the
``recipes.yaml`` / ``targets.yaml`` library of the nearest ``profiles/`` ancestor of the request file
(or ``$KILN_PROFILES_DIR``). Every error names the file, the field path and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from kiln import constants
from kiln.errors import ProfileError
from kiln.recipes import SCHEMES, KVCacheDtype, Quantization, scheme, sm_number

Backend = Literal["torch", "tensorrt_llm"]
Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "float16", "bfloat16"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildLimits(_Strict):
    """Limits an engine is built for; requests beyond them are refused at run time."""

    max_batch_size: int = Field(8, ge=1)
    max_input_len: int = Field(512, ge=1)
    max_seq_len: int = Field(1024, ge=2)
    max_num_tokens: int = Field(4096, ge=1)
    tp_size: int = Field(1, ge=1)
    pp_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _seq_covers_input(self) -> BuildLimits:
        if self.max_seq_len <= self.max_input_len:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be greater than max_input_len "
                f"({self.max_input_len}): it bounds prompt + generated tokens"
            )
        return self


class Target(_Strict):
    """A GPU (or CPU) target: where and how an engine is compiled and served."""

    name: str = Field(pattern=_NAME)
    backend: Backend = "torch"
    device: Device = "cpu"
    gpu: str | None = Field(None, description="GPU family, e.g. h100, a100, l40s, b200")
    sm: str | None = Field(None, pattern=r"^sm\d{2,3}$", description="compute capability, e.g. sm90")
    gpu_memory_gib: float | None = Field(None, gt=0)
    gpus_per_worker: int = Field(1, ge=1)
    dtype: Dtype = "bfloat16"
    limits: BuildLimits = BuildLimits()
    artifact: Literal["engine", "hf_checkpoint"] = "engine"
    work_pool: str = "kiln-cpu"
    optional: bool = Field(False, description="skip (not fail) when the backend is not installed here")
    tensorrt_llm_version: str | None = Field(
        None,
        pattern=r"^\d+\.\d+(\.\d+)?[A-Za-z0-9.+-]*$",
        description=(
            "TensorRT-LLM version of the target's worker image (e.g. 1.2.1); pre-flight checks against its "
            "contract"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> Target:
        if self.device == "cuda" and self.sm is None:
            raise ValueError("sm is required for a cuda target (e.g. sm: sm90)")
        if self.device == "cpu" and self.backend == "tensorrt_llm":
            raise ValueError("backend tensorrt_llm needs device: cuda")
        if self.artifact == "hf_checkpoint" and self.backend != "tensorrt_llm":
            raise ValueError(
                "artifact hf_checkpoint is served by TensorRT-LLM >= 1.3: use backend tensorrt_llm"
            )
        return self

    @property
    def sm_number(self) -> int | None:
        return sm_number(self.sm)


class Calibration(_Strict):
    """Calibration data: ``builtin:fortunes``, ``file:PATH`` (.txt/.jsonl) or
    ``hf:REPO@REVISION[:SPLIT[:COLUMN]]``."""

    dataset: str = "builtin:fortunes"
    num_samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    seed: int = 0

    @field_validator("dataset")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not re.match(r"^(builtin|file|hf):.+", value):
            raise ValueError("must start with builtin:, file: or hf: (e.g. builtin:fortunes)")
        return value


class Gates(_Strict):
    """Pass/fail thresholds; unset gates are not checked."""

    max_ppl_increase_pct: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_kl_divergence: float | None = Field(None, ge=0)
    min_tokens_per_s: float | None = Field(None, gt=0)
    max_ttft_p90_ms: float | None = Field(None, gt=0)
    min_task_score: dict[str, float] | None = Field(
        None, description="lm-eval task scores, {'TASK/METRIC': minimum}, e.g. {'hellaswag/acc_norm': 0.4}"
    )

    @field_validator("min_task_score")
    @classmethod
    def _task_metric_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not re.fullmatch(r"[^/\s]+/[^/\s]+", key):
                raise ValueError(
                    f"key {key!r} must be TASK/METRIC (e.g. hellaswag/acc_norm), the task as in "
                    "evaluation.tasks (a YAML by its file stem)"
                )
        return value

    def merged(self, override: Gates | None) -> Gates:
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))


class Recipe(_Strict):
    """A quantization recipe, calibrated once per build and shared by every target."""

    name: str = Field(pattern=_NAME)
    quantization: Quantization = "none"
    kv_cache_dtype: KVCacheDtype = "auto"
    group_size: int = Field(128, ge=8)
    calibration: Calibration = Calibration()
    gates: Gates | None = None


class HubModel(_Strict):
    """A Hugging Face hub repo, pinned to a commit sha at download time."""

    repo_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
    revision: str = "main"
    allow_patterns: list[str] | None = None
    allow_pickle: bool = False

    @field_validator("repo_id")
    @classmethod
    def _no_traversal(cls, value: str) -> str:
        if ".." in value.split("/") or "/.." in value or value.startswith("."):
            raise ValueError("must be 'owner/name' without '..' path segments")
        return value


class LocalModel(_Strict):
    """A local HF-format directory; its identity is the sha256 of its files."""

    local_dir: Path
    allow_pickle: bool = False


class Registry(_Strict):
    """Where versions go; unset fields fall back to the embedded defaults under KILN_HOME."""

    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
    tracking_uri: str | None = None
    store_uri: str | None = None

    @property
    def resolved_tracking_uri(self) -> str:
        return constants.tracking_uri_override() or self.tracking_uri or constants.default_tracking_uri()

    @property
    def resolved_store_uri(self) -> str:
        return constants.store_uri_override() or self.store_uri or constants.default_store_uri()


TASK_YAML_SUFFIXES = (".yaml", ".yml")
_TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:*-]{0,127}$"


def is_task_yaml(spec: str) -> bool:
    """Whether an ``evaluation.tasks`` entry is a task YAML path (else an lm-eval task, group or tag name)."""
    return spec.lower().endswith(TASK_YAML_SUFFIXES)


class Evaluation(_Strict):
    """Held-out data, the performance sweep and the optional lm-eval tasks used by validation."""

    heldout: str = "builtin:fortunes"
    heldout_tokens: int = Field(2048, ge=64)
    prompts: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    prompt_len: int = Field(
        128, ge=1, description="prompt tokens of each performance request (clipped to the engine's limits)"
    )
    concurrency: list[PositiveInt] = Field(default_factory=lambda: [1, 4], min_length=1)
    perf_requests: PositiveInt | None = Field(
        None,
        description="timed requests per concurrency level (at least the level); default 8 on cuda, 4 on cpu",
    )
    perf_max_new_tokens: PositiveInt | None = Field(
        None,
        description=(
            "output tokens per performance request; default max_new_tokens on cuda, at most 16 on cpu"
        ),
    )
    select: Literal["fastest", "smallest"] = "fastest"
    tasks: list[str] = Field(
        default_factory=list,
        description=(
            "lm-eval-harness tasks run on each engine: task/group names or task YAML paths (optional extra)"
        ),
    )
    task_limit: PositiveInt | None = Field(None, description="samples per task (None: the whole task)")

    @field_validator("tasks")
    @classmethod
    def _task_specs(cls, value: list[str]) -> list[str]:
        for index, spec in enumerate(value):
            if is_task_yaml(spec):
                if not Path(spec).is_file():
                    raise ValueError(
                        f"[{index}]: task YAML {spec!r} does not exist (paths are relative to the "
                        "profile file)"
                    )
            elif not re.match(_TASK_NAME, spec):
                raise ValueError(
                    f"[{index}]: {spec!r} is neither an lm-eval task name (e.g. hellaswag) nor a "
                    "task .yaml path"
                )
        dupes = sorted({s for s in value if value.count(s) > 1})
        if dupes:
            raise ValueError(f"duplicate tasks {dupes}")
        return value


class BuildRequest(_Strict):
    """One build: a model, recipes x targets, gates and a registry."""

    name: str = Field(pattern=_NAME)
    model: HubModel | LocalModel
    recipes: list[Recipe] = Field(min_length=1)
    targets: list[Target] = Field(min_length=1)
    gates: Gates = Gates()
    evaluation: Evaluation = Evaluation()
    registry: Registry

    @model_validator(mode="after")
    def _unique_and_compatible(self) -> BuildRequest:
        for kind, items in (("recipes", self.recipes), ("targets", self.targets)):
            names = [item.name for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate names {dupes}")
        return self

    def gates_for(self, recipe: Recipe) -> Gates:
        return self.gates.merged(recipe.gates)


def _format_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} problem(s)"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        elif item["type"] == "literal_error" and item.get("ctx", {}).get("expected"):
            msg = f"got {item['input']!r}; allowed: {item['ctx']['expected']}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ProfileError(f"{path}: no such profile file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None


def library_roots(start: Path | None = None) -> list[tuple[str, Path]]:
    """Where named recipes/targets come from, first match winning: the nearest ``profiles/`` tree above
    ``start`` (a request file), ``$KILN_PROFILES_DIR``, then the library installed with kiln."""
    roots: list[tuple[str, Path]] = []
    if start is not None:
        nearest = next(
            (
                p
                for p in Path(start).resolve().parents
                if (p / "recipes.yaml").is_file() or (p / "targets.yaml").is_file()
            ),
            None,
        )
        if nearest is not None:
            roots.append(("profiles tree", nearest))
    if (env_root := constants.profiles_dir()) is not None:
        roots.append(("KILN_PROFILES_DIR", env_root))
    if (packaged := constants.packaged_profiles_dir()) is not None:
        roots.append(("installed with kiln", packaged))
    unique: dict[Path, tuple[str, Path]] = {}
    for label, root in roots:
        unique.setdefault(root.resolve(), (label, root))
    return list(unique.values())


def library(kind: str, start: Path | None = None) -> tuple[dict[str, Any], list[Path]]:
    """Named entries of ``recipes.yaml``/``targets.yaml`` over every library root (earlier roots win a
    name)."""
    entries: dict[str, Any] = {}
    files: list[Path] = []
    for _, root in reversed(library_roots(start)):
        lib_path = root / f"{kind}.yaml"
        if not lib_path.is_file():
            continue
        entries.update(library_file(lib_path, kind))
        files.insert(0, lib_path)
    return entries, files


def library_file(lib_path: Path, kind: str) -> dict[str, Any]:
    """The named entries of one library file (``{kind: [{name: ...}, ...]}``)."""
    data = _read_yaml(lib_path) or {}
    if not isinstance(data, dict) or not isinstance(data.get(kind), list):
        raise ProfileError(f"{lib_path}: expected a mapping with a '{kind}' list")
    entries: dict[str, Any] = {}
    for index, entry in enumerate(data[kind]):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ProfileError(f"{lib_path}: {kind}[{index}]: each entry needs a name")
        entries[entry["name"]] = entry
    return entries


def library_entry(kind: str, name: str, start: Path | None = None) -> dict[str, Any]:
    """The named recipe or target (``kind``) of the library (:func:`library_roots` from ``start``, default
    ./profiles); a ProfileError names the files searched and the names they hold."""
    entries, files = library(f"{kind}s", start if start is not None else Path.cwd() / "profiles" / "_")
    if not files:
        raise ProfileError(
            f"no {kind} library found (./profiles, KILN_PROFILES_DIR, or kiln's own): pass a {kind} YAML file"
        )
    if name not in entries:
        raise ProfileError(
            f"{', '.join(map(str, files))}: no {kind} named {name!r}; known: "
            f"{', '.join(sorted(map(str, entries)))}"
        )
    return dict(entries[name])


def _resolve_refs(path: Path, data: dict[str, Any], kind: str) -> None:
    items = data.get(kind)
    if not isinstance(items, list):
        return
    named, files = None, []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if named is None:
                named, files = library(kind, path)
            if item not in named:
                where = (
                    f"in {', '.join(map(str, files))}"
                    if files
                    else f"(no {kind}.yaml found above {path.parent})"
                )
                known = (
                    f"known: {', '.join(sorted(named))}"
                    if named
                    else f"define it inline, or set KILN_PROFILES_DIR to a folder with {kind}.yaml"
                )
                raise ProfileError(f"{path}: {kind}[{index}]: unknown {kind[:-1]} {item!r} {where}; {known}")
            items[index] = named[item]


def _expand_paths(path: Path, data: dict[str, Any]) -> None:
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("local_dir"), str):
        raw = os.path.expandvars(model["local_dir"]).replace("${KILN_HOME}", str(constants.kiln_home()))
        local = Path(raw).expanduser()
        model["local_dir"] = str(local if local.is_absolute() else (path.parent / local).resolve())
    evaluation = data.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("tasks"), list):
        evaluation["tasks"] = [
            _task_path(path, spec) if isinstance(spec, str) and is_task_yaml(spec) else spec
            for spec in evaluation["tasks"]
        ]


def _task_path(path: Path, spec: str) -> str:
    raw = Path(os.path.expandvars(spec).replace("${KILN_HOME}", str(constants.kiln_home()))).expanduser()
    return str(raw if raw.is_absolute() else (path.parent / raw).resolve())


def load_request(source: str | Path | dict[str, Any] | BuildRequest) -> BuildRequest:
    """Load and validate a build request from a YAML file, a mapping, or pass one through."""
    if isinstance(source, BuildRequest):
        return source
    if isinstance(source, dict):
        path, data = Path("<request>"), dict(source)
    else:
        path = Path(source)
        data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    if "KILN_HOME" not in os.environ:
        os.environ.setdefault("KILN_HOME", str(constants.kiln_home()))
    _resolve_refs(path, data, "recipes")
    _resolve_refs(path, data, "targets")
    _expand_paths(path, data)
    try:
        request = BuildRequest.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_error(path, exc)) from None
    _check_groups(path, request)
    return request


def _check_groups(path: Path, request: BuildRequest) -> None:
    for index, recipe in enumerate(request.recipes):
        if recipe.quantization not in SCHEMES:  # pragma: no cover - Literal already enforces it
            raise ProfileError(f"{path}: recipes[{index}].quantization: unknown {recipe.quantization!r}")
        if scheme(recipe.quantization).group_size and recipe.group_size % 8:
            raise ProfileError(
                f"{path}: recipes[{index}].group_size: {recipe.group_size} must be a multiple of 8"
            )


def load_target(source: str | Path | dict[str, Any]) -> Target:
    """Load one target mapping or YAML file (used by ``kiln compile``/``kiln doctor --target``)."""
    data = source if isinstance(source, dict) else _read_yaml(Path(source))
    try:
        return Target.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(
            _format_error(Path(str(source)) if not isinstance(source, dict) else Path("<target>"), exc)
        ) from None
