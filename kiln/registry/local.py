"""``file://`` store: the embedded default under ``KILN_HOME/store``, or any shared filesystem.

Every file is written to a temp name, fsynced and renamed, so a reader never sees half a file; the
manifest is created with ``os.link`` (fails if the name exists), the filesystem's conditional put.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

from kiln.errors import IntegrityError, RegistryConfigError, RegistryError
from kiln.registry.store import ObjectStat, Store, sha256_file

_CHUNK = 8 * 1024 * 1024


class LocalStore(Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = root.as_uri()

    @classmethod
    def from_uri(cls, uri: str) -> LocalStore:
        parsed = urlparse(uri)
        path = Path(unquote(parsed.path))
        if parsed.netloc not in ("", "localhost") or not path.is_absolute():
            raise RegistryConfigError(
                f"store URI {uri!r}: a file store needs an absolute path, e.g. file:///srv/kiln/store"
            )
        return cls(path)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.root / prefix)

    def _path(self, key: str) -> Path:
        return self.root / key

    def check_writable(self) -> None:
        probe = self._path(f".kiln-probe/{uuid.uuid4().hex}")
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"kiln")
            ok = probe.read_bytes() == b"kiln"
            probe.unlink()
        except OSError as exc:
            raise RegistryConfigError(
                f"store {self.uri}: cannot write there ({exc.strerror}); fix the "
                "permissions or point store_uri / KILN_STORE_URI elsewhere"
            ) from None
        if not ok:
            raise RegistryConfigError(f"store {self.uri}: a probe file read back different bytes")

    def stat(self, key: str) -> ObjectStat | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return ObjectStat(size=path.stat().st_size, sha256=sha256_file(path))

    def put_file(self, local: Path, key: str, *, size: int, sha256: str) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        digest = hashlib.sha256()
        try:
            with local.open("rb") as src, tmp.open("wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha256:
                raise IntegrityError(
                    f"{local}: changed while it was being published (sha256 {digest.hexdigest()}, "
                    f"expected {sha256}); rebuild the engine and publish again"
                )
            os.replace(tmp, dest)
        except OSError as exc:  # disk full, permissions: name the store and the file, not just errno 28
            raise RegistryError(
                f"store {self.uri}: cannot write {key} ({exc.strerror}); free space or fix "
                "permissions there and publish again (files already uploaded are skipped)"
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with tmp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def get_file(self, key: str, local: Path) -> None:
        shutil.copyfile(self._path(key), local)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
