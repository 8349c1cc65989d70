"""Download: the revision pinned to a commit sha, then the model-dependent pre-flight."""

from __future__ import annotations

from kiln import progress
from kiln.hub import ModelSnapshot, fetch_model, inspect_model
from kiln.profiles import BuildRequest


def download(request: BuildRequest) -> ModelSnapshot:
    """Pin the revision to a commit sha and fetch safetensors + config + tokenizer (huggingface_hub
    caches)."""
    from kiln.preflight import check_model

    with progress.step(
        "download", getattr(request.model, "repo_id", None) or str(request.model.local_dir)
    ) as ev:
        snapshot = fetch_model(request.model)
        # model-dependent pre-flight (tp vs heads, memory) once the snapshot is known: before any calibration
        check_model(request, inspect_model(snapshot.path), source=request.name)
        ev.note = f"sha {snapshot.sha[:12]}"
        return snapshot
