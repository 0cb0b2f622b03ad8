"""What ``ProcessPoolExecutor`` code expects of a pool, beyond ``Executor``.

`BaseWorkerPool` takes ``ProcessPoolExecutor``'s arguments and shows its
private views, which code (and CPython's own ``concurrent.futures`` tests)
reads: this module holds those shims, so the pool's own code need not.

- ``mp_context``: a start method or a ``multiprocessing`` context is
  accepted and checked (`resolve_start_method`); every worker starts from
  the fork server whatever it names.
- ``max_tasks_per_child``: an alias of ``max_tasks_per_worker`` (the pool's
  constructor takes both).
- ``_max_workers`` and ``_processes``: the pool's properties of those names;
  each worker is seen as a ``multiprocessing.Process`` (`ProcessView`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Protocol

from ._process import kill_worker

__all__ = ["START_METHODS", "ProcessView", "resolve_start_method"]

#: The start methods ``mp_context`` may name: every worker starts from the
#: fork server whatever is named.
START_METHODS = ("fork", "forkserver", "spawn", "loky", "loky_init_main")


def resolve_start_method(mp_context: object) -> str | None:
    """Check a ``ProcessPoolExecutor``-style ``mp_context``; returns its start method.

    Raises:
        TypeError: not None, a string, or a ``multiprocessing`` context.
        ValueError: a start method not in `START_METHODS`.
    """
    if mp_context is None:
        return None
    if isinstance(mp_context, str):
        method = mp_context
    else:
        get_start_method = getattr(mp_context, "get_start_method", None)
        if not callable(get_start_method):
            raise TypeError(
                "mp_context must be None, a start method name or a multiprocessing "
                f"context, not {type(mp_context).__name__}"
            )
        method = get_start_method()
    if method not in START_METHODS:
        raise ValueError(
            f"mp_context start method {method!r} is not supported; use one of "
            f"{', '.join(START_METHODS)} (workers always start from the fork server)"
        )
    return str(method)


class _WorkerState(Protocol):
    """What `ProcessView` reads of a pool's worker record."""

    pid: int
    status: int | None

    @property
    def ended(self) -> bool: ...


class ProcessView:
    """A worker seen as a ``multiprocessing.Process`` (pid, exitcode, is_alive, join,
    terminate, kill), as ``ProcessPoolExecutor._processes`` holds them."""

    def __init__(self, worker: _WorkerState) -> None:
        self._worker = worker
        self.pid = worker.pid

    @property
    def exitcode(self) -> int | None:
        return self._worker.status if self._worker.ended else None

    def is_alive(self) -> bool:
        return not self._worker.ended

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._worker.ended and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        kill_worker(self.pid)
