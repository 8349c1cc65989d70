"""Load + pre-flight: the request validated, and every cheap check done before any work."""

from __future__ import annotations

from pathlib import Path

from kiln import progress
from kiln.errors import KilnInputError
from kiln.profiles import BuildRequest, load_request


def load_and_preflight(
    profile: str | dict | BuildRequest, revision: str | None = None, repo_id: str | None = None
) -> BuildRequest:
    """Validate the request and every cheap check (recipe x target, registry reachable) before any work."""
    with progress.step("preflight", str(profile) if not isinstance(profile, dict | BuildRequest) else ""):
        request = pin_event_revision(load_request(profile), revision, repo_id)
        from kiln.preflight import check_request_static
        from kiln.registry.publish import check_registry

        check_request_static(
            request, source=str(profile) if isinstance(profile, str | Path) else request.name
        )
        check_registry(request.registry)
        return request


def pin_event_revision(request: BuildRequest, revision: str | None, repo_id: str | None) -> BuildRequest:
    """Build the revision an event named (a new commit of the watched repo) instead of the profile's."""
    if not revision:
        return request
    model = request.model
    if not hasattr(model, "repo_id"):
        raise KilnInputError(
            f"revision {revision!r} given, but request {request.name!r} builds a local dir "
            f"({model.local_dir}); events can pin revisions of hub models only"
        )
    if repo_id and repo_id != model.repo_id:
        raise KilnInputError(
            f"the event is for {repo_id!r}, but request {request.name!r} builds {model.repo_id!r}: "
            "emit it with the matching profile"
        )
    return request.model_copy(update={"model": model.model_copy(update={"revision": revision})})
