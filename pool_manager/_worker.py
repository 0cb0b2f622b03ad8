"""Code that runs inside worker processes, and the task envelope both sides share.

A task crosses to the worker as ``run_task(task_id, payload)``: ``payload``
is the cloudpickled ``(fn, args, kwargs)``, loaded *inside* the task, so an
argument that fails to unpickle fails that task alone (loky would break the
whole executor). The result comes back pickled the same way, and the parent
loads it per task, for the same reason.

Each worker also keeps a *slot*: a small file-backed memory map in the
pool's slot directory, named by the worker's pid, that holds the id of the
task it is running (0 when idle). When a worker dies, the parent reads its
slot to learn which task died with it: one memory store per task, no
message.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import multiprocessing.util
import os
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from . import _loky

#: Seconds between two checks of a worker's parent; a worker outlives a
#: parent that died (even by SIGKILL) by at most about this long.
PARENT_CHECK_INTERVAL = 0.25

#: Seconds between two checks of a worker's memory, when it has a hard limit.
MEMORY_CHECK_INTERVAL = 0.05

#: Exit statuses of a worker that ended itself.
ORPHAN_EXIT_CODE = 75  # its parent died
DEADLINE_EXIT_CODE = 76  # its task ran past its deadline
MEMORY_EXIT_CODE = 77  # it grew past kill_worker_memory

#: Why a worker ended itself, as written in its slot. The first two end a
#: task (the worker is killed); the last three are clean exits between tasks.
NO_REASON, DEADLINE, MEMORY, RECYCLED_TASKS, RECYCLED_MEMORY, IDLE, BUDGET = range(7)

#: How the parent words a clean exit's reason.
EXIT_REASONS = {
    RECYCLED_TASKS: "max_tasks_per_worker",
    RECYCLED_MEMORY: "max_worker_memory",
    IDLE: "idle_timeout",
    BUDGET: "max_total_workers",
}

#: The file in a pool's slot directory that holds how many of its workers the
#: parent asks to leave after their current task (the worker budget, see
#: budget.py): one int64, changed under ``flock``.
RETIRE_FILE = ".retire"
_COUNTER = struct.Struct("<q")
_retire_fd: int | None = None
_retire_map: mmap.mmap | None = None

# The slot: the task running now (0: none), why the worker ended itself, and
# a detail (the deadline in ms, or the memory size reached in bytes).
_SLOT = struct.Struct("<qqq")
_slot: mmap.mmap | None = None
_slot_path: str | None = None


@dataclass(frozen=True)
class WorkerLimits:
    """What a worker enforces on itself (None: no limit)."""

    max_tasks: int | None = None  #: leave cleanly after this many tasks
    max_memory: int | None = None  #: leave cleanly after a task, once RSS is above (bytes)
    kill_memory: int | None = None  #: end at once, failing the task, above (bytes)


_limits = WorkerLimits()
_tasks_done = 0
_watchdog: _Watchdog | None = None


def start_worker(
    parent_pid: int,
    slot_dir: str | None,
    limits: WorkerLimits,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    """Run first in every worker process, before the user's initializer.

    * SIGINT is ignored: a Ctrl-C in a terminal reaches the whole process
      group, and it is the parent's to handle (it stops the workers).
    * The worker's slot is created (see the module docstring).
    * A watchdog thread ends the process as soon as its parent is gone (loky's
      workers never watch their parent, and ``PR_SET_PDEATHSIG`` fires when
      the spawning *thread* exits, not the process), when a task runs past
      its deadline, or when the worker grows past ``kill_memory``.
    """
    global _limits, _watchdog
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        # A worker started from a thread that blocks them inherits the mask.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _limits = limits
    if slot_dir is not None:
        _open_slot(slot_dir)
        _open_retire_counter(slot_dir)
    _watchdog = _Watchdog(parent_pid, limits.kill_memory)
    threading.Thread(target=_watchdog.run, name="pool_manager-watchdog", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _open_slot(slot_dir: str) -> None:
    global _slot, _slot_path
    path = os.path.join(slot_dir, str(os.getpid()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, _SLOT.size)
        _slot = mmap.mmap(fd, _SLOT.size)
    finally:
        os.close(fd)
    _slot_path = path
    # A worker that exits cleanly removes its slot, unless it says why it left
    # (recycled, idle): the parent reads that, then removes it.
    multiprocessing.util.Finalize(None, _finalize_slot, args=(path,), exitpriority=0)


def _open_retire_counter(slot_dir: str) -> None:
    global _retire_fd, _retire_map
    try:
        fd = os.open(os.path.join(slot_dir, RETIRE_FILE), os.O_RDWR)
    except OSError:
        return  # no budget file: this worker is never asked to leave
    try:
        _retire_map = mmap.mmap(fd, _COUNTER.size)
    except (OSError, ValueError):
        os.close(fd)
        return
    _retire_fd = fd


def make_retire_counter(slot_dir: str) -> None:
    """(Parent side) create the pool's retire counter, at zero."""
    with open(os.path.join(slot_dir, RETIRE_FILE), "wb") as counter:
        counter.write(_COUNTER.pack(0))


def change_retire_counter(slot_dir: str, delta: int = 0, *, reset: bool = False) -> int:
    """(Parent side) add ``delta`` to (or, with ``reset``, zero) the retire counter.

    Returns the value before the change (0 if the file is missing).
    """
    try:
        fd = os.open(os.path.join(slot_dir, RETIRE_FILE), os.O_RDWR)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = os.pread(fd, _COUNTER.size, 0)
        value = _COUNTER.unpack(data)[0] if len(data) == _COUNTER.size else 0
        new = 0 if reset else max(0, value + delta)
        if new != value:
            os.pwrite(fd, _COUNTER.pack(new), 0)
        return value
    finally:
        os.close(fd)  # closing drops the lock


def _take_retire_request() -> bool:
    """(Worker side) if the parent asked a worker to leave, be that worker."""
    counter = _retire_map
    if counter is None or _retire_fd is None or _COUNTER.unpack_from(counter, 0)[0] <= 0:
        return False  # the common case: one memory read, no lock
    fcntl.flock(_retire_fd, fcntl.LOCK_EX)
    try:
        value = _COUNTER.unpack_from(counter, 0)[0]
        if value <= 0:
            return False
        _COUNTER.pack_into(counter, 0, value - 1)
        return True
    finally:
        fcntl.flock(_retire_fd, fcntl.LOCK_UN)


def _finalize_slot(path: str) -> None:
    if _slot is None or _SLOT.unpack_from(_slot, 0)[1] == NO_REASON:
        _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _set_slot(task_id: int, reason: int = NO_REASON, detail: int = 0) -> None:
    if _slot is not None:
        _SLOT.pack_into(_slot, 0, task_id, reason, detail)


def read_slot(slot_dir: str, pid: int) -> tuple[int, int, int]:
    """(Parent side) worker ``pid``'s slot: (task id, reason, detail); zeros if unknown."""
    try:
        with open(os.path.join(slot_dir, str(pid)), "rb") as slot:
            data = slot.read(_SLOT.size)
    except OSError:
        return (0, NO_REASON, 0)
    if len(data) != _SLOT.size:
        return (0, NO_REASON, 0)
    task_id, reason, detail = _SLOT.unpack(data)
    return task_id, reason, detail


def resident_memory() -> int:
    """This process's resident set size in bytes (cheap: one read of /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _Watchdog:
    """The worker's second thread: parent, deadline and hard memory checks.

    It ends the process with ``os._exit`` after writing why in the slot, while
    holding ``_lock``: the main thread takes that lock to start or finish a
    task, so the task named in the slot is the one that was judged.
    """

    def __init__(self, parent_pid: int, kill_memory: int | None) -> None:
        self._parent_pid = parent_pid
        self._kill_memory = kill_memory
        self._lock = threading.Condition()
        self._task_id = 0
        self._deadline: float | None = None  # time.monotonic()
        self._timeout = 0.0

    def task_started(self, task_id: int, timeout: float | None) -> None:
        with self._lock:
            self._task_id = task_id
            _set_slot(task_id)
            if timeout is not None:
                self._timeout = timeout
                self._deadline = time.monotonic() + timeout
                self._lock.notify()

    def task_finished(self) -> None:
        with self._lock:
            self._task_id = 0
            self._deadline = None
            _set_slot(0)

    def run(self) -> None:
        with self._lock:
            while True:
                wait = PARENT_CHECK_INTERVAL
                if self._kill_memory is not None:
                    wait = MEMORY_CHECK_INTERVAL
                if self._deadline is not None:
                    wait = min(wait, max(0.0, self._deadline - time.monotonic()))
                self._lock.wait(wait)
                if os.getppid() != self._parent_pid:
                    self._end(ORPHAN_EXIT_CODE, NO_REASON, 0, orphaned=True)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    self._end(DEADLINE_EXIT_CODE, DEADLINE, int(self._timeout * 1000))
                if self._kill_memory is not None:
                    size = resident_memory()
                    if size > self._kill_memory:
                        self._end(MEMORY_EXIT_CODE, MEMORY, size)

    def _end(self, exit_code: int, reason: int, detail: int, *, orphaned: bool = False) -> None:
        if orphaned:
            if _slot_path is not None:
                _remove(_slot_path)
                _remove(os.path.join(os.path.dirname(_slot_path), RETIRE_FILE))
                with contextlib.suppress(OSError):  # the last worker out removes the directory
                    os.rmdir(os.path.dirname(_slot_path))
        else:
            _set_slot(self._task_id, reason, detail)
        os._exit(exit_code)


def should_retire() -> bool:
    """After each task: has this worker done its share (tasks or memory)?

    Or did the parent ask one of its workers to leave, to give its place in
    the worker budget to another pool? If so, the reason goes into the slot,
    for the parent's "recycled" or "exited" event.
    """
    global _tasks_done
    _tasks_done += 1
    limits = _limits
    if limits.max_tasks is not None and _tasks_done >= limits.max_tasks:
        _set_slot(0, RECYCLED_TASKS, _tasks_done)
        return True
    if limits.max_memory is not None:
        size = resident_memory()
        if size > limits.max_memory:
            _set_slot(0, RECYCLED_MEMORY, size)
            return True
    if _take_retire_request():
        _set_slot(0, BUDGET, 0)
        return True
    return False


def leaving_idle() -> None:
    """The worker leaves after its idle timeout: say so in the slot."""
    _set_slot(0, IDLE, 0)


# -- the task envelope ---------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return _loky.dumps(obj)


def dump_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """(Parent side) pickle a call for `run_task`; raises if it cannot be pickled."""
    return _dumps((fn, args, kwargs))


def run_task(task_id: int, payload: bytes, timeout: float | None = None) -> tuple[bool, bytes]:
    """Run one task in the worker; returns ``(ok, pickled result or exception)``.

    ``timeout``: seconds the task may run before the watchdog ends the worker.
    """
    watchdog = _watchdog
    if watchdog is not None:
        watchdog.task_started(task_id, timeout)
    try:
        try:
            fn, args, kwargs = cloudpickle.loads(payload)
        except BaseException as error:
            return False, _dump_error(error, unpickling_arguments=True)
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            return False, _dump_error(error)
        del fn, args, kwargs
        try:
            return True, _dumps(result)
        except BaseException as error:
            return False, _dump_error(error, pickling_result=True)
    finally:
        if watchdog is not None:
            watchdog.task_finished()


def _dump_error(
    error: BaseException, *, unpickling_arguments: bool = False, pickling_result: bool = False
) -> bytes:
    """Pickle ``(kind, error, traceback text)``; an unpicklable error becomes a description."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    kind = "arguments" if unpickling_arguments else "result" if pickling_result else "raised"
    try:
        return _dumps((kind, error, text))
    except BaseException as pickling_error:
        description = (
            f"{type(error).__qualname__}: {error} (the exception itself could not be "
            f"pickled: {pickling_error!r})"
        )
        return _dumps((kind, RuntimeError(description), text))


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """Run ``fn`` over one chunk of ``map`` arguments, in order."""
    return [fn(*args) for args in chunk]
