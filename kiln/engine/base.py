"""The one small interface every backend implements: compile a checkpoint for a target, run it.

``torch`` (kiln's portable engine) and ``tensorrt_llm`` (NVIDIA's runtime) both sit behind it, so
validation, the flows and the CLI never branch on the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from kiln.profiles import Target


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; ``temperature == 0`` is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"
    ttft_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    """Wall time at which each output token was produced, relative to the request's submission."""


@dataclass(frozen=True)
class TokenEvent:
    """One token a scheduler step produced for a request; ``result`` is set on the token that finished it."""

    request_id: Hashable
    token_id: int
    time_s: float
    """Seconds since the request was submitted."""
    result: GenerationResult | None = None


class Scheduler(Protocol):
    """Incremental in-flight batching: requests join and leave a running batch between decode steps."""

    @property
    def has_work(self) -> bool: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    def add(
        self,
        request: GenerationRequest,
        request_id: Hashable | None = None,
        *,
        submitted_at: float | None = None,
        check: bool = True,
    ) -> Hashable:
        """Queue a request (refused with GenerationLimitError when it exceeds the engine's limits)."""

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests or decode one token for each running one; the tokens produced, in order."""

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a waiting or running request and free its slot."""


@runtime_checkable
class Engine(Protocol):
    """A loaded engine, ready to serve."""

    engine_dir: Path

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion (batched, in-flight); results in request order."""

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Context logits ``[len(token_ids), vocab]`` in float32, for perplexity and KL."""

    def memory_bytes(self) -> int:
        """Peak device (or host) memory this engine used so far."""

    def close(self) -> None: ...


@runtime_checkable
class StreamingEngine(Engine, Protocol):
    """An engine a server can drive token by token (the torch engine; TensorRT-LLM serves with
    trtllm-serve)."""

    max_batch_size: int
    max_input_len: int
    max_seq_len: int

    def scheduler(
        self, concurrency: int | None = None, *, on_event: Callable[[TokenEvent], None] | None = None
    ) -> Scheduler:
        """A scheduler over the engine's KV cache (one at a time); ``on_event`` sees each token as it is
        made."""

    def check_request(self, request: GenerationRequest, where: str = "request") -> None:
        """Raise GenerationLimitError, naming the limit, when ``request`` does not fit the engine."""


class Backend(Protocol):
    """Turns a TensorRT-LLM checkpoint into an engine dir for a target, and loads engine dirs."""

    name: str

    def check_available(self, target: Target) -> None:
        """Raise ``BackendUnavailableError`` (saying where it runs) if this machine cannot build for
        target."""

    def compile(self, checkpoint_dir: Path, target: Target, output_dir: Path, lineage: dict) -> Path:
        """Build the engine dir (with ``kiln-engine.json``) and return it."""

    def load(self, engine_dir: Path) -> Engine:
        """Load an engine dir, refusing one built for another SM or toolchain."""


def copy_tokenizer(staging: Path, candidates: list) -> str | None:
    """Copy the tokenizer files of the first candidate dir that has one into an engine dir (it must serve
    alone)."""
    import shutil

    from kiln.constants import MODEL_SIDE_FILES, TOKENIZER_CONFIG

    for candidate in candidates:
        if candidate and (Path(candidate) / TOKENIZER_CONFIG).is_file():
            for name in MODEL_SIDE_FILES:
                if (Path(candidate) / name).is_file():
                    shutil.copy2(Path(candidate) / name, Path(staging) / name)
            return str(candidate)
    return None


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` (``torch`` or ``tensorrt_llm``)."""
    if name == "torch":
        from kiln.engine.torch import TorchBackend

        return TorchBackend()
    if name == "tensorrt_llm":
        from kiln.engine.trtllm import TensorRTLLMBackend

        return TensorRTLLMBackend()
    raise ValueError(f"unknown backend {name!r}; known: torch, tensorrt_llm")
