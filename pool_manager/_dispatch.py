"""Dispatch decisions, as pure functions: what kind a task is, how long that
kind takes, and how many tasks a worker is handed at once.

A pool hands a worker the task it runs and, for short tasks, a few more
(prefetch), so that the worker never waits for the parent between two
short tasks; long tasks go one at a time, so that those still queued can be
cancelled and go to whichever worker frees first. How short is measured
per *kind* of task (the code it runs), as the pool's results come back.
Nothing here takes a lock or knows of workers: `BaseWorkerPool` calls these
under its own lock, and tests call them directly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from ._worker import run_chunk, run_chunk_single

__all__ = [
    "LONG_TASK",
    "MAX_DEPTH",
    "MAX_TASK_KINDS",
    "PREFETCH_SECONDS",
    "RunTimes",
    "batch_size",
    "task_kind",
]

#: Tasks sent to a worker ahead of the one it runs cover about this many
#: seconds of work (by the measured run time of their kind) ...
PREFETCH_SECONDS = 0.002
#: ... never more than this many tasks in a worker's hands, nor in one message.
MAX_DEPTH = 64
#: Tasks longer than this (seconds, measured) are sent one at a time.
LONG_TASK = 0.02
#: Kinds of task whose run time a pool keeps (the oldest is forgotten first).
MAX_TASK_KINDS = 256
#: The weight of a new measure in a kind's running average.
NEW_MEASURE_WEIGHT = 0.2


def task_kind(fn: Callable[..., Any], args: tuple[Any, ...]) -> object:
    """Tasks of one kind take about as long: the same code (for ``map``'s
    chunks, the code mapped; for a ``functools.partial``, the function)."""
    if (fn is run_chunk or fn is run_chunk_single) and args:
        return ("chunk", task_kind(args[0], ()))
    while isinstance(fn, functools.partial):
        fn = fn.func
    kind = getattr(fn, "__code__", None)
    if kind is not None:
        return kind
    try:
        hash(fn)
    except TypeError:
        return type(fn)
    return fn


class RunTimes:
    """Each kind of task's run time, a running average (seconds), for up to
    `MAX_TASK_KINDS` kinds."""

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        self._seconds: dict[object, float] = {}

    def __len__(self) -> int:
        return len(self._seconds)

    def get(self, kind: object) -> float | None:
        """The average run time of ``kind``; None until one has run."""
        return self._seconds.get(kind)

    def observe(self, kind: object, seconds: float) -> None:
        """A task of ``kind`` ran for ``seconds`` (in its worker)."""
        times = self._seconds
        average = times.get(kind)
        if average is None:
            if len(times) >= MAX_TASK_KINDS:
                del times[next(iter(times))]  # the oldest kind
            times[kind] = seconds
        else:
            times[kind] = average + NEW_MEASURE_WEIGHT * (seconds - average)

    def depth(self, kind: object) -> int:
        """How many tasks of ``kind`` a worker may hold (the one it runs, and more).

        One until the kind's run time is known (a pool warmed by other tasks
        does not hand out a backlog of long ones in advance), and for long
        tasks; else enough to cover `PREFETCH_SECONDS`, at most `MAX_DEPTH`.
        """
        average = self._seconds.get(kind)
        if average is None or average >= LONG_TASK:
            return 1
        return min(MAX_DEPTH, 1 + math.ceil(PREFETCH_SECONDS / max(average, 1e-6)))


def batch_size(room: int, queued: int, workers: int) -> int:
    """How many queued tasks to send a worker with ``room`` for more, now.

    Its fair part of the queue among the pool's ``workers`` (so that one
    worker does not take a backlog another idle one could start on), within
    its room and `MAX_DEPTH`; always at least one.
    """
    share = math.ceil(queued / max(1, workers))
    return max(1, min(room, share, MAX_DEPTH))
