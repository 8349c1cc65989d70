"""The Prefect side of step progress (:mod:`kiln.progress`): every finished step is also a line in the
Prefect run's log (what the run page shows), a failed one at WARNING, and the runs that ran a step are
remembered (what an interrupted ``kiln build`` marks Cancelled)."""

from __future__ import annotations

import logging

from kiln import progress

started_runs: dict[str, str] = {}
"""Prefect flow and task run ids that ran a step in this process -> ``flow`` | ``task``."""


def to_prefect(event: progress.StepEvent) -> None:
    """Remember the runs a step starts in; log each finished step to its run."""
    if event.status == "running":
        _remember_runs()
    else:
        _log_to_run(event)


def _remember_runs() -> None:
    from prefect.runtime import flow_run, task_run

    for kind, run_id in (("flow", flow_run.id), ("task", task_run.id)):
        if run_id:
            started_runs[str(run_id)] = kind


def _log_to_run(event: progress.StepEvent) -> None:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:  # called outside a flow or task run: nothing to attach the line to
        return
    level = logging.WARNING if event.status in ("failed", "cancelled") else logging.INFO
    logger.log(
        level,
        "%s %s %s (%.1fs)%s",
        event.status,
        event.step,
        event.detail,
        event.seconds,
        f": {event.note}" if event.note else "",
    )


progress.observe(to_prefect)
