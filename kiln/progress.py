"""Step progress for whoever is watching in this process (the ``kiln build`` CLI draws it with rich).

Build steps (:mod:`kiln.steps`) report each step's start and end here. ``listening`` subscribes for a
block; ``observe`` subscribes for the process (``kiln.tasks`` adds the Prefect run log that way).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class StepEvent:
    """One step's progress: ``status`` is ``running``, ``done``, ``reused``, ``skipped``, ``failed`` or
    ``cancelled``."""

    step: str
    detail: str
    status: str = "running"
    seconds: float = 0.0
    note: str = ""
    started: float = field(default_factory=time.perf_counter)


Listener = Callable[[StepEvent], None]
_listeners: list[Listener] = []
_observers: list[Listener] = []


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send this process's step events to ``listener`` while the block runs."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def observe(observer: Listener) -> None:
    """Send every later step event of this process to ``observer`` (once per observer)."""
    if observer not in _observers:
        _observers.append(observer)


def _send(event: StepEvent) -> None:
    for listener in [*_observers, *_listeners]:
        listener(event)


@contextlib.contextmanager
def step(name: str, detail: str = "") -> Iterator[StepEvent]:
    """Report a step; the body may set ``event.status = "reused"`` (cache hit) and ``event.note``."""
    event = StepEvent(name, detail)
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
