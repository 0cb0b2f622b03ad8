"""The ``done`` callable of a lease (`_Lease`), and the checks of a lease's arguments."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from ._durations import to_count
from ._records import _PoolEntry

if TYPE_CHECKING:
    from .manager import WorkerPoolManager

__all__ = ["_Lease", "_check_lease"]


class _Lease:
    """The ``done`` callable that `WorkerPoolManager.get_pool` returns.

    Calling it releases the lease on the pool; calling it again does nothing.
    """

    __slots__ = ("_entry", "_manager", "_released")

    def __init__(self, manager: WorkerPoolManager, entry: _PoolEntry) -> None:
        self._manager = manager
        self._entry = entry
        self._released = False

    def __call__(self) -> None:
        self._manager._release(self)

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<lease on {self._entry.key!r}, {state}>"


def _check_lease(key: Hashable, send_size: int, factory: object) -> None:
    """Check `WorkerPoolManager.get_pool_with_factory`'s arguments (raises as it says)."""
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"key must be hashable, not {type(key).__name__}") from None
    to_count("send_size", send_size, minimum=0)
    if not callable(factory):
        raise TypeError(f"factory must be callable, not {type(factory).__name__}")
