"""The promote and rollback flows: move a registered model's ``production`` alias forward or back.

Serving fetches ``<model>.<target>@production``; these flows are the only way it moves, each move
recorded in the registry with who, when and why (``kiln versions`` shows the history).
"""

from __future__ import annotations

from prefect import flow

from kiln.tasks.registry import promote_version, rollback_version


@flow(name="kiln-promote")
def promote(
    model_name: str, version: str, reason: str, target: str | None = None, tracking_uri: str | None = None
) -> dict:
    """Promote ``<model_name>.<target>`` v``version`` (or ``candidate``) to production; refuses failed
    gates."""
    return promote_version(model_name, version, target, reason=reason, tracking_uri=tracking_uri)


@flow(name="kiln-rollback")
def rollback(
    model_name: str, reason: str, target: str | None = None, tracking_uri: str | None = None
) -> dict:
    """Point ``<model_name>.<target>@production`` back at the version it held before the current one."""
    return rollback_version(model_name, target, reason=reason, tracking_uri=tracking_uri)
