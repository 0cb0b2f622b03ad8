"""A manager's memory samples: when the next is due, and taking one.

At each sample (every ``memory_sample_interval`` seconds of the manager's
clock, run by `WorkerPoolManager.sweep`) every worker's RSS is read, and its
USS at one sample in `USS_EVERY`; what it finds goes into each pool's
`_PoolEntry` (for `WorkerPoolManager.stats`), and the workers that started
or left since the last sample are reported (`EventLog.worker_changes`).
What to do under memory pressure (``min_available_memory``) is the
manager's: it decides which pools leave its map.
"""

from __future__ import annotations

import threading

from . import memory
from ._events import EventLog
from ._poolmap import PoolMap

__all__ = ["USS_EVERY", "MemorySampler"]

#: USS is read at one memory sample in this many (it costs ~17x RSS to read).
USS_EVERY = 6


class MemorySampler:
    """The schedule of a manager's memory samples, and the sampling of ``pools``.

    ``lock`` is the manager's: it guards ``pools``, `next_sample`,
    `sampled_at` and the entries' ``memory`` and ``known_pids``. Samples are
    taken by one sweep at a time (the supervisor's, or a test's by hand).
    """

    def __init__(
        self, every: float | None, pools: PoolMap, lock: threading.Lock, events: EventLog
    ) -> None:
        self.every = every  #: seconds between two samples; None never samples
        self._pools = pools
        self._lock = lock
        self._events = events
        self.next_sample: float | None = None  #: clock time; None: sample at once
        self.sampled_at: float | None = None  #: clock time of the last sample
        self._taken = 0

    def due(self, now: float) -> bool:
        """A sample is due at clock time ``now``."""
        return self.every is not None and (self.next_sample is None or now >= self.next_sample)

    def sample(self, now: float) -> None:
        """Sample the workers of every pool (the map's and the retiring) at clock time ``now``.

        The next sample is then due an interval after ``now``.
        """
        assert self.every is not None
        with self._lock:
            self.next_sample = now + self.every
            entries = [*self._pools.entries.values(), *self._pools.retiring]
        unique = self._taken % USS_EVERY == 0
        self._taken += 1
        for entry in entries:
            pids = entry.pool.worker_pids()
            if not pids and entry.idle():
                # Its workers have all exited: release the executor's threads and pipes too.
                entry.pool.release_idle_resources()
            sample = memory.sample_workers(pids, unique=unique, previous=entry.memory)
            with self._lock:
                entry.memory = sample
                known, entry.known_pids = entry.known_pids, frozenset(pids)
            self._events.worker_changes(entry.key, entry.pool, known, entry.known_pids)
        with self._lock:
            self.sampled_at = now

    def next_deadline(self, deadline: float | None, has_pools: bool) -> float | None:
        """The earlier of ``deadline`` and the next sample (while there are pools to sample)."""
        sample_at = self.next_sample
        if (
            self.every is not None
            and sample_at is not None
            and has_pools
            and (deadline is None or sample_at < deadline)
        ):
            return sample_at
        return deadline
