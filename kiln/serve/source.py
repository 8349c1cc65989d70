"""What ``kiln serve`` serves: an engine dir, or a registry reference fetched (and verified) for this machine.

A reference (``NAME@production``, ``NAME@v3``; with ``--target T`` the registered model ``NAME.T``) is
resolved to its version first, then fetched with :func:`kiln.registry.fetch` (which refuses an engine this
machine's GPU or toolchain cannot run and verifies every sha256) into
``$KILN_HOME/serving/<registered model>/v<N>-<manifest sha>``. A later start of the same version reuses that
copy only while its manifest still is the registered one, and ``kiln serve`` re-verifies every file
(``kiln.registry.fetch.verify_if_fetched``) before the engine loads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kiln import constants
from kiln.errors import IntegrityError, KilnInputError, NotPromotableError


@dataclass(frozen=True)
class Served:
    engine_dir: Path
    model_name: str
    """The name clients put in ``model`` (the registered model, or the engine dir's name)."""
    source: str


def resolve(
    model: str, target: str | None, *, tracking_uri: str | None = None, cache_root: Path | None = None
) -> Served:
    """The engine dir to serve for ``model`` (a dir, ``NAME@ALIAS`` or ``NAME@vN``)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if target is not None:
            raise KilnInputError(
                f"--target {target} names a registered model's target; {model} is an engine dir "
                "(drop --target)"
            )
        return Served(path.resolve(), path.resolve().name, str(path.resolve()))
    if "@" not in model:
        raise KilnInputError(
            f"{model!r}: neither an engine dir nor a registry reference NAME@ALIAS / NAME@vN "
            "(e.g. smollm2@production --target cpu)"
        )
    return _fetch(
        model,
        target,
        tracking_uri or constants.default_tracking_uri(),
        cache_root or constants.kiln_home() / "serving",
    )


def _fetch(ref_text: str, target: str | None, tracking_uri: str, cache_root: Path) -> Served:
    from kiln.registry import fetch
    from kiln.registry import mlflow_registry as R
    from kiln.registry import naming as N
    from kiln.registry.store import FETCHED_MANIFEST

    ref = N.parse_ref(ref_text)
    name = N.registered_model_name(ref.name, target)
    selector = ref.alias or ref.version or ""
    with R.mlflow_errors(tracking_uri, f"serve {name}@{selector}"):
        mv = R.get_version(R.client(tracking_uri), name, selector)
    tags = mv.tags or {}
    version = str(mv.version)
    # what fetch refuses for an alias, checked before the cache
    if ref.alias and tags.get(N.TAG_GATES) == "failed":
        raise NotPromotableError(
            f"{name}@{selector} points at v{version}, which failed its gates; move the alias"
        )
    expected = tags.get(N.TAG_MANIFEST_SHA256) or ""
    dest = cache_root / name / f"v{version}-{expected[:12] or 'unverified'}"
    record = dest / FETCHED_MANIFEST
    if record.is_file() and expected and hashlib.sha256(record.read_bytes()).hexdigest() != expected:
        raise IntegrityError(
            f"{dest}: its manifest is not the one registered with {name} v{version}; remove the dir "
            "and serve again (it is fetched anew)"
        )
    if not record.is_file():
        # the version resolved above, pinned: an alias moving meanwhile cannot swap what lands in dest
        fetch(f"{ref.name}@v{version}", target, dest, tracking_uri=tracking_uri)
    return Served(dest, name, f"{name}@{selector} (v{version})")
