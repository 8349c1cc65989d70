"""Registry steps outside a build: move ``production`` forward (promote) or back (rollback).

Both talk to the tracking server, so they retry transient failures with backoff; a refused move (the
version failed its gates, its files are gone, nothing to roll back to) fails once with the reason.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from kiln.tasks.options import NETWORK


@task(name="promote", timeout_seconds=600, **NETWORK)
def promote_version(
    model_name: str, version: str, target: str | None, *, reason: str, tracking_uri: str | None = None
) -> dict:
    """Move ``production`` onto a version that passed its gates; the registry records who, when and why."""
    from kiln.registry import promote

    return asdict(promote(model_name, version, target, reason=reason, tracking_uri=tracking_uri))


@task(name="rollback", timeout_seconds=600, **NETWORK)
def rollback_version(
    model_name: str, target: str | None, *, reason: str, tracking_uri: str | None = None
) -> dict:
    """Move ``production`` back to the version it held before the current one (recorded like a promote)."""
    from kiln.registry import rollback

    return asdict(rollback(model_name, target, reason=reason, tracking_uri=tracking_uri))
