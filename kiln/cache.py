"""Build keys from content inputs, and a step result cache keyed by them under ``KILN_HOME/cache``.

A step's key hashes everything its output depends on (model sha, recipe, calibration hash, target,
toolchain versions), never a path or a time, so an identical rebuild finds every step's result and a
change to one target's limits misses only that target's steps. Entries are JSON records plus an output
dir; the record is written last (as the artifact store writes its manifest) under a file lock, so
two workers sharing a cache compute a step once and a crash never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from filelock import FileLock
from pydantic import BaseModel, TypeAdapter

from kiln import constants
from kiln.errors import writing
from kiln.host import installed_versions

T = TypeVar("T")

RECORD = "record.json"
OUTPUT = "out"

_TOOLCHAIN_PACKAGES = ("kiln-llm", "torch", "transformers", "nvidia-modelopt", "tensorrt_llm", "safetensors")


def toolchain_versions(packages: Sequence[str] = _TOOLCHAIN_PACKAGES) -> dict[str, str]:
    """Installed versions of the packages that shape a checkpoint or an engine (absent ones omitted)."""
    return installed_versions(packages)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return TypeAdapter(type(value)).dump_python(value, mode="json")


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no whitespace; pydantic models and dataclasses dumped as JSON."""
    return json.dumps(_jsonable(value), sort_keys=True, separators=(",", ":"), default=str)


def build_key(**content_inputs: Any) -> str:
    """sha256 (hex) of the canonical JSON of the named inputs; equal inputs give equal keys on any machine."""
    return hashlib.sha256(canonical_json(content_inputs).encode()).hexdigest()


@dataclass(frozen=True)
class CacheHit(Generic[T]):
    """A step's result and whether it came from the cache (``reused``) or was just computed."""

    value: T
    key: str
    reused: bool


class StepCache:
    """Results of one step (``quantize``, ``compile``, ``validate`` ...) keyed by build keys."""

    def __init__(self, step: str, root: Path | None = None) -> None:
        self.step = step
        self.root = (root or constants.cache_dir()) / step

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    def output_dir(self, key: str) -> Path:
        """Where a computed step writes its files (checkpoint, engine); kept as long as the entry."""
        return self.entry_dir(key) / OUTPUT

    def get(self, key: str, type_: type[T]) -> T | None:
        """The stored result, or None when absent, unreadable or no longer matching ``type_``."""
        record = self.entry_dir(key) / RECORD
        if not record.is_file():
            return None
        try:
            return TypeAdapter(type_).validate_json(record.read_text())
        except ValueError:
            return None

    def put(self, key: str, value: Any) -> None:
        """Store a result computed elsewhere; the record is written last (tmp + rename) so it is whole."""
        entry = self.entry_dir(key)
        entry.mkdir(parents=True, exist_ok=True)
        tmp = entry / (RECORD + ".tmp")
        tmp.write_text(json.dumps(_jsonable(value), indent=1, sort_keys=True))
        tmp.replace(entry / RECORD)

    def run(
        self, key: str, compute: Callable[[Path], T], type_: type[T], reuse: Callable[[T], bool] | None = None
    ) -> CacheHit[T]:
        """Return the cached result for ``key``, or compute it once and store it.

        ``compute(output_dir)`` writes its files into ``output_dir`` and returns a dataclass or pydantic
        model whose paths point there. The record is written last: an entry without one (a crash
        mid-step) is wiped and recomputed, never reused. ``reuse(cached)`` False also recomputes it
        (a stored result that does not answer this run, e.g. a checkpoint refused under another gate).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            cached = self.get(key, type_)
            if cached is not None and (reuse is None or reuse(cached)):
                return CacheHit(cached, key, reused=True)
            shutil.rmtree(self.entry_dir(key), ignore_errors=True)
            output = self.output_dir(key)
            output.mkdir(parents=True)
            try:
                with writing(self.step, output):
                    value = compute(output)
                    self.put(key, value)
            except BaseException:
                # a failed step (disk full, interrupted) must not keep its partial output on disk
                shutil.rmtree(self.entry_dir(key), ignore_errors=True)
                raise
            return CacheHit(value, key, reused=False)
