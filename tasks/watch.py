"""Watch a hub model's revision (branch or tag) and emit the event that rebuilds it when its sha moves."""

from __future__ import annotations

import hashlib

from prefect import task
from prefect.variables import Variable

from kiln import events
from kiln.profiles import HubModel, load_request
from kiln.tasks.build import NETWORK


def variable_name(profile: str, repo_id: str, revision: str) -> str:
    """Prefect Variable names allow [a-z0-9_-]: hash the (profile, repo, revision) triple into one."""
    digest = hashlib.sha256(f"{profile}\0{repo_id}\0{revision}".encode()).hexdigest()[:16]
    return f"kiln_watch_{digest}"


@task(name="check-revision", timeout_seconds=300, **NETWORK)
def check_revision(profile: str) -> dict:
    """Resolve the profile's model revision to a sha; emit ``kiln.model.revision-changed`` if it moved."""
    request = load_request(profile)
    model = request.model
    if not isinstance(model, HubModel):
        return {"profile": profile, "skipped": "local model: nothing to watch"}
    from huggingface_hub import HfApi

    from kiln import constants

    sha = HfApi(endpoint=constants.hf_endpoint()).model_info(model.repo_id, revision=model.revision).sha
    name = variable_name(profile, model.repo_id, model.revision)
    last = Variable.get(name, default=None)
    changed = last is not None and last != sha
    if changed:
        events.emit(events.REVISION_CHANGED, model.repo_id, sha, profile, flush=False)
    if last != sha:
        Variable.set(name, sha, overwrite=True)
    return {"profile": profile, "repo_id": model.repo_id, "revision": model.revision, "sha": sha,
            "previous": last, "changed": changed}
