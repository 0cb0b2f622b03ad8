"""A manager's map: each key's pool, the retired ones, and when each is next due.

As cachetools' ``TTLCache.expire(time)``, `PoolMap.take_due` removes what
is due and returns it, and the manager disposes of it outside its lock
(disposal waits for workers to stop). Expiry is ordered by deadline: the
deadlines are on a heap, so a sweep costs the pools it acts on, not the
number of keys.

Nothing here takes a lock or calls a pool beyond reading its counts
(`_PoolEntry.idle`): the manager holds its ``_lock`` around every call,
and that lock guards all of it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable

from ._records import (
    PoolState,
    _PoolEntry,
    _SweepPlan,
    ended_expired,
    ended_for_memory,
    ended_retired,
    ended_with_manager,
)

__all__ = ["PoolMap"]


class PoolMap:
    """The pools of a manager: in the map by key, retiring, and their deadlines."""

    def __init__(self, stale_after: float, max_lifetime: float) -> None:
        self.stale_after = stale_after  #: ``stale_pool_expiration``, seconds
        self.max_lifetime = max_lifetime  #: ``max_pool_lifetime``, seconds
        self.entries: dict[Hashable, _PoolEntry] = {}  #: the map: at most one pool per key
        self.retiring: set[_PoolEntry] = set()  #: retired, disposed once released and done
        # (clock time, tie-breaker, key, entry serial): when a pool is next worth a look.
        self._deadlines: list[tuple[float, int, Hashable, int]] = []
        self._order = itertools.count()

    def add(self, entry: _PoolEntry) -> None:
        """A pool just built enters the map; it is due for retirement at its lifetime."""
        self.entries[entry.key] = entry
        self.push_deadline(entry, entry.created + self.max_lifetime)

    def push_deadline(self, entry: _PoolEntry, deadline: float) -> None:
        """Schedule a check of ``entry`` at clock time ``deadline``."""
        # Key and serial, not the entry: a disposed pool is not kept alive here.
        heapq.heappush(self._deadlines, (deadline, next(self._order), entry.key, entry.serial))

    def expires_after_use(self, entry: _PoolEntry) -> None:
        """``entry`` was last used at ``last_used``: check it a stale period on."""
        self.push_deadline(entry, entry.last_used + self.stale_after)

    def retire(self, entry: _PoolEntry) -> bool:
        """``entry`` leaves the map for the retiring pools.

        Returns True if it is idle already: the supervisor should look now.
        (The caller reports the retirement once the manager's lock is
        released: a log handler may call back into the manager.)
        """
        del self.entries[entry.key]
        entry.state = PoolState.RETIRING
        # (A pool its user shut down keeps its own message: the pool ignores this.)
        entry.ended = ended_retired(entry.key, self.max_lifetime)
        self.retiring.add(entry)
        return entry.idle()

    def take_due(self, now: float) -> _SweepPlan:
        """Retirement and expiry of the pools in the map whose deadline is due.

        Pools older than ``max_lifetime`` are retired; idle ones unused for
        ``stale_after`` leave the map, to be disposed (``due``). Only what is
        due comes off the heap; an entry is pushed again when its deadline
        moves, and stale pushes are skipped (lazy invalidation).
        """
        plan = _SweepPlan()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, key, serial = heapq.heappop(deadlines)
            entry = self.entries.get(key)
            if entry is None or entry.serial != serial:
                continue  # retired, expired or replaced since it was pushed
            if now >= entry.created + self.max_lifetime:
                plan.wake = self.retire(entry) or plan.wake
                plan.retired.append((entry.key, now - entry.created))
            elif entry.idle():
                if entry.mapping:
                    entry.mapping = False  # its map ended since the last look
                    entry.last_used = now
                if now >= entry.last_used + self.stale_after:
                    del self.entries[entry.key]
                    unused = now - entry.last_used
                    entry.ended = ended_expired(entry.key, unused)
                    plan.expired.append((entry.key, unused))
                    plan.due.append(entry)
                else:
                    self.expires_after_use(entry)
            elif entry.only_maps_open():
                # In use by its map's consumer as of now. Nothing reports
                # the iterator's end (it may be collected on any thread,
                # under any lock): look again a stale period on.
                entry.mapping = True
                entry.last_used = now
                self.push_deadline(entry, now + self.stale_after)
            # Leased or busy: releasing the lease or finishing the work pushes it.
        plan.next_deadline = deadlines[0][0] if deadlines else None
        return plan

    def take_retired_done(self, now: float, plan: _SweepPlan) -> None:
        """Retired pools released and done join ``plan.due``.

        One kept busy only by an open lazy ``map`` is looked at again a
        stale period on (``plan.next_deadline``).
        """
        for entry in list(self.retiring):
            if entry.idle():
                self.retiring.discard(entry)
                plan.due.append(entry)
            elif entry.only_maps_open():
                recheck = now + self.stale_after
                if plan.next_deadline is None or recheck < plan.next_deadline:
                    plan.next_deadline = recheck

    def take_least_recently_used_idle(self, available: int, minimum: int) -> _PoolEntry | None:
        """The idle pool in the map used least recently, out of the map (None: none
        idle), to free memory: ``available`` bytes, below ``minimum``."""
        idle = [e for e in self.entries.values() if e.idle()]
        if not idle:
            return None
        victim = min(idle, key=lambda e: e.last_used)
        del self.entries[victim.key]
        victim.ended = ended_for_memory(victim.key, available, minimum)
        return victim

    def take_all(self, how: str) -> list[_PoolEntry]:
        """Every pool in the map and retiring, out of both: their manager was ``how``
        (``"shut down"``, ``"terminated"``)."""
        ending = [*self.entries.values(), *self.retiring]
        for entry in ending:
            entry.ended = ended_with_manager(entry.key, how)
        self.entries.clear()
        self.retiring.clear()
        return ending
