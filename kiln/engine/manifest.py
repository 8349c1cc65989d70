"""``kiln-engine.json``: the record every engine dir carries (built for what, from what, with what toolchain).

Both backends write it with :func:`write`; everything that opens an engine dir reads it with :func:`read`,
which refuses a dir without one, bad JSON, another format and a missing or mistyped field with one error,
``EngineMismatchError``, naming the file and the field. The registry's store manifest embeds the same model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kiln.constants import ENGINE_MANIFEST
from kiln.errors import EngineMismatchError
from kiln.profiles import Backend, BuildLimits, Device, Dtype

FORMAT_VERSION = 1
"""Bumped when the record changes in a way an older kiln would misread; :func:`read` refuses other formats."""

REBUILD = "rebuild the engine with `kiln compile`"


class _Record(BaseModel):
    # Extra keys are kept and written back unchanged: engine dirs and the registry's copies of this record
    # outlive the kiln that wrote them (workers and servers of one registry run different kiln releases), so
    # a newer kiln may add a key within one format_version and an older one must still read, fetch and serve
    # that engine; the registry's manifest sha256 also needs the record to round-trip byte for byte.
    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        protected_namespaces=(),
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


class _Closed(BaseModel):
    """Facts with a fixed shape: an unknown key there is a broken record, not a newer one."""

    model_config = ConfigDict(extra="forbid", frozen=True)


GemvChoice = list[int] | dict[str, list[int] | str | None] | None
"""A weight shape's kernel: for bf16/FP8 weights a Triton GEMV block shape or None (cuBLAS); for integer
weights one option per row bucket (``m1``, ``m16``, ``m64``, ``large``; see ``linear.tune_quant``)."""


class TorchProgram(_Record):
    """How the torch engine runs: ``default_program`` plus the kernels ``TorchBackend.compile`` measured.

    Kernel choices only pick among paths that compute the same numbers, so one this kiln does not know (an
    extra key) is kept but unused: the torch path serves instead.
    """

    compile: Literal["inductor", "none"]
    cuda_graphs: bool
    attention: Literal["triton", "torch"] | None = None
    gemv: dict[str, GemvChoice] | None = None
    """``kernels.gemv_key`` / ``kernels.quant_key`` of a weight shape -> the kernel that ran fastest there."""
    dynamic: bool = True
    """Inductor's dynamic shapes; like ``inductor_options`` set only by benchmarks at load, not by compile."""
    inductor_options: dict[str, Any] | None = None


class ContractRef(_Closed):
    """The TensorRT-LLM API contract (kiln/contracts/*.json) the artifact was checked against."""

    series: str
    source: str


class TrtCheckpoint(_Closed):
    """The TensorRT-LLM checkpoint ``trtllm-build`` read (``api.CheckpointFacts``)."""

    architecture: str
    dtype: str
    tp_size: int
    pp_size: int
    producer: dict[str, Any]


class TrtBuild(_Record):
    """``artifact: engine``: the ``trtllm-build`` run, so anyone can rebuild by hand."""

    command: list[str]
    seconds: float
    gather_context_logits: bool
    """Loading needs it: validation reads prompt logits."""
    plugins: dict[str, Any]
    """``api.AttentionPlugins.to_dict()``: the attention plugins trtllm-build really built with."""
    checkpoint_dir: str
    checkpoint: TrtCheckpoint


class LlmApi(_Record):
    """``artifact: hf_checkpoint``: the LLM API class and settings kiln validated the checkpoint with."""

    llm_class: str = Field(alias="class")
    """``module:attr`` of the LLM class (the contract's ``kiln.llm_class``)."""
    settings: dict[str, Any]
    """LLM API keyword arguments; which ones a TensorRT-LLM version accepts is its contract's business."""
    options_file: str
    """The same settings as YAML in the artifact (``trtllm-serve --extra_llm_api_options``)."""


_SECTIONS = {"torch": ("program", "model", "layout"), "tensorrt_llm": ("artifact", "contract")}
_ARTIFACT_SECTIONS = {"engine": "build", "hf_checkpoint": "llm_api"}


class EngineManifest(_Record):
    """What an engine dir was built for and from; ``read`` it, never ``json.loads`` it."""

    format_version: int
    backend: Backend
    target: str
    """The target's name (its profile has the rest)."""
    device: Device
    sm: str | None = None
    """``sm90``; None on CPU. TensorRT-LLM records the build GPU's SM."""
    gpu: str | None = None
    dtype: Dtype
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None
    limits: BuildLimits
    toolchain: dict[str, str | int | float | None]
    """Package -> version (``torch``, ``triton``, ``tensorrt_llm``, ...); TensorRT-LLM also records the build
    GPU (``gpu_name``, ``gpu_sm``, ``gpu_memory_gib``, ``gpu_count``)."""
    model_sha: str | None = None
    checkpoint_sha256: str | None = None
    tokenizer: str | None = None
    """The dir the tokenizer files were copied from (None: the engine has none)."""
    lineage: dict[str, Any] = {}
    """The checkpoint's ``kiln-lineage.json`` (its schema is the checkpoint step's)."""

    # torch engines
    program: TorchProgram | None = None
    model: dict[str, Any] | None = None
    """``ModelSpec.to_json()``; ``ModelSpec.from_json`` reads and checks it."""
    layout: list[dict[str, str]] | None = None
    """Per rank: weight name -> kind (``dense``, ``fp8``, ``int8_wo``, ...)."""

    # TensorRT-LLM artifacts
    artifact: Literal["engine", "hf_checkpoint"] | None = None
    contract: ContractRef | None = None
    build: TrtBuild | None = None
    llm_api: LlmApi | None = None

    @field_validator("limits", mode="before")
    @classmethod
    def _every_limit(cls, value: Any) -> Any:
        # an engine is built for every limit, also those its profile left at their defaults: record them all
        return value.model_dump() if isinstance(value, BuildLimits) else value

    @model_validator(mode="after")
    def _backend_sections(self) -> EngineManifest:
        needed = [(name, f"{self.backend} engine") for name in _SECTIONS[self.backend]]
        if self.artifact is not None:
            needed.append((_ARTIFACT_SECTIONS[self.artifact], f"{self.artifact} artifact"))
        if self.device == "cuda":
            needed.append(("sm", "cuda engine"))
        missing = [
            f"{name}: missing (every {kind} records it)"
            for name, kind in needed
            if getattr(self, name) is None
        ]
        if missing:
            raise PydanticCustomError("backend_section", "; ".join(missing))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON data: only the keys it was built or read with, so it round-trips unchanged."""
        return self.model_dump(mode="json", exclude_unset=True, fallback=str)


def read(engine_dir: Path) -> EngineManifest:
    """The ``kiln-engine.json`` of ``engine_dir``; else ``EngineMismatchError`` naming the file and field."""
    path = Path(engine_dir) / ENGINE_MANIFEST
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_dir}: no {ENGINE_MANIFEST}, so not an engine dir; pass one built "
            "by `kiln compile` or a build (the record says what it was built for)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineMismatchError(f"{path}: not valid JSON ({exc}); {REBUILD}") from None
    if not isinstance(data, dict):
        raise EngineMismatchError(f"{path}: expected a JSON object, got {type(data).__name__}; {REBUILD}")
    found = data.get("format_version")
    if isinstance(found, int) and found != FORMAT_VERSION:  # before the fields: another format has others
        raise EngineMismatchError(
            f"{path}: engine format {found} but this kiln reads format "
            f"{FORMAT_VERSION}: {REBUILD}, or use the kiln release that built it"
        )
    try:
        return EngineManifest.model_validate(data)
    except ValidationError as exc:
        raise EngineMismatchError(f"{path}: {problems(exc)}; {REBUILD}") from None


def problems(exc: ValidationError) -> str:
    """A validation error as ``field: what is wrong`` items joined by ``; `` (``limits.max_seq_len: ...``)."""
    found = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"])
        message = "missing" if error["type"] == "missing" else error["msg"]
        found.append(f"{field}: {message}" if field else message)
    return "; ".join(found)


def write(engine_dir: Path, manifest: EngineManifest) -> Path:
    """Write ``manifest`` as ``engine_dir``'s ``kiln-engine.json``; returns its path."""
    path = Path(engine_dir) / ENGINE_MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2))
    return path
