"""The promote flow: move a registered model's ``production`` alias to a version that passed its gates."""

from __future__ import annotations

from prefect import flow

from kiln.tasks.registry import promote_version


@flow(name="kiln-promote")
def promote(model_name: str, version: str, reason: str, target: str | None = None,
            tracking_uri: str | None = None) -> dict:
    """Promote ``<model_name>.<target>`` v``version`` (or ``model_name`` itself without a target) to production."""
    return promote_version(model_name, version, target, reason=reason, tracking_uri=tracking_uri)
