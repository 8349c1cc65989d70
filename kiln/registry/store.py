"""The artifact store: immutable version prefixes with a SHA-256 manifest written last.

A version is ``<prefix>/files/<relpath>`` for every file plus ``<prefix>/manifest.json`` (each file's
size and sha256, the engine record and the lineage). The manifest is created with a conditional put
(``If-None-Match: *`` on S3, an exclusive hard link on disk), so of two writers exactly one publishes
and a crash before it leaves a prefix that is not a version: listing and fetch ignore it, and the next
upload resumes by skipping files already present with matching checksums. Backends (``file://`` in
:mod:`kiln.registry.local`, ``s3://`` in :mod:`kiln.registry.s3`) implement a handful of primitives;
the publish/verify logic here is shared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_serializer

from kiln import constants
from kiln.engine.manifest import EngineManifest, problems
from kiln.errors import IntegrityError, KilnInputError, RegistryConfigError, RegistryError
from kiln.registry.naming import FILES_DIR

MANIFEST_FORMAT = "kiln-manifest/1"
FETCHED_MANIFEST = "kiln-manifest.json"
"""Copy of the manifest that fetch leaves in the output dir, so a server can re-verify before loading."""

_CHUNK = 8 * 1024 * 1024


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """Everything needed to verify a version and to tell which machines can run it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: str = MANIFEST_FORMAT
    model: str
    target: str
    recipe: str
    build_key: str
    created_at: str
    files: list[FileEntry]
    engine: EngineManifest
    """The engine dir's ``kiln-engine.json``, copied at publish: what fetch checks a machine against."""
    lineage: dict[str, Any]

    @field_serializer("engine")
    def _engine_as_recorded(self, engine: EngineManifest) -> dict[str, Any]:
        # as read: the bytes of a version's manifest are what its registered sha256 covers
        return engine.to_dict()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise IntegrityError(
                f"{where}: manifest is not a kiln manifest ({problems(exc)}); the version "
                "is corrupt - republish it"
            ) from None


@dataclass(frozen=True)
class ObjectStat:
    size: int
    sha256: str | None
    """The whole-file sha256 the object was stored with, when the backend recorded one."""


@dataclass(frozen=True)
class TransferEvent:
    """One file finished uploading or downloading (``skipped``: already present with the same checksum)."""

    path: str
    size: int
    skipped: bool
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


ProgressFn = Callable[[TransferEvent], None]


class Store(ABC):
    """Primitives a backend provides; keys are ``/``-separated and relative to the store's root URI."""

    uri: str

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """The same backend rooted at ``prefix`` (a version's own store)."""

    def check_root(self) -> None:
        """Fail fast when the store's root cannot be there (S3: a missing bucket); cheap, no writes."""
        return None

    @abstractmethod
    def check_writable(self) -> None:
        """Raise RegistryConfigError/RegistryError unless a probe object can be written, read and deleted."""

    @abstractmethod
    def stat(self, key: str) -> ObjectStat | None: ...

    @abstractmethod
    def put_file(self, local: Path, key: str, *, size: int, sha256: str) -> None:
        """Upload ``local`` (already hashed); the backend verifies the bytes against ``sha256`` where it
        can."""

    @abstractmethod
    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if it does not exist; False when another writer got there first."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    def get_file(self, key: str, local: Path) -> None: ...

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of ``prefix``."""


def open_store(uri: str) -> Store:
    """A store for ``file:///abs/dir`` or ``s3://bucket[/prefix]`` (endpoint from ``AWS_ENDPOINT_URL_S3``)."""
    if uri.startswith("file://"):
        from kiln.registry.local import LocalStore

        return LocalStore.from_uri(uri)
    if uri.startswith("s3://"):
        from kiln.registry.s3 import S3Store

        return S3Store.from_uri(uri)
    raise RegistryConfigError(
        f"store URI {uri!r}: unsupported scheme; use file:///ABSOLUTE/DIR or "
        "s3://BUCKET/PREFIX (set store_uri in the profile's registry or KILN_STORE_URI)"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def scan_dir(local_dir: Path) -> list[tuple[str, Path]]:
    """Every file under ``local_dir`` (symlinks followed) as (posix relpath, path), sorted."""
    if not local_dir.is_dir():
        raise KilnInputError(f"{local_dir}: engine dir does not exist or is not a directory")
    found = []
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local_dir).as_posix()
            if rel != FETCHED_MANIFEST:
                found.append((rel, path))
    if not found:
        raise KilnInputError(f"{local_dir}: engine dir is empty; nothing to publish")
    return found


def safe_relpath(rel: str, where: str) -> str:
    """Refuse manifest paths that would land outside the output dir (absolute, ``..``, backslashes)."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel or rel.startswith("~"):
        raise IntegrityError(
            f"{where}: manifest lists unsafe path {rel!r}; refusing to write outside the output dir"
        )
    return rel


def verified_manifest(raw: bytes, where: str, expected_sha256: str | None, recorded_by: str) -> Manifest:
    """The manifest in ``raw`` (read from ``where``), checked against the sha256 ``recorded_by`` holds, if
    any."""
    if expected_sha256 and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise IntegrityError(
            f"{where}: sha256 differs from the one {recorded_by}; the stored version was modified"
        )
    return Manifest.from_bytes(raw, where)


def read_manifest(version: Store) -> Manifest | None:
    """The version's manifest, or None when the prefix is not (yet) a version."""
    data = version.get_bytes(constants.STORE_MANIFEST)
    return None if data is None else Manifest.from_bytes(data, f"{version.uri}/{constants.STORE_MANIFEST}")


def upload_version(
    version: Store,
    local_dir: Path,
    *,
    model: str,
    target: str,
    recipe: str,
    build_key: str,
    engine: EngineManifest,
    lineage: dict[str, Any],
    on_progress: ProgressFn | None = None,
) -> tuple[Manifest, bool]:
    """Upload ``local_dir`` into the version store, manifest last; returns (manifest, created).

    An existing manifest wins (the version is immutable): nothing is uploaded and ``created`` is False.
    Files already present with the same size and sha256 (an interrupted earlier upload) are skipped.
    """
    existing = read_manifest(version)
    if existing is not None:
        return existing, False
    files = scan_dir(local_dir)
    entries = [FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path)) for rel, path in files]
    total = sum(entry.size for entry in entries)
    done = 0
    for index, ((rel, path), entry) in enumerate(zip(files, entries, strict=True), start=1):
        key = f"{FILES_DIR}/{rel}"
        present = version.stat(key)
        skipped = present is not None and present.size == entry.size and present.sha256 == entry.sha256
        if not skipped:
            version.put_file(path, key, size=entry.size, sha256=entry.sha256)
        done += entry.size
        if on_progress:
            on_progress(TransferEvent(rel, entry.size, skipped, index, len(entries), done, total))
    manifest = Manifest(
        model=model,
        target=target,
        recipe=recipe,
        build_key=build_key,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files=entries,
        engine=engine,
        lineage=lineage,
    )
    if version.put_bytes_if_absent(constants.STORE_MANIFEST, manifest.to_bytes()):
        return manifest, True
    # Another writer published this build key between our check and our put: theirs is the version.
    winner = read_manifest(version)
    if winner is None:
        raise RegistryError(f"{version.uri}: manifest create was refused but no manifest is there; retry")
    return winner, False


def download_version(
    version: Store, output_dir: Path, manifest: Manifest, on_progress: ProgressFn | None = None
) -> Path:
    """Download every manifest file into ``output_dir`` and verify size + sha256; all or nothing.

    Files land in a temp sibling dir that is renamed into place only after every checksum matched, so
    a tampered or truncated file leaves ``output_dir`` untouched. ``output_dir`` must not exist or be empty.
    """
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise KilnInputError(
            f"{output_dir}: output dir exists and is not empty; choose a new dir or remove it"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.kiln-", dir=output_dir.parent))
    try:
        done = 0
        for index, entry in enumerate(manifest.files, start=1):
            rel = safe_relpath(entry.path, version.uri)
            local = staging / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                version.get_file(f"{FILES_DIR}/{rel}", local)
            except FileNotFoundError:
                raise IntegrityError(
                    f"{version.uri}: {rel} is listed in the manifest but missing from the store; "
                    "the version is damaged - republish it"
                ) from None
            size = local.stat().st_size
            actual = sha256_file(local)
            if size != entry.size or actual != entry.sha256:
                raise IntegrityError(
                    f"{version.uri}/{FILES_DIR}/{rel}: checksum mismatch (expected sha256 {entry.sha256}, "
                    f"{entry.size} bytes; got {actual}, {size} bytes): the stored file was modified or "
                    "corrupted; nothing was written to the output dir. Republish the version or fetch "
                    "another."
                )
            done += entry.size
            if on_progress:
                on_progress(
                    TransferEvent(
                        rel, entry.size, False, index, len(manifest.files), done, manifest.total_bytes
                    )
                )
        (staging / FETCHED_MANIFEST).write_bytes(manifest.to_bytes())
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def verify_dir(engine_dir: Path) -> Manifest:
    """Re-check a fetched dir against the manifest fetch left in it (before loading it on a server)."""
    record = engine_dir / FETCHED_MANIFEST
    if not record.is_file():
        raise IntegrityError(f"{engine_dir}: no {FETCHED_MANIFEST}; fetch the engine with `kiln fetch` first")
    manifest = Manifest.from_bytes(record.read_bytes(), str(record))
    for entry in manifest.files:
        path = engine_dir / safe_relpath(entry.path, str(record))
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            raise IntegrityError(
                f"{path}: missing or does not match its sha256 {entry.sha256}; fetch the engine again"
            )
    return manifest


def list_version_keys(store: Store, model: str, target: str) -> list[str]:
    """Build keys under ``<model>/<target>/`` that are complete versions (have a manifest)."""
    keys = store.list_dirs(f"{model}/{target}")
    return [
        key for key in keys if store.stat(f"{model}/{target}/{key}/{constants.STORE_MANIFEST}") is not None
    ]
