"""What a `WorkerPoolManager` reports: each `PoolEvent`, logged and passed on.

Every event is a line on the ``"pool_manager"`` logger and, when the manager
has one, a call of its ``on_event`` callback (see `PoolEvent` for the kinds).
The manager never reports under its lock: a log handler or the callback may
call back into the manager.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

from . import _threads
from ._records import PoolEvent
from .pool import WorkerPool

logger = logging.getLogger("pool_manager")


class EventLog:
    """A manager's events: logged, then handed to ``on_event`` (if any)."""

    __slots__ = ("_clock", "_on_event")

    def __init__(
        self, on_event: Callable[[PoolEvent], object] | None, clock: Callable[[], float]
    ) -> None:
        self._on_event = on_event
        self._clock = clock

    def emit(
        self,
        level: int,
        kind: str,
        key: Hashable,
        message: str,
        *args: object,
        pid: int | None = None,
        reason: str = "",
    ) -> None:
        """Log an event and pass it to ``on_event``. Never called under the manager's lock."""
        logger.log(level, message, *args)
        callback = self._on_event
        if callback is None:
            return
        event = PoolEvent(
            kind, key, self._clock(), pid, reason, message % args if args else message
        )
        # On the supervisor or an I/O thread, nothing it raises may end the thread.
        _threads.call_guarded(callback, event, failed=f"the on_event callback failed for {kind}")

    # -- a pool's life -------------------------------------------------------

    def pool_built(self, key: Hashable, max_size: int) -> None:
        self.emit(
            logging.INFO, "pool_built", key, "pool built for key %r (max_size=%d)", key, max_size
        )

    def pool_retired(self, key: Hashable, age: float) -> None:
        self.emit(
            logging.INFO, "pool_retired", key, "pool for key %r retired after %.1fs", key, age
        )

    def pool_expired(self, key: Hashable, unused: float) -> None:
        self.emit(
            logging.INFO,
            "pool_expired",
            key,
            "pool for key %r expired after %.1fs unused",
            key,
            unused,
        )

    def pool_relieved(self, key: Hashable, available: int, min_available: int) -> None:
        self.emit(
            logging.WARNING,
            "pool_relieved",
            key,
            "memory pressure: %.0f MB available, below min_available_memory=%.0f MB: "
            "disposing the idle pool for key %r (least recently used)",
            available / 1e6,
            min_available / 1e6,
            key,
            reason="min_available_memory",
        )

    def pool_disposed(self, key: Hashable) -> None:
        self.emit(logging.INFO, "pool_disposed", key, "pool for key %r disposed", key)

    # -- its workers ---------------------------------------------------------

    def worker_lost(self, key: Hashable, kind: str, pid: int, reason: str) -> None:
        """(A pool's worker event callback, ``key`` bound.) A worker was lost."""
        self.emit(
            logging.WARNING,
            kind,
            key,
            "worker %d of the pool for key %r was lost: %s",
            pid,
            key,
            reason,
            pid=pid,
            reason=reason,
        )

    def worker_changes(
        self, key: Hashable, pool: WorkerPool, known: frozenset[int], now_alive: frozenset[int]
    ) -> None:
        """Events for the workers that started or left since the last sample."""
        for pid in sorted(now_alive - known):
            self.emit(
                logging.DEBUG,
                "worker_started",
                key,
                "worker %d started for the pool for key %r",
                pid,
                key,
                pid=pid,
            )
        for pid in sorted(known - now_alive):
            reason = pool.worker_exit_reason(pid)
            if reason is None:
                continue  # lost (already reported) or stopped with its pool
            kind = "worker_exited" if reason == "idle_timeout" else "worker_recycled"
            self.emit(
                logging.DEBUG if kind == "worker_exited" else logging.INFO,
                kind,
                key,
                "worker %d of the pool for key %r left (%s)",
                pid,
                key,
                reason,
                pid=pid,
                reason=reason,
            )
