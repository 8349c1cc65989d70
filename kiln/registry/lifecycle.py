"""Serving-side lifecycle: list versions, promote to ``production``, roll back (the CLI's functions)."""

from __future__ import annotations

import hashlib
from typing import Any

from kiln import constants
from kiln.errors import IntegrityError
from kiln.registry import mlflow_registry as R
from kiln.registry import naming as N
from kiln.registry.mlflow_registry import VersionInfo
from kiln.registry.store import open_store


def _tracking(tracking_uri: str | None) -> str:
    return tracking_uri or constants.default_tracking_uri()


def _check_files(mv: Any) -> None:
    """Promote only a version whose manifest is still in the store, unchanged since registration."""
    raw = open_store(mv.source).get_bytes(constants.STORE_MANIFEST)
    if raw is None:
        raise IntegrityError(
            f"{mv.name} v{mv.version}: no manifest at {mv.source}; its files are gone - "
            "rerun the build that published it before promoting"
        )
    expected = (mv.tags or {}).get(N.TAG_MANIFEST_SHA256)
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise IntegrityError(
            f"{mv.source}: the manifest changed since {mv.name} v{mv.version} was registered"
        )


def promote(
    name: str,
    version: str,
    target: str | None = None,
    *,
    reason: str | None = None,
    tracking_uri: str | None = None,
) -> VersionInfo:
    """Point ``production`` of ``<name>.<target>`` at ``version`` (a number or an alias such as
    ``candidate``).

    Refuses versions that failed their gates or are not completely published (NotPromotableError),
    and versions whose files are gone from the store (IntegrityError). A no-op if already production.
    """
    registered = N.registered_model_name(name, target)
    info, _ = R.promote(
        _tracking(tracking_uri), registered, str(version), reason=reason, check_files=_check_files
    )
    return info


def rollback(
    name: str, target: str | None = None, *, reason: str | None = None, tracking_uri: str | None = None
) -> VersionInfo:
    """Move ``production`` back to the version it held before the current one (repeatable, like undo)."""
    info, _ = R.rollback(_tracking(tracking_uri), N.registered_model_name(name, target), reason=reason)
    return info


def list_versions(
    name: str, target: str | None = None, *, tracking_uri: str | None = None
) -> list[VersionInfo]:
    """Versions of ``name`` on every target (or one), newest first, with aliases, gates and run metrics."""
    return R.list_versions(_tracking(tracking_uri), name, target)


def alias_warnings(name: str, target: str | None = None, *, tracking_uri: str | None = None) -> list[str]:
    """Aliases of the model's registered models that were moved outside kiln (no recorded who/when/why)."""
    uri = _tracking(tracking_uri)
    mlflow_client = R.client(uri)
    with R.mlflow_errors(uri, f"check aliases of {name}"):
        return [
            line
            for registered in R.registered_names(uri, name, target)
            for line in R.unrecorded_aliases(mlflow_client, registered)
        ]
