"""The build's steps, free of Prefect: each one is key -> compute -> reuse -> gate.

``kiln.tasks`` wraps each in a ``@task`` (retries, timeouts) and ``kiln.flows`` composes them into the DAG;
``kiln quantize`` and ``kiln compile`` call the same functions without Prefect. Content keys and reuse go
through :class:`kiln.cache.StepCache`, so an identical rebuild reuses every step on any worker sharing
``KILN_HOME``.

| step | module | key | reuse | gate |
|---|---|---|---|---|
| load + pre-flight | ``request`` | - | - | pre-flight refusals |
| download | ``download`` | the commit sha | huggingface_hub's cache | model-dependent pre-flight |
| calibration data | ``data`` | token sha256s | - | calibration vs held-out disjoint |
| quantize | ``checkpoint`` | ``checkpoint_key`` | cached perplexity serves | ``max_ppl_increase_pct`` |
| compile | ``engine`` | ``engine_key`` | cached engine dir | - |
| validate | ``validate`` | ``validation_key`` | cached measurements | the recipe's gates, every run |
| register | ``register`` | the engine key | the version already registered | passing engines only |
"""

from kiln.hub import ModelSnapshot
from kiln.steps.checkpoint import BASELINE, Checkpoint
from kiln.steps.data import Datasets
from kiln.steps.engine import EngineRef
from kiln.steps.outcome import Outcome
from kiln.steps.validate import Measurement, Validation

__all__ = [
    "BASELINE",
    "Checkpoint",
    "Datasets",
    "EngineRef",
    "Measurement",
    "ModelSnapshot",
    "Outcome",
    "Validation",
]
