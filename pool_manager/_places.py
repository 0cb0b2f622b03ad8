"""The busy places: ``WorkerPoolManager(..., max_busy_workers=N)``.

``max_total_workers`` (`pool_manager.budget`) caps the worker processes
alive (memory); this caps the ones running tasks at once (CPU), so that many
keys' warm pools never oversubscribe the machine. `BusySlots` hands the
places out and keeps the line of pools waiting for one; `PlaceRules` is the
time-slice policy a pool applies as it dispatches (`BUSY_QUANTUM`), so that
the places go round the pools with work. `PlacedPool` is what `BusySlots`
asks of a pool, `PlaceHolder` what the policy reads of a worker;
`BaseWorkerPool` implements both, and so do the stand-in pools of
``tests/test_budget_model.py``.

Everything here is re-exported by `pool_manager.budget`, the budget's
public home. `BusySlots`' lock is innermost (see the package docstring):
nothing is called under it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sized
from typing import Protocol, TypeVar

from ._durations import to_count

__all__ = ["BUSY_QUANTUM", "BusySlots", "PlaceHolder", "PlaceRules", "PlacedPool", "grant_places"]

#: Under ``max_busy_workers``, while another pool waits for a place, a worker
#: is handed more work only this many seconds after it took its place (then
#: it gives the place up once it has run what it holds): a time slice, so
#: that a hand-over's idle moment is paid once per slice, not once per task.
#: (Read at each dispatch, by `BusySlots.rules`, from this module: a test
#: that changes it patches ``pool_manager._places``, not ``budget``.)
BUSY_QUANTUM = 0.04


class PlacedPool(Protocol):
    """What a pool under ``max_busy_workers`` must do for `BusySlots`.

    `BusySlots` calls nothing on a pool under its lock: `BusySlots.give_back`
    and `BusySlots.leave` return the pools that were in line and are now
    handed a place, and their caller, once it holds no lock, calls
    `place_granted` on each.
    """

    def place_granted(self) -> None:
        """A place was handed to this pool (it was in line): take it for an
        idle or new worker and dispatch (`BusySlots.take` then returns True),
        and give back what it did not take (`BusySlots.give_back`, with a
        count of 0: a place handed and not taken goes back with it).

        Called with no lock held. It may call `BusySlots` again, and tell
        the pools that returns in turn.
        """
        ...


def grant_places(pools: list[PlacedPool]) -> None:
    """Tell each pool `BusySlots` handed a place (`BusySlots.give_back`,
    `BusySlots.leave`): call with no lock held."""
    for pool in pools:
        pool.place_granted()


class PlaceHolder(Protocol):
    """What the busy-place policy (`PlaceRules`, `BusySlots.places_to_release`)
    reads of a worker: ``_pool_io._Worker``."""

    @property
    def holds_place(self) -> bool:
        """It holds a place under ``max_busy_workers``."""
        ...

    @property
    def place_since(self) -> float:
        """``time.monotonic()`` it took that place."""
        ...

    @property
    def assigned(self) -> Sized:
        """The tasks in its hands (sent and not answered): empty when idle."""
        ...


_W = TypeVar("_W", bound=PlaceHolder)


class PlaceRules:
    """When a pool's workers give up their places under ``max_busy_workers``,
    and which busy worker may be handed more work: the policy for one
    dispatch of one pool (`BusySlots.rules`). The pool applies it.

    While another pool waits in line for a place, a worker works within a
    time slice of its place (`BUSY_QUANTUM`): once the slice is over, it is
    handed no more work, and gives its place back as soon as it is idle.
    With no pool waiting, a worker keeps its place while work comes
    (`BusySlots.places_to_release`).
    """

    __slots__ = ("now", "others_waiting", "quantum")

    def __init__(self, others_waiting: bool, now: float, quantum: float) -> None:
        self.others_waiting = others_waiting  #: another pool is in line (read once)
        self.now = now  #: time.monotonic() of the dispatch
        self.quantum = quantum  #: the time slice (`BUSY_QUANTUM`)

    def slice_over(self, workers: Iterable[_W]) -> list[_W]:
        """The idle workers whose place goes to the line now: another pool
        waits, and their time slice is over."""
        if not self.others_waiting:
            return []
        return [
            w
            for w in workers
            if w.holds_place and not w.assigned and self.now - w.place_since >= self.quantum
        ]

    def may_hand_more(self, worker: PlaceHolder) -> bool:
        """``worker`` (busy) may be handed more work: it holds a place, and no
        other pool waits or its time slice is not over."""
        return worker.holds_place and (
            not self.others_waiting or self.now - worker.place_since < self.quantum
        )


class BusySlots:
    """At most ``limit`` workers running tasks at once, across the pools that share it.

    ``max_total_workers`` caps the processes alive (memory); this caps the
    processes working (CPU), so that many keys' warm pools never
    oversubscribe the machine. A worker takes a place when it is handed
    work while idle, and gives it back when it has run all it was handed
    and its pool has no more on the way (`places_to_release`). A pool that
    finds no place free waits in line (first come, first served); a place
    given back goes to the first pool in line. While a pool waits, a worker
    elsewhere is handed more work only within a time slice of its place
    (`BUSY_QUANTUM`, `PlaceRules`), so the places go round the pools with
    work and no key starves another.

    The whole policy is here; a pool applies it (``BaseWorkerPool._dispatch``).
    The lock is innermost: pools call in holding their own lock, and the
    pool a place is handed to is told (`PlacedPool.place_granted`) with no
    lock held.
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = None if limit is None else to_count("max_busy_workers", limit, minimum=1)
        self._lock = threading.Lock()
        self._busy = 0  # places taken, including those handed to a pool in line
        self._line: dict[int, PlacedPool] = {}  # id(pool) -> pool, in order of arrival
        self._handed: dict[int, int] = {}  # id(pool) -> places handed to it, not taken yet

    @property
    def limit(self) -> int | None:
        return self._limit

    @property
    def has_waiters(self) -> bool:
        return bool(self._line)

    def others_waiting(self, pool: PlacedPool) -> bool:
        """Some pool other than ``pool`` waits for a place (a racy read: a hint)."""
        line = self._line
        return len(line) > (1 if id(pool) in line else 0)

    def counts(self) -> tuple[int | None, int, int]:
        """(limit, places taken, pools in line)."""
        with self._lock:
            return self._limit, self._busy, len(self._line)

    # -- the policy (pure: the pool applies it, under its own lock) ---------------

    def rules(self, pool: PlacedPool, now: float) -> PlaceRules:
        """The time-slice rules for one dispatch of ``pool`` at ``now``."""
        return PlaceRules(self.others_waiting(pool), now, BUSY_QUANTUM)

    @staticmethod
    def places_to_release(workers: Iterable[_W], more_coming: bool) -> list[_W]:
        """The workers whose place goes back now: each has run all it was
        handed, and no more work is on its way to their pool (``more_coming``:
        tasks queued, or a ``submit`` blocked by backpressure that will add
        one as soon as it wakes). Giving a place up between two tasks of a
        batch would cost a hand-over per task."""
        if more_coming:
            return []
        return [w for w in workers if w.holds_place and not w.assigned]

    # -- places ----------------------------------------------------------------

    def take(self, pool: PlacedPool) -> bool:
        """A place for one of ``pool``'s workers; False puts ``pool`` in line."""
        with self._lock:
            handed = self._handed.get(id(pool), 0)
            if handed:
                if handed == 1:
                    del self._handed[id(pool)]
                else:
                    self._handed[id(pool)] = handed - 1
                return True
            if self._limit is None or (self._busy < self._limit and not self._line):
                self._busy += 1
                return True
            self._line.setdefault(id(pool), pool)
            return False

    def give_back(self, pool: PlacedPool, count: int = 1) -> list[PlacedPool]:
        """``pool`` frees ``count`` places (and any handed to it but not taken).

        Returns the pools now handed a place: call `PlacedPool.place_granted`
        on each, with no lock held.
        """
        with self._lock:
            count += self._handed.pop(id(pool), 0)
            self._busy -= count
            return self._hand_out()

    def leave(self, pool: PlacedPool) -> list[PlacedPool]:
        """``pool`` needs no place any more (disposed): out of line, handed places back."""
        with self._lock:
            self._line.pop(id(pool), None)
            self._busy -= self._handed.pop(id(pool), 0)
            return self._hand_out()

    def _hand_out(self) -> list[PlacedPool]:
        """Which pool gets a free place: the first in line, one place each."""
        granted = []
        while self._line and (self._limit is None or self._busy < self._limit):
            key = next(iter(self._line))
            waiter = self._line.pop(key)
            self._handed[key] = self._handed.get(key, 0) + 1
            self._busy += 1
            granted.append(waiter)
        return granted
