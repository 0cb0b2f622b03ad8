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
import mmap
import multiprocessing.util
import os
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from . import _loky

#: Seconds between two checks of a worker's parent; a worker outlives a
#: parent that died (even by SIGKILL) by at most about this long.
PARENT_CHECK_INTERVAL = 0.25

#: The exit status of a worker that stopped because its parent died.
ORPHAN_EXIT_CODE = 75

_SLOT = struct.Struct("<q")  # the id of the task running now; 0 when none
_slot: mmap.mmap | None = None


def start_worker(
    parent_pid: int,
    slot_dir: str | None,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    """Run first in every worker process, before the user's initializer.

    * SIGINT is ignored: a Ctrl-C in a terminal reaches the whole process
      group, and it is the parent's to handle (it stops the workers).
    * A daemon thread exits the process as soon as its parent is gone. loky's
      workers never watch their parent, and ``PR_SET_PDEATHSIG`` fires when
      the spawning *thread* exits, not the process, so polling
      ``os.getppid()`` is the robust way to leave no orphans.
    * The worker's slot is created (see the module docstring).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    slot_path = _open_slot(slot_dir) if slot_dir is not None else None
    watchdog = threading.Thread(
        target=_exit_when_orphaned,
        args=(parent_pid, slot_path),
        name="pool_manager-parent-watchdog",
        daemon=True,
    )
    watchdog.start()
    if initializer is not None:
        initializer(*initargs)


def _open_slot(slot_dir: str) -> str:
    global _slot
    path = os.path.join(slot_dir, str(os.getpid()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, _SLOT.size)
        _slot = mmap.mmap(fd, _SLOT.size)
    finally:
        os.close(fd)
    # A worker that exits cleanly (idle timeout, recycling) removes its slot.
    multiprocessing.util.Finalize(None, _remove, args=(path,), exitpriority=0)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _exit_when_orphaned(parent_pid: int, slot_path: str | None) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL)
    if slot_path is not None:
        _remove(slot_path)
        with contextlib.suppress(OSError):  # the last worker out removes the directory
            os.rmdir(os.path.dirname(slot_path))
    os._exit(ORPHAN_EXIT_CODE)


def read_slot(slot_dir: str, pid: int) -> int:
    """(Parent side) the id of the task worker ``pid`` was running, 0 if none or unknown."""
    try:
        with open(os.path.join(slot_dir, str(pid)), "rb") as slot:
            data = slot.read(_SLOT.size)
    except OSError:
        return 0
    return _SLOT.unpack(data)[0] if len(data) == _SLOT.size else 0


# -- the task envelope ---------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return _loky.dumps(obj)


def dump_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """(Parent side) pickle a call for `run_task`; raises if it cannot be pickled."""
    return _dumps((fn, args, kwargs))


def run_task(task_id: int, payload: bytes) -> tuple[bool, bytes]:
    """Run one task in the worker; returns ``(ok, pickled result or exception)``."""
    slot = _slot
    if slot is not None:
        _SLOT.pack_into(slot, 0, task_id)
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
        if slot is not None:
            _SLOT.pack_into(slot, 0, 0)


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
