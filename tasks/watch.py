"""Watch a hub model's revision (branch or tag) and emit the event that rebuilds it when its sha moves."""

from __future__ import annotations

from prefect import task
from prefect.variables import Variable

from kiln import events
from kiln.profiles import HubModel, load_request
from kiln.steps.watch import current_sha, variable_name
from kiln.tasks.options import NETWORK


@task(name="check-revision", timeout_seconds=300, **NETWORK)
def check_revision(profile: str) -> dict:
    """Resolve the profile's model revision to a sha; emit ``kiln.model.revision-changed`` if it moved."""
    model = load_request(profile).model
    if not isinstance(model, HubModel):
        return {"profile": profile, "skipped": "local model: nothing to watch"}
    sha = current_sha(model)
    name = variable_name(profile, model.repo_id, model.revision)
    last = Variable.get(name, default=None)
    changed = last is not None and last != sha
    if changed:
        events.emit(events.REVISION_CHANGED, model.repo_id, sha, profile, flush=False)
    if last != sha:
        Variable.set(name, sha, overwrite=True)
    return {
        "profile": profile,
        "repo_id": model.repo_id,
        "revision": model.revision,
        "sha": sha,
        "previous": last,
        "changed": changed,
    }
