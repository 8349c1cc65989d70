"""The watch flow (cron): resolve each watched hub model's revision; emit ``kiln.model.revision-changed`` on
a move.

The last sha seen per (profile, repo, revision) is kept in a Prefect Variable, so the first run only
records it and every later run compares against it.
"""

from __future__ import annotations

from prefect import flow

from kiln.tasks.watch import check_revision


@flow(name="kiln-watch")
def watch(profiles: list[str]) -> list[dict]:
    """Check every hub model of ``profiles``; returns one row per profile (repo, sha, changed)."""
    return [check_revision(profile) for profile in profiles]
