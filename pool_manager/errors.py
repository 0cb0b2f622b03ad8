"""Every error a user of pool_manager can meet, in one place.

Each class says what happened; its message says what to do about it.
"""

from __future__ import annotations

import pickle
import signal
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ArgumentUnpicklingError",
    "FactoryError",
    "ManagerShutDownError",
    "PoolManagerError",
    "PoolShutDownError",
    "PoolTerminatedError",
    "ResultUnpicklingError",
    "TaskKilledError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "WorkerLostError",
    "WorkerMemoryError",
    "WorkerPoolBrokenError",
    "describe_exit",
]


def describe_exit(exitcode: int | None) -> str:
    """``-9`` → ``"killed by signal SIGKILL"``, ``3`` → ``"exit code 3"``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"killed by signal {name}"
    return f"exit code {exitcode}"


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


class PoolTerminatedError(PoolManagerError, RuntimeError):
    """The pool was terminated while this task was running: its result is lost.

    ``terminate()``, a Ctrl-C that ended the program, or a SIGTERM whose
    ``shutdown_grace`` ran out stop running tasks by ending their workers.
    """


class FactoryError(PoolManagerError, TypeError):
    """A pool factory returned something that is not a `WorkerPool`."""


class WorkerPoolBrokenError(PoolManagerError, BrokenProcessPool):
    """A task was lost because a worker process died.

    A ``concurrent.futures.process.BrokenProcessPool`` (so a ``BrokenExecutor``),
    as ``ProcessPoolExecutor`` raises. The pool itself is not broken: it has
    already replaced its workers. (Also raised, with the error as its cause,
    for every unfinished task of a pool whose I/O thread met an unexpected
    error: the pool ended its workers, and starts new ones for new tasks.)
    """


class WorkerLostError(WorkerPoolBrokenError):
    """The worker process running this task died (``os._exit``, a signal, the OOM killer).

    Only the task that was running in that worker fails; the pool's other
    tasks run to completion (some may run twice, see the README). ``pid`` and
    ``exitcode`` (negative: killed by that signal) say which worker and how;
    ``exitcode`` is ``None`` when it is not known.
    """

    def __init__(self, message: str, *, pid: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    @classmethod
    def for_worker(cls, pid: int, exitcode: int | None) -> WorkerLostError:
        return cls(
            f"worker process {pid} died ({describe_exit(exitcode)}) while running this "
            "task; the pool replaced it and its other tasks are unaffected",
            pid=pid,
            exitcode=exitcode,
        )


class TaskKilledError(WorkerLostError):
    """``pool.kill_task(future)`` stopped this task by killing its worker process."""


class WorkerMemoryError(WorkerLostError):
    """The worker running this task grew past ``kill_worker_memory`` and was ended.

    ``limit`` and ``size`` are in bytes. Lower the task's memory use, raise
    the limit, or set ``max_worker_memory`` so that workers are replaced
    between tasks before they reach it.
    """

    def __init__(self, message: str, *, pid: int, limit: int, size: int) -> None:
        super().__init__(message, pid=pid, exitcode=None)
        self.limit = limit
        self.size = size


class TaskTimeoutError(PoolManagerError, TimeoutError):
    """The task ran past its deadline (``task_timeout``); its worker was ended.

    A ``TimeoutError``. ``timeout`` is the deadline in seconds, ``pid`` the
    worker that was ended; the pool replaced it.
    """

    def __init__(self, message: str, *, pid: int, timeout: float) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout


class TaskUnpicklingError(PoolManagerError, pickle.UnpicklingError):
    """A task's arguments or result could not be unpickled; only that task failed."""


class ArgumentUnpicklingError(TaskUnpicklingError):
    """The task's function or arguments failed to unpickle in the worker process.

    They pickled in the parent but do not load in the worker: usually a class
    or module the worker cannot import, or a ``__setstate__`` that raises.
    The cause holds the worker's traceback.
    """


class ResultUnpicklingError(TaskUnpicklingError):
    """The task ran, but its result (or exception) failed to unpickle in the parent.

    The cause holds the parent's traceback.
    """
