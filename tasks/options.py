"""Task options shared by kiln's Prefect tasks: network steps retry what may pass later, local ones never."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from kiln.errors import is_retryable


def transient(exc: BaseException) -> bool:
    """Whether a network step's failure may pass on a retry (:func:`kiln.errors.is_retryable`)."""
    return is_retryable(exc)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:
        return transient(exc)
    return False


NETWORK = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_if_transient,
    cache_policy=NO_CACHE,
)
LOCAL = dict(
    cache_policy=NO_CACHE
)  # kiln.cache keys steps by content; Prefect's input hashing would re-hash tensors
