"""Every error a user of pool_manager can meet, in one place.

Each class says what happened; its message says what to do about it.
"""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "PoolManagerError",
    "ManagerShutDownError",
    "PoolShutDownError",
    "FactoryError",
    "WorkerPoolBrokenError",
]


class PoolManagerError(Exception):
    """Base class of the errors that pool_manager raises itself."""


class ManagerShutDownError(PoolManagerError, RuntimeError):
    """`get_pool` (or `lease`) was called on a manager after `shutdown()`.

    A shut-down manager builds no pools; create a new `WorkerPoolManager`.
    """


class PoolShutDownError(PoolManagerError, RuntimeError):
    """`submit` or `map` was called on a pool that is shut down or disposed.

    It is a `RuntimeError`, as `ProcessPoolExecutor` raises. A pool from a
    manager is disposed once its lease is released and it expires or retires:
    take a new lease with `get_pool` instead of keeping the pool object.
    """


class FactoryError(PoolManagerError, TypeError):
    """A pool factory returned something that is not a `WorkerPool`."""


class WorkerPoolBrokenError(PoolManagerError, BrokenProcessPool):
    """A worker process died and the tasks that were in flight with it failed.

    A ``concurrent.futures.process.BrokenProcessPool`` (so a ``BrokenExecutor``),
    as ``ProcessPoolExecutor`` raises.

    The pool replaces its workers on the next `submit`: submit the failed
    tasks again if they are safe to repeat. The message names what loky saw.
    """
