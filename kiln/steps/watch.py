"""Watch: resolve a profile's hub revision (branch or tag) to its commit sha; name where the last is kept."""

from __future__ import annotations

import hashlib

from kiln.profiles import HubModel


def variable_name(profile: str, repo_id: str, revision: str) -> str:
    """Prefect Variable names allow [a-z0-9_-]: hash the (profile, repo, revision) triple into one."""
    digest = hashlib.sha256(f"{profile}\0{repo_id}\0{revision}".encode()).hexdigest()[:16]
    return f"kiln_watch_{digest}"


def current_sha(model: HubModel) -> str:
    """The commit sha ``model.revision`` points at on the hub now."""
    from huggingface_hub import HfApi

    from kiln import constants

    return HfApi(endpoint=constants.hf_endpoint()).model_info(model.repo_id, revision=model.revision).sha
