"""Registry steps outside a build: promote a version to ``production`` (network: retried with backoff)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from kiln.tasks.build import NETWORK


@task(name="promote", timeout_seconds=600, **NETWORK)
def promote_version(model_name: str, version: str, target: str | None, *, reason: str,
                    tracking_uri: str | None = None) -> dict:
    """Move ``production`` onto a version that passed its gates; the registry records who, when and why."""
    from kiln.registry import promote

    return asdict(promote(model_name, version, target, reason=reason, tracking_uri=tracking_uri))
