"""Every error a user of pool_manager can meet, in one place.

Each class says what happened; its message says what to do about it.
"""

from __future__ import annotations

import concurrent.futures
import pickle
import signal
import sys
from concurrent.futures.process import BrokenProcessPool

__all__ = [
    "ArgumentUnpicklingError",
    "EngineUnavailableError",
    "FactoryError",
    "ForkServerError",
    "ManagerShutDownError",
    "PoolManagerError",
    "PoolShutDownError",
    "PoolTerminatedError",
    "ResultTimeoutError",
    "ResultUnpicklingError",
    "TaskKilledError",
    "TaskTimeoutError",
    "TaskUnpicklingError",
    "UsedAfterForkError",
    "WorkerLostError",
    "WorkerMemoryError",
    "WorkerPoolBrokenError",
    "WorkerStartError",
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
    take a new lease with `get_pool` instead of keeping the pool object. The
    message of a pool its manager ended names the key and why (expired,
    retired, disposed to free memory, the manager shut down); a pool shut
    down by its own ``shutdown`` says ``ProcessPoolExecutor``'s words.
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
    for every unfinished task of a pool whose I/O (on the I/O loop) met an
    unexpected error: the pool ended its workers, and starts new ones for new tasks.)
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


class WorkerStartError(WorkerPoolBrokenError):
    """No worker process could be started to run this task; it was not run.

    The cause (``__cause__``) says why: an ``OSError`` from the system
    (``EMFILE``/``ENFILE``: out of file descriptors; ``EAGAIN``: out of
    processes; ``ENOMEM``), which the pool retried with a short back-off
    before it gave up, or a `ForkServerError` (the fork server died as it
    started), which it did not retry. Only tasks that no live worker of the
    pool could take fail; the pool stays usable, and the next ``submit``
    tries to start a worker again.
    """

    @classmethod
    def for_cause(cls, cause: BaseException, seconds: float) -> WorkerStartError:
        """The error for tasks that ``cause`` kept from starting (``seconds``: retried so long)."""
        tried = f" (tried for {seconds:.1f}s)" if seconds > 0 else ""
        advice = ""
        if isinstance(cause, OSError):
            advice = ". Free what it names (file descriptors, processes, memory) and submit again"
        error = cls(
            f"could not start a worker process{tried}, so the task was not run: {cause}{advice}"
        )
        error.__cause__ = cause
        return error


class EngineUnavailableError(PoolManagerError, RuntimeError):
    """The engine asked for cannot run on this platform (the fork server needs
    ``os.fork``, ``socket.send_fds`` and ``os.memfd_create``: Linux). The
    message names what is missing and the engine to use instead (loky)."""


class ForkServerError(PoolManagerError, RuntimeError):
    """The fork server (the process that worker processes are forked from) failed to start.

    It exited (or hung) before it was ready, so no worker can start. Its
    message holds what the server printed (usually a traceback: a module on
    ``sys.path`` that shadows one it imports, a broken environment);
    ``output`` holds the same text, ``exitcode`` its exit status (negative:
    killed by that signal; ``None``: unknown). `WorkerPoolManager` raises it;
    a pool's tasks fail with `WorkerStartError` caused by it. The next
    attempt starts a new server.
    """

    def __init__(self, message: str, *, output: str = "", exitcode: int | None = None) -> None:
        super().__init__(message)
        self.output = output
        self.exitcode = exitcode


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


if sys.version_info >= (3, 11):

    class _TimeoutErrors(TimeoutError):
        """``TimeoutError``, which ``concurrent.futures.TimeoutError`` is from 3.11."""

else:

    class _TimeoutErrors(concurrent.futures.TimeoutError, TimeoutError):
        """Both ``TimeoutError`` classes: on 3.10 ``concurrent.futures`` has its own.

        Code written for ``ProcessPoolExecutor`` catches the one, code written
        for 3.11 and later the other.
        """


class TaskTimeoutError(PoolManagerError, _TimeoutErrors):
    """The task ran past its deadline (``task_timeout``); its worker was ended.

    A ``TimeoutError`` and a ``concurrent.futures.TimeoutError`` (two classes
    on 3.10, one from 3.11). ``timeout`` is the deadline in seconds, ``pid``
    the worker that was ended; the pool replaced it.
    """

    def __init__(self, message: str, *, pid: int, timeout: float) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout


class ResultTimeoutError(PoolManagerError, _TimeoutErrors):
    """A result was not ready within the ``timeout`` given to ``map`` or ``as_completed``.

    A ``TimeoutError`` and a ``concurrent.futures.TimeoutError`` (two classes
    on 3.10, one from 3.11), raised on iteration as ``Executor.map`` raises
    its timeout. The tasks keep running; ``map`` cancels those not started.
    Give a larger ``timeout``, or ``None`` to wait for as long as they take.
    """


class TaskUnpicklingError(PoolManagerError, pickle.UnpicklingError, BrokenProcessPool):
    """A task's arguments or result could not be unpickled; only that task failed.

    A ``pickle.UnpicklingError`` and a ``BrokenProcessPool`` (so a
    ``BrokenExecutor``): ``ProcessPoolExecutor`` raises ``BrokenProcessPool``
    for a poison argument or result, so code that catches it still does.
    Unlike there, the pool is not broken: its other tasks run on.
    """


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


class UsedAfterForkError(PoolManagerError, RuntimeError):
    """A manager or pool was used in a process forked from the one that built it.

    After a fork (``os.fork``, ``multiprocessing``'s fork start method, a
    pre-forking server such as gunicorn ``--preload`` or celery prefork),
    what the child inherited is inert: its workers, sockets and fork server
    belong to the parent. Build a new `WorkerPoolManager` (or pool) in the
    child, after the fork: gunicorn's ``post_fork`` hook, celery's
    ``worker_process_init`` signal, or the child's own code.
    """

    @classmethod
    def for_object(cls, what: str, built_in: int) -> UsedAfterForkError:
        import os

        return cls(
            f"this {what} was built in process {built_in}, and this process ({os.getpid()}) "
            "was forked from it: what a forked child inherits is inert (its workers belong "
            f"to the parent). Build a new {what} in this process, after the fork (gunicorn: "
            "in post_fork; celery: on worker_process_init; multiprocessing: in the child)"
        )
