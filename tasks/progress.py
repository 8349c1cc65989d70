"""Step progress for whoever is watching in this process (the ``kiln build`` CLI draws it with rich).

Tasks report each step's start and end here; every finished step is also a line in the Prefect run's log
(what the run page shows), a failed one at WARNING.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class StepEvent:
    """One step's progress: ``status`` is ``running``, ``done``, ``reused``, ``skipped`` or ``failed``."""

    step: str
    detail: str
    status: str = "running"
    seconds: float = 0.0
    note: str = ""
    started: float = field(default_factory=time.perf_counter)


Listener = Callable[[StepEvent], None]
_listeners: list[Listener] = []
started_runs: dict[str, str] = {}
"""Prefect flow and task run ids that ran a step in this process -> ``flow`` | ``task`` (what an interrupted
``kiln build`` marks Cancelled)."""


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this process's step events to ``listener`` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def _send(event: StepEvent) -> None:
    for listener in list(_listeners):
        listener(event)
    if event.status != "running":
        _log_to_run(event)


def _remember_runs() -> None:
    from prefect.runtime import flow_run, task_run

    for kind, run_id in (("flow", flow_run.id), ("task", task_run.id)):
        if run_id:
            started_runs[str(run_id)] = kind


def _log_to_run(event: StepEvent) -> None:
    import logging

    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:  # called outside a flow or task run: nothing to attach the line to
        return
    level = logging.WARNING if event.status in ("failed", "cancelled") else logging.INFO
    logger.log(level, "%s %s %s (%.1fs)%s", event.status, event.step, event.detail, event.seconds,
               f": {event.note}" if event.note else "")


@contextlib.contextmanager
def step(name: str, detail: str = "") -> Iterator[StepEvent]:
    """Report a step; the body may set ``event.status = "reused"`` (cache hit) and ``event.note``."""
    event = StepEvent(name, detail)
    _remember_runs()
    _send(event)
    try:
        yield event
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        event.status = "cancelled" if interrupted else "failed"
        event.note = "interrupted" if interrupted else f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        event.seconds = time.perf_counter() - event.started
        _send(event)
        raise
    if event.status == "running":
        event.status = "done"
    event.seconds = time.perf_counter() - event.started
    _send(event)
