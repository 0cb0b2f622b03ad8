"""The process's pools (`BaseWorkerPool`), for what acts on all of them: the
exit hooks (``_signals.py``: the pools that have started workers), the pools
kept alive while they have unfinished tasks, and the fork hook (in a forked
child, every pool it inherited goes inert).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

from . import _signals

if TYPE_CHECKING:
    from .pool import BaseWorkerPool

#: Pools that have started workers, for the exit hooks (_signals.py). (Typed
#: ``object``: the pool's mixins add it, `_pool_start._WorkerStarts`.)
_live_pools: weakref.WeakSet[object] = weakref.WeakSet()
_signals.configure_pools(lambda: list(_live_pools))
#: The pools with unfinished tasks: held here, so that a pool dropped with
#: work still does it (its futures settle, their callbacks run), as a
#: ``ProcessPoolExecutor`` does; once idle, a pool nothing refers to is
#: collected (see `_pool_io._Remains`).
_busy_pools: set[BaseWorkerPool] = set()
#: Every pool of this process, for the fork hook below.
_all_pools: weakref.WeakSet[BaseWorkerPool] = weakref.WeakSet()


def _inert_in_forked_child() -> None:
    """(In a child just forked from this process) what it inherited goes inert.

    Each pool's sockets and pipes belong to the parent's workers and I/O
    thread: the child closes its copies (so the fork server and the workers
    still see the parent go, and a child never reads the parent's replies),
    and the exit hook no longer sees the pools. Using one raises
    `UsedAfterForkError`; shutting one down does nothing. No lock is taken:
    another thread of the parent may have held one at the fork.
    """
    for pool in list(_all_pools):
        pool._close_inherited()
    _live_pools.clear()
    _all_pools.clear()
    _busy_pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_inert_in_forked_child)
