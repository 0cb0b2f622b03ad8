"""The one module that touches loky.

loky gives us a robust process executor, but two of the things this library
needs are not in its public API, and both live here, behind small functions
that the tests pin down:

* growth in place: loky starts ``max_workers`` processes on the first submit
  and has no public resize (its ``_resize`` waits for every pending task).
  We build the executor for the pool's full ``max_size`` (so its call queue
  is sized for it), then lower ``_max_workers`` to the workers granted so far
  before anything starts. Raising it later is picked up by loky's own
  ``_ensure_executor_running`` on the next submit, which starts only the
  missing workers and disturbs none of the running ones.
* introspection: the live worker pids, and whether loky flagged the executor
  broken.

These rely on loky 3.7's internals: the dependency range in pyproject.toml is
pinned to that minor series for this reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import loky
from loky import process_executor as _executor_module
from loky.backend import reduction as _reduction
from loky.backend.context import get_context
from loky.process_executor import BrokenProcessPool, ShutdownExecutorError

__all__ = [
    "BrokenProcessPool",
    "LokyExecutor",
    "ShutdownExecutorError",
    "cpu_count",
    "dumps",
    "kill_worker",
    "register_exit_hook",
    "signals_blocked",
    "resolve_context",
]


_START_METHODS = ("loky", "loky_init_main", "spawn", "fork", "forkserver")


def cpu_count() -> int:
    """The CPUs this process may use (cgroup and affinity aware, as loky counts)."""
    return int(loky.cpu_count())


def resolve_context(mp_context: object) -> Any:
    """Map a ``ProcessPoolExecutor``-style ``mp_context`` onto loky's context.

    Accepts ``None`` (loky's default start method), a start-method name, or a
    ``multiprocessing`` context object (its start method is used with loky's
    own process and queue machinery).
    """
    if mp_context is None:
        return None
    if isinstance(mp_context, str):
        method = mp_context
    else:
        get_start_method = getattr(mp_context, "get_start_method", None)
        if not callable(get_start_method):
            raise TypeError(
                "mp_context must be None, a start method name or a multiprocessing "
                f"context, not {type(mp_context).__name__}"
            )
        method = get_start_method()
    if method not in _START_METHODS:
        raise ValueError(
            f"mp_context start method {method!r} is not supported by loky; "
            f"use one of {', '.join(_START_METHODS)}"
        )
    return get_context(method)


def dumps(obj: object) -> bytes:
    """Pickle with loky's pickler: cloudpickle, plus loky's reducers.

    Those reducers send bound methods by reference (``getattr(owner, name)``,
    as the standard pickle does) where plain cloudpickle would copy the
    function by value and lose its source file, and with it the lines of a
    worker's traceback.
    """
    buffer = io.BytesIO()
    _reduction.dump(obj, buffer)
    return buffer.getvalue()


_exit_hooks: list[Callable[[], object]] = []
_exit_hooks_ran = False


def register_exit_hook(hook: Callable[[], object]) -> None:
    """Run ``hook()`` at interpreter exit *before* loky's own exit handler.

    loky's handler waits for every accepted task. It registers itself with
    ``threading._register_atexit`` each time an executor starts, and those
    run in reverse order, so ours is registered again after each start
    (`_hooks_after_loky`) and runs once.
    """
    _exit_hooks.append(hook)


def _run_exit_hooks() -> None:
    global _exit_hooks_ran
    if _exit_hooks_ran:
        return
    _exit_hooks_ran = True
    for hook in _exit_hooks:
        hook()


def _hooks_after_loky() -> None:
    with contextlib.suppress(RuntimeError):  # the interpreter is already shutting down
        threading._register_atexit(_run_exit_hooks)  # type: ignore[attr-defined]


#: Signals our background threads never take: the kernel delivers a
#: process-directed signal to any thread that does not block it, and Python
#: runs its handler only in the main thread, which a signal that landed on
#: another thread does not wake from a sleep or a blocking call.
MAIN_THREAD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread for the block (threads started inherit it)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def kill_worker(pid: int) -> None:
    """SIGKILL one worker process (loky then replaces the executor's workers)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class _PoolExecutor(loky.ProcessPoolExecutor):  # type: ignore[misc]
    """loky's executor, with workers that run `_worker_loop` instead of loky's own.

    Only the worker's main loop changes; everything the parent does (queues,
    the manager thread, crash detection) is loky's. The loop speaks loky's
    protocol (call items in, result items and exit notices out) and adds a
    check after each task: a worker that has run its ``max_tasks_per_worker``
    or grown past ``max_worker_memory`` leaves the way loky's own recycling
    does, so that no task fails and loky starts a replacement.
    """

    def _adjust_process_count(self) -> None:
        # loky's body, with our target (loky 3.7: process_executor.py).
        while len(self._processes) < self._max_workers:
            worker_exit_lock = self._context.BoundedSemaphore(1)
            args = (
                self._call_queue,
                self._result_queue,
                self._initializer,
                self._initargs,
                self._processes_management_lock,
                self._timeout,
                worker_exit_lock,
                _executor_module._CURRENT_DEPTH + 1,
            )
            worker_exit_lock.acquire()
            try:
                process = self._context.Process(target=_worker_loop, args=args, env=self._env)
            except TypeError:
                process = self._context.Process(target=_worker_loop, args=args)
            process._worker_exit_lock = worker_exit_lock
            process.start()
            self._processes[process.pid] = process


def _worker_loop(
    call_queue: Any,
    result_queue: Any,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    processes_management_lock: Any,
    timeout: float | None,
    worker_exit_lock: Any,
    current_depth: int,
) -> None:
    """A worker process's main loop (runs in the worker)."""
    from . import _worker

    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            _executor_module.LOGGER.critical("Exception in initializer:", exc_info=True)
            return  # the parent sees the worker die and flags the executor broken
    _executor_module._CURRENT_DEPTH = current_depth
    pid = os.getpid()
    while True:
        try:
            call_item = call_queue.get(block=True, timeout=timeout)
        except queue.Empty:
            # Idle too long: leave, unless the parent is starting workers now.
            if not processes_management_lock.acquire(block=False):
                continue
            processes_management_lock.release()
            _worker.leaving_idle()
            call_item = None
        except BaseException:
            # The call item did not unpickle: tell the parent, which breaks the
            # executor (our payloads are bytes, so this is loky's own failure).
            previous = traceback.format_exc()
            with contextlib.suppress(BaseException):
                result_queue.put(_executor_module._RemoteTraceback(previous))
            sys.exit(1)
        if call_item is None:
            result_queue.put(pid)  # a clean exit: the executor is not broken
            worker_exit_lock.acquire(True, timeout=30)
            _executor_module._python_exit()
            return
        try:
            result = call_item()
        except BaseException as error:
            wrapped = _executor_module._ExceptionWithTraceback(error)
            result_queue.put(_executor_module._ResultItem(call_item.work_id, exception=wrapped))
        else:
            _executor_module._sendback_result(result_queue, call_item.work_id, result=result)
            del result
        del call_item
        if _worker.should_retire():
            result_queue.put(_executor_module._RecycledWorkerPid(pid))
            with worker_exit_lock:
                return


class LokyExecutor:
    """One ``loky.ProcessPoolExecutor`` whose worker count can grow in place.

    Construction starts no process; the first ``submit`` starts the workers
    allowed so far, and later submits start any that were allowed since.
    """

    __slots__ = ("_executor", "_manager_thread", "_workers", "crash_report")

    def __init__(
        self,
        *,
        max_size: int,
        workers: int,
        idle_timeout: float | None,
        context: Any,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        env: dict[str, str] | None,
    ) -> None:
        self._executor = _PoolExecutor(
            max_workers=max_size,
            timeout=idle_timeout,
            context=context,
            initializer=initializer,
            initargs=initargs,
            env=env,
        )
        self._workers = max_size
        self._manager_thread: threading.Thread | None = None
        #: Filled in by the pool when the executor breaks (see dead_workers).
        self.crash_report: (
            tuple[dict[int, tuple[int, int | None, bool, int, int]], set[int]] | None
        ) = None
        self.set_workers(workers)

    def set_workers(self, workers: int) -> None:
        """Allow ``workers`` processes; they start on the next submit (or `start_workers`).

        Lowering it stops no process: loky 3.7 only ever compares
        ``len(processes) < _max_workers`` before starting one, so workers
        above the new count live on until they leave (`release_idle_worker`,
        the retire counter of ``_worker``, or their idle timeout) and are not
        replaced. 0 (only under a worker budget) starts none: tasks wait.
        """
        if workers < 0:
            raise ValueError("a loky executor cannot have a negative worker count")
        self._executor._max_workers = workers
        self._workers = workers

    def start_workers(self) -> None:
        """Start the workers allowed but not running, if this executor has work."""
        executor = self._executor
        # loky's submit starts its manager thread and the workers under this
        # lock, reading the worker count then: either it has run (and we start
        # what it did not), or it will see the new count.
        with executor._flags.shutdown_lock:
            if executor._flags.shutdown or executor._flags.broken is not None:
                return
            if executor._executor_manager_thread is None or not executor._pending_work_items:
                return  # never submitted to: the first submit starts them
            executor._ensure_executor_running()
            # The manager thread waits on the sentinels of the workers it knew:
            # wake it so that it watches the new ones too (or a crash goes unseen).
            executor._executor_manager_thread_wakeup.wakeup()

    def release_idle_worker(self) -> bool:
        """Ask one idle worker to leave cleanly (loky's shutdown message, ``None``).

        The worker that takes it leaves between tasks: no task is lost. Lower
        the worker count first, or loky replaces it when work is pending.
        Returns False if the message could not be queued (queue full, or the
        executor not running).
        """
        executor = self._executor
        thread = executor._executor_manager_thread
        if thread is None or not thread.is_alive():
            return False
        with executor._flags.shutdown_lock:
            if executor._flags.shutdown or executor._flags.broken is not None:
                return False
            try:
                executor._call_queue.put_nowait(None)
            except queue.Full:
                return False
        return True

    @property
    def workers(self) -> int:
        return self._workers

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        """Submit ``fn(*args)``; may start worker processes (tens of ms each)."""
        if self._manager_thread is None:
            # The first submit starts loky's threads: they inherit this
            # thread's signal mask, so block SIGINT/SIGTERM for the moment.
            with signals_blocked():
                future: Future[Any] = self._executor.submit(fn, *args)
        else:
            future = self._executor.submit(fn, *args)
        if self._manager_thread is None:
            # Kept so that a later shutdown(wait=True) can still join it after
            # loky's own shutdown(wait=False) dropped its reference.
            thread = self._manager_thread = self._executor._executor_manager_thread
            # loky words a worker's recycling as a memory leak and warns once;
            # ours are by design (max_tasks_per_worker, max_worker_memory).
            thread.recycling_warned = True
            _hooks_after_loky()
        return future

    @property
    def broken(self) -> bool:
        """True once loky has flagged the executor broken (a worker died)."""
        return self._executor._flags.broken is not None

    def worker_pids(self) -> list[int]:
        """The pids of the worker processes alive now."""
        processes = getattr(self._executor, "_processes", None) or {}
        return [pid for pid, process in list(processes.items()) if process.is_alive()]

    def dead_workers(self) -> dict[int, int | None]:
        """Pid -> exit code of the workers that have exited.

        Called from a done-callback of a future that loky failed because the
        executor broke: loky fails every future *before* it kills the
        surviving workers, so at that moment these are the workers that died
        of their own accord (or by our kill).
        """
        processes = getattr(self._executor, "_processes", None) or {}
        return {
            pid: process.exitcode
            for pid, process in list(processes.items())
            if process.exitcode is not None
        }

    def shutdown(self, wait: bool) -> None:
        """Stop the executor; with ``wait``, until its threads and workers are gone."""
        self._executor.shutdown(wait=wait)
        if wait and self._manager_thread is not None:
            self._manager_thread.join()

    @property
    def finished(self) -> bool:
        """True when the executor's manager thread has exited (or never started)."""
        thread = self._manager_thread
        return thread is None or not thread.is_alive()
