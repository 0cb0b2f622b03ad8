"""The loky pools' watch: one thread that ends a slot whose task ran past its
deadline, or whose worker grew past ``kill_worker_memory``.

loky knows no deadline and no hard memory limit, and the fork server's I/O
loop (which enforces both for `BaseWorkerPool`) waits on pipes, which not
every platform can: this thread waits on a condition and the clock, and
reads memory with `memory.resident_memory`, so it runs wherever loky does.
Enforced from outside the worker, so C code holding the GIL cannot escape.

A pool asks to be watched (`watch`) when it hands a slot a task with a
deadline or starts a slot under a memory limit; the thread then calls the
pool's ``_watch()`` (no lock of the watch's held), which ends what is due
and answers how many seconds until it must be called again: ``math.inf``
(nothing due; a `watch` wakes the thread), or None (the pool is shut down
and has nothing left to watch: it is dropped). The thread runs only while
some pool is watched, and holds pools weakly: a pool collected is dropped.

Locks: the watch's lock is innermost (a pool calls `watch` under its own
lock; the thread calls into pools with no lock held).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import weakref
from typing import Protocol

from . import _process, _threads
from ._durations import wait_step

__all__ = ["Watched", "watch", "watching"]

logger = logging.getLogger("pool_manager")


class Watched(Protocol):
    def _watch(self) -> float | None: ...


class _Watch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._woken = threading.Condition(self._lock)  # signalled by `watch`
        self._pools: weakref.WeakSet[Watched] = weakref.WeakSet()  # (guarded by _lock)
        self._rounds: dict[int, int] = {}  # id(pool) -> `watch` calls, to tell new ones
        self._wake = False  # (under _lock) a `watch` came since the thread last looked
        self._thread: threading.Thread | None = None

    def watch(self, pool: Watched) -> None:
        """Watch ``pool`` from now on, and have it watched again at once (its
        ``_watch`` has something new). Never waits for anything but the lock.

        Raises:
            RuntimeError: the thread could not start (then nothing is watched).
        """
        with self._lock:
            self._pools.add(pool)
            self._rounds[id(pool)] = self._rounds.get(id(pool), 0) + 1
            self._wake = True
            if self._thread is None:
                thread = threading.Thread(
                    target=self._serve, name="pool_manager-loky-watch", daemon=True
                )
                with _process.signals_blocked():
                    thread.start()
                self._thread = thread
            else:
                self._woken.notify()

    def thread(self) -> threading.Thread | None:
        return self._thread

    def _serve(self) -> None:
        _threads.mark_library_thread()
        while True:
            wait = self._round()
            with self._lock:
                if not self._pools:
                    self._thread = None  # (`watch` starts a new one)
                    return
                if not self._wake:
                    self._woken.wait(wait_step(None if wait == math.inf else wait))

    def _round(self) -> float:
        """Call every watched pool's ``_watch``; returns the seconds until the next
        round is due. (Its own frame: the pools are let go of as it returns.)"""
        with self._lock:
            self._wake = False
            pools = [(pool, self._rounds.get(id(pool), 0)) for pool in self._pools]
        wait = math.inf
        done = []
        for pool, round_ in pools:
            try:
                next_in = pool._watch()
            except Exception:  # (a bug: logged; the pool is watched on)
                logger.exception("pool_manager: watching %r failed", pool)
                next_in = 0.05
            if next_in is None:
                done.append((pool, round_))
            else:
                wait = min(wait, next_in)
        with self._lock:
            for pool, round_ in done:
                if self._rounds.get(id(pool)) == round_:  # (no `watch` since)
                    self._pools.discard(pool)
            live = {id(pool) for pool in self._pools}
            for key in [key for key in self._rounds if key not in live]:
                del self._rounds[key]  # (dropped or collected pools)
        return wait

    def _forget_in_child(self) -> None:
        self._lock = threading.Lock()
        self._woken = threading.Condition(self._lock)
        self._pools = weakref.WeakSet()
        self._rounds = {}
        self._wake = False
        self._thread = None


_watch = _Watch()


def watch(pool: Watched) -> None:
    """Have ``pool`` watched (see the module docstring)."""
    _watch.watch(pool)


def watching() -> threading.Thread | None:
    """The watch's thread, if it runs (for tests)."""
    return _watch.thread()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watch._forget_in_child)
