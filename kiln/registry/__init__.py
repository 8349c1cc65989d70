"""Publish engines as immutable versions (artifact store + MLflow), move aliases, fetch for serving.

API for the build flow (call in this order)::

    check_registry(registry: Registry) -> None
        # before any GPU work: store and tracking server reachable and writable.
        # RegistryConfigError (exit 2: bad URI, missing bucket, no permission) or RegistryError.
    publish(engine_dir, *, registry, build_key, lineage, metrics, params, artifacts, passed_gates,
            recommended, recipe=None, target=None, on_progress=None) -> PublishedVersion(name, version, uri,
            reused)
        # idempotent by build_key; recipe/target default to lineage["recipe"] / lineage["target"].
        # `candidate` moves only when passed_gates and recommended; failed builds get a version
        # tagged kiln.gates=failed that can never be promoted.

Serving side (also the `kiln promote|rollback|fetch|versions` commands)::

    promote(name, version, target=None, *, reason=None, tracking_uri=None) -> VersionInfo
    rollback(name, target=None, *, reason=None, tracking_uri=None) -> VersionInfo
    fetch(name_at_alias, target, output_dir, force=False, *, tracking_uri=None, on_progress=None) -> Path
    list_versions(name, target=None, *, tracking_uri=None) -> list[VersionInfo]
    verify_dir(engine_dir) -> Manifest          # re-check a fetched dir before loading it

Naming (see :mod:`kiln.registry.naming`): registered model ``<model>.<target>``, versions are builds
(one per recipe x build key), aliases ``candidate`` / ``production``; store prefix
``<store>/<model>/<target>/<build key>/{files/..., manifest.json}``. ``tracking_uri`` defaults to
``MLFLOW_TRACKING_URI`` or the SQLite DB under KILN_HOME.
"""

from kiln.registry.fetch import (
    ForcedFetchWarning,
    UnrecordedAliasWarning,
    compatibility_problems,
    fetch,
    machine_profile,
)
from kiln.registry.lifecycle import alias_warnings, list_versions, promote, rollback
from kiln.registry.mlflow_registry import VersionInfo
from kiln.registry.publish import PublishedVersion, check_registry, publish
from kiln.registry.store import Manifest, TransferEvent, open_store, verify_dir

__all__ = [
    "ForcedFetchWarning",
    "UnrecordedAliasWarning",
    "Manifest",
    "PublishedVersion",
    "TransferEvent",
    "VersionInfo",
    "check_registry",
    "compatibility_problems",
    "fetch",
    "alias_warnings",
    "list_versions",
    "machine_profile",
    "open_store",
    "promote",
    "publish",
    "rollback",
    "verify_dir",
]
