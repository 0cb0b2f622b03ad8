"""The process's worker starter: fork-server round trips, off every pool's lock.

A pool that wants a worker counts it as *starting* and asks the starter
(`Starter.request`, under the pool's lock: it never waits). The starter's
thread (``pool_manager-starter``) makes the round trips to the fork server
one at a time (the server forks one at a time anyway) and hands each result
back to its pool (``pool._start_one()``, which takes the pool's lock only to
file the new worker). A pool whose workers fail to start asks to be called
again after a back-off (`Starter.call_at`; ``pool._start_retry_due()``).

The thread runs while there is something to start or a retry is due, and
ends when there is neither. It holds pools weakly between calls: a pool
collected with a start queued is skipped.

Locks: the starter's ``_lock`` is innermost (nothing is called under it).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Protocol

from . import _process, _threads

logger = logging.getLogger("pool_manager")

__all__ = ["StartClient", "Starter", "get_starter"]


class StartClient(Protocol):
    """What the starter needs of a pool (its methods take the pool's lock themselves)."""

    def _start_one(self) -> None: ...

    def _start_retry_due(self) -> None: ...


class Starter:
    """The worker starter of this process (see the module docstring); `get_starter`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wanted = threading.Condition(self._lock)
        self._queue: deque[weakref.ReferenceType[Any]] = deque()  # one entry per start
        #: Retries due: (time.monotonic(), order, pool).
        self._timers: list[tuple[float, int, weakref.ReferenceType[Any]]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def request(self, pool: StartClient) -> None:
        """Start one worker for ``pool`` (which counts it as starting). Never waits.

        Raises:
            RuntimeError: no thread to start it on (out of threads).
        """
        with self._lock:
            self._serve_locked()
            self._queue.append(weakref.ref(pool))

    def call_at(self, when: float, pool: StartClient) -> None:
        """Call ``pool._start_retry_due()`` at ``time.monotonic()`` ``when``. Never waits.

        Raises:
            RuntimeError: no thread to call it on.
        """
        with self._lock:
            self._serve_locked()
            heapq.heappush(self._timers, (when, next(self._order), weakref.ref(pool)))

    def _serve_locked(self) -> None:
        """(Holds _lock) Make sure the thread runs, and looks again."""
        if self._thread is not None:
            self._wanted.notify()
            return
        thread = threading.Thread(target=self._serve, name="pool_manager-starter", daemon=True)
        with _process.signals_blocked():
            thread.start()  # (RuntimeError: the caller queues nothing)
        self._thread = thread

    def thread(self) -> threading.Thread | None:
        return self._thread

    def _serve(self) -> None:
        _threads.mark_library_thread(service=True)
        with self._lock:
            try:
                while True:
                    ref = None
                    retry = False
                    if self._timers and self._timers[0][0] <= time.monotonic():
                        ref = heapq.heappop(self._timers)[2]
                        retry = True
                    elif self._queue:
                        ref = self._queue.popleft()
                    elif self._timers:
                        self._wanted.wait(self._timers[0][0] - time.monotonic())
                        continue
                    else:
                        return
                    pool = ref()
                    if pool is None:
                        continue
                    self._lock.release()
                    try:
                        if retry:
                            pool._start_retry_due()
                        else:
                            pool._start_one()
                    except Exception:  # (a bug: the pool reports its own failures)
                        logger.critical("pool_manager: a worker start failed", exc_info=True)
                    finally:
                        del pool
                        _threads.run_deferred()  # (futures settled by the start, too)
                        self._lock.acquire()
            finally:
                if self._thread is threading.current_thread():
                    self._thread = None


_starter = Starter()


def get_starter() -> Starter:
    """This process's worker starter."""
    return _starter


def _new_starter_in_child() -> None:
    global _starter
    _starter = Starter()  # (the parent's thread and queue are not the child's)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_starter_in_child)
