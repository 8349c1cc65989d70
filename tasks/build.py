"""The build DAG's steps up to compile as Prefect tasks: decorators over :mod:`kiln.steps`.

Every step that produces files (quantize, compile) or costs minutes (validate) runs through
:class:`kiln.cache.StepCache` under a key of its content inputs, so an identical rebuild reuses it.
Network steps (download, register) retry with exponential backoff; input errors never retry.
"""

from __future__ import annotations

from prefect import task

from kiln.hub import ModelSnapshot
from kiln.profiles import BuildRequest, Recipe, Target
from kiln.steps import Checkpoint, Datasets, EngineRef
from kiln.steps import checkpoint as checkpoint_step
from kiln.steps import data as data_step
from kiln.steps import download as download_step
from kiln.steps import engine as engine_step
from kiln.steps import request as request_step
from kiln.tasks.options import LOCAL, NETWORK, transient

__all__ = [
    "LOCAL",
    "NETWORK",
    "calibrate_and_quantize",
    "calibration_data",
    "compile_engine",
    "download",
    "load_and_preflight",
    "transient",
]


@task(name="load-and-preflight", **LOCAL)
def load_and_preflight(
    profile: str | dict | BuildRequest, revision: str | None = None, repo_id: str | None = None
) -> BuildRequest:
    """Validate the request and every cheap check (recipe x target, registry reachable) before any work."""
    return request_step.load_and_preflight(profile, revision, repo_id)


@task(name="download", timeout_seconds=3 * 3600, **NETWORK)
def download(request: BuildRequest) -> ModelSnapshot:
    """Pin the revision to a commit sha and fetch safetensors + config + tokenizer (huggingface_hub
    caches)."""
    return download_step.download(request)


@task(name="calibration-data", timeout_seconds=3600, **LOCAL)
def calibration_data(request: BuildRequest, snapshot: ModelSnapshot) -> Datasets:
    """Tokenise each recipe's calibration samples and the held-out text (checked disjoint from them)."""
    return data_step.calibration_data(request, snapshot)


@task(name="calibrate-and-quantize", timeout_seconds=6 * 3600, **LOCAL)
def calibrate_and_quantize(
    request: BuildRequest, snapshot: ModelSnapshot, recipe: Recipe, data: Datasets
) -> Checkpoint:
    """Calibrate once per recipe and export its checkpoints; over its perplexity gate, nothing."""
    return checkpoint_step.build_checkpoint(request, snapshot, recipe, data)


@task(name="compile", timeout_seconds=4 * 3600, **LOCAL)
def compile_engine(checkpoint: Checkpoint, target: Target, snapshot: ModelSnapshot) -> EngineRef:
    """Build (or reuse) the engine for one checkpoint on one target; it carries the model's tokenizer."""
    return engine_step.compile_engine(checkpoint, target, snapshot)
