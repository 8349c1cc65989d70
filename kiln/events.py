"""The two events that start a build: a watched model's revision moved, or a retraining run finished.

Both are Prefect events (the ``build`` deployment's triggers in ``prefect.yaml`` match them), emitted
by the ``watch`` flow or by pipelines that are not Prefect through ``kiln emit`` / :func:`emit`.

Event shape (what a trigger or an automation can rely on):

- name: ``kiln.model.revision-changed`` or ``kiln.retraining.completed``
- resource: ``{"prefect.resource.id": "kiln.model.<repo_id>", "kiln.repo-id": <repo_id>}``
- payload: ``{"repo_id": str, "revision": str, "profile": str | None}``; ``revision`` is the new
  commit sha (or branch/tag) and ``profile`` the build request to run (path as the worker sees it,
  or None for the ``build`` deployment's default profile).

This is the one module of ``kiln/`` that talks to Prefect: the event bus is Prefect's. It needs a
Prefect API (``PREFECT_API_URL``); without one Prefect would start a throwaway server and the event
would reach nobody, so :func:`emit` refuses instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kiln.errors import KilnInputError

REVISION_CHANGED = "kiln.model.revision-changed"
RETRAINING_COMPLETED = "kiln.retraining.completed"
EVENTS: dict[str, str] = {"revision-changed": REVISION_CHANGED, "retraining-completed": RETRAINING_COMPLETED}
RESOURCE_PREFIX = "kiln.model."


@dataclass(frozen=True)
class ModelEvent:
    """What a build trigger receives."""

    event: str
    repo_id: str
    revision: str
    profile: str | None = None

    @property
    def resource(self) -> dict[str, str]:
        return {"prefect.resource.id": RESOURCE_PREFIX + self.repo_id, "kiln.repo-id": self.repo_id}

    @property
    def payload(self) -> dict[str, str | None]:
        return {"repo_id": self.repo_id, "revision": self.revision, "profile": self.profile}


def model_event(event: str, repo_id: str, revision: str, profile: str | None = None) -> ModelEvent:
    """Validate an event's fields; ``event`` is a full name or a short one (``revision-changed``)."""
    name = EVENTS.get(event, event)
    if name not in EVENTS.values():
        raise KilnInputError(f"unknown event {event!r}; allowed: {', '.join(EVENTS)} (or their full names)")
    if not repo_id.strip():
        raise KilnInputError(
            "repo_id is empty: pass the model repo (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    if not revision.strip():
        raise KilnInputError("revision is empty: pass the new commit sha, branch or tag")
    return ModelEvent(name, repo_id.strip(), revision.strip(), profile or None)


def emit(event: str, repo_id: str, revision: str, profile: str | None = None, *, flush: bool = True) -> str:
    """Send a kiln model event to the Prefect API named by ``PREFECT_API_URL``; returns the event id.

    ``flush`` waits until the event has left this process (for scripts that exit right after);
    inside a flow run leave it off: the run sends its events when it ends.
    """
    message = model_event(event, repo_id, revision, profile)
    from prefect.settings import PREFECT_API_URL

    if not (os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()):
        raise KilnInputError(
            "PREFECT_API_URL is not set: events go to a running Prefect server "
            "(e.g. PREFECT_API_URL=http://127.0.0.1:4200/api); the embedded default has none to trigger"
        )
    from prefect.events import emit_event

    sent = emit_event(event=message.event, resource=message.resource, payload=message.payload)
    if sent is None:
        raise KilnInputError(
            "Prefect did not send the event: check PREFECT_API_URL and that the server is up"
        )
    if flush:
        _flush_events()
    return str(sent.id)


def _flush_events() -> None:
    """Events are sent by a background worker: wait until it has handed ours to the server."""
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
