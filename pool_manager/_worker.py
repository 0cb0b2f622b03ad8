"""Code that runs inside worker processes, and the task envelope both sides share.

A worker is forked from the fork server (``_process.py``) and runs `serve`:
it reads its ``INIT`` message (the parent's current working directory and
environment, limits, initializer), then
batches of tasks, and answers each task with one message. A task crosses as
``(task id, timeout, payload)``: ``payload`` is the cloudpickled ``(fn, args,
kwargs)``, loaded *inside* the task, so an argument that fails to unpickle
fails that task alone. The result comes back pickled, and the parent loads
it per task, for the same reason.

Deadlines and the hard memory limit are the pool's to enforce, from
outside (a task stuck in C code that holds the GIL cannot stop a thread of
the parent): the worker says when a task with a deadline starts
(``STARTED``), and the pool ends the worker when the deadline passes or its
memory grows past ``kill_worker_memory``. Inside, one watchdog thread ends
the worker when the fork server (its parent) is gone.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections import ChainMap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, NoReturn

import cloudpickle

from ._process import ERROR as _ERROR
from ._process import (
    EXIT,
    INIT,
    INIT_FAILED,
    INIT_META,
    INITIALIZER,
    LEAVING,
    MAIN_THREAD_SIGNALS,
    READY,
    SETUP,
    STARTED,
    TASKS,
    TASKS_META,
    TO_PARENT,
    TO_WORKER,
)
from ._process import RESULT as _RESULT

#: Seconds between two checks of a worker's parent; a worker outlives a
#: parent that died (even by SIGKILL) by at most about this long.
PARENT_CHECK_INTERVAL = 0.25

#: Exit statuses of a worker that ended itself.
ORPHAN_EXIT_CODE = 75  # its parent died
INIT_FAILED_EXIT_CODE = 78  # it could not set itself up (or its initializer raised)

#: Why the pool ended a worker (``DEADLINE``, ``MEMORY``), or why it left
#: (``LEAVING``, ``EXIT``).
NO_REASON, DEADLINE, MEMORY, RECYCLED_TASKS, RECYCLED_MEMORY, IDLE, BUDGET, SHUTDOWN = range(8)

#: How the parent words a clean exit's reason.
EXIT_REASONS = {
    RECYCLED_TASKS: "max_tasks_per_worker",
    RECYCLED_MEMORY: "max_worker_memory",
    IDLE: "idle_timeout",
    BUDGET: "max_total_workers",
}


@dataclass(frozen=True)
class WorkerLimits:
    """When a worker leaves cleanly, after a task (None: no limit).

    (The hard limits, deadlines and ``kill_worker_memory``, are the pool's:
    see the module's docstring.)
    """

    max_tasks: int | None = None  #: leave after this many tasks
    max_memory: int | None = None  #: leave after a task, once RSS is above (bytes)


@dataclass(frozen=True)
class ParentState:
    """The first part of ``INIT``: the parent's state as of this worker's start.

    Workers are forked from the fork server, which froze its directory and
    environment when it started: these are the parent's current ones (as
    ``ProcessPoolExecutor``'s workers have), with the pool's ``env`` on top.
    """

    cwd: str | None  #: None: the parent's directory is gone (the worker stays put)
    environ: dict[bytes, bytes]  #: the whole environment, as ``os.environb`` holds it


@dataclass(frozen=True)
class WorkerConfig:
    """The second part of ``INIT``: what a pool tells each new worker."""

    limits: WorkerLimits
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    #: The parent's ``multiprocessing`` authentication key: with it, a
    #: ``multiprocessing.Manager`` proxy passed to a task can connect.
    authkey: bytes = b""


_limits = WorkerLimits()
_tasks_done = 0
_sock: socket.socket | None = None
_send_lock = threading.Lock()


def _send(
    kind: int,
    body: bytes = b"",
    reason: int = 0,
    task_id: int = 0,
    value: float = 0.0,
) -> None:
    """One message to the parent (from the worker's main thread)."""
    assert _sock is not None
    header = TO_PARENT.pack(len(body), kind, reason, task_id, value)
    if len(body) < 65536:
        _sock.sendall(header + body)
    else:
        _sock.sendall(header)
        _sock.sendall(body)


def serve(sock: socket.socket) -> NoReturn:
    """A worker's life: ``INIT``, then tasks until ``EXIT`` (or a limit, or the parent's end)."""
    global _sock, _limits
    code = 0
    try:
        _sock = sock
        # A task's own child processes (os.system, subprocess) must not hold
        # the pool's end of the conversation open.
        sock.set_inheritable(False)
        reader: BinaryIO = sock.makefile("rb", buffering=1 << 16)  # type: ignore[assignment]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        message = _read_message(reader)
        if message is None or message[0] != INIT:
            _exit(0)
        # Whatever fails from here to READY is reported, with its traceback,
        # for the pool to put in the error its callers get.
        step = SETUP
        try:
            config = _set_up(message[1])
            _limits = config.limits
            threading.Thread(
                target=_watch_parent,
                args=(os.getppid(),),
                name="pool_manager-watchdog",
                daemon=True,
            ).start()
            if config.initializer is not None:
                step = INITIALIZER
                config.initializer(*config.initargs)
        except BaseException as error:
            text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            what = "initializer failed" if step == INITIALIZER else "setup failed"
            sys.stderr.write(f"pool_manager: a worker's {what}:\n{text}")
            _send(INIT_FAILED, text.encode("utf-8", "replace"), reason=step)
            _exit(INIT_FAILED_EXIT_CODE)
        _send(READY)
        _serve_tasks(reader)
    except BaseException:  # the parent has gone (a broken socket), or a bug: leave
        code = 1
    _exit(code)


def _set_up(body: bytes) -> WorkerConfig:
    """Apply an ``INIT`` body: the parent's directory and environment, then the config.

    The environment comes first, so that unpickling the initializer (which
    may import its module) already sees it.
    """
    (state_length,) = INIT_META.unpack_from(body)
    state_end = INIT_META.size + state_length
    state: ParentState = pickle.loads(body[INIT_META.size : state_end])
    if state.cwd is not None:
        os.chdir(state.cwd)
    environ = os.environb
    for key in [key for key in environ if key not in state.environ]:
        del environ[key]
    for key, value in state.environ.items():
        if environ.get(key) != value:
            environ[key] = value
    config: WorkerConfig = pickle.loads(body[state_end:])
    if config.authkey:
        multiprocessing.current_process().authkey = config.authkey
    return config


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _read_message(reader: BinaryIO) -> tuple[int, bytes] | None:
    header = reader.read(TO_WORKER.size)
    if len(header) < TO_WORKER.size:
        return None
    length, kind = TO_WORKER.unpack(header)
    body = reader.read(length) if length else b""
    if len(body) < length:
        return None
    return kind, body


def _serve_tasks(reader: BinaryIO) -> None:
    while True:
        message = _read_message(reader)
        if message is None:
            return  # the parent is gone
        kind, body = message
        if kind == EXIT:
            return
        if kind != TASKS:
            continue
        (meta_length,) = TASKS_META.unpack_from(body)
        meta_end = TASKS_META.size + meta_length
        offset = meta_end
        view = memoryview(body)
        tasks = []
        for task_id, timeout, length in pickle.loads(view[TASKS_META.size : meta_end]):
            tasks.append((task_id, timeout, view[offset : offset + length]))
            offset += length
        del body, view
        for task_id, timeout, payload in tasks:
            if timeout is not None:
                _send(STARTED, task_id=task_id, value=timeout)
            started = time.perf_counter()
            ok, data = run_task(payload)
            elapsed = time.perf_counter() - started
            _send(_RESULT if ok else _ERROR, data, task_id=task_id, value=elapsed)
            del data, payload
            reason, detail = _should_retire()
            if reason:
                _send(LEAVING, reason=reason, value=detail)
                return


def resident_memory() -> int:
    """This process's resident set size in bytes (cheap: one read of /proc)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:  # not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _watch_parent(parent_pid: int) -> NoReturn:
    """The watchdog thread: end the worker when its parent (the fork server) is gone.

    (The fork server ends its workers when the pool's process goes; this
    covers a fork server that was killed itself.)
    """
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(ORPHAN_EXIT_CODE)


def _should_retire() -> tuple[int, float]:
    """After each task: has this worker done its share (tasks or memory)?

    Returns (reason, detail), reason 0 if not.
    """
    global _tasks_done
    _tasks_done += 1
    limits = _limits
    if limits.max_tasks is not None and _tasks_done >= limits.max_tasks:
        return RECYCLED_TASKS, _tasks_done
    if limits.max_memory is not None:
        size = resident_memory()
        if size > limits.max_memory:
            return RECYCLED_MEMORY, size
    return 0, 0.0


# -- the task envelope ---------------------------------------------------------


def _reduce_method(method: types.MethodType) -> tuple[Any, tuple[Any, str]]:
    # By reference, as the standard pickle does: cloudpickle would copy the
    # function by value and lose its source file (and a traceback's lines).
    return getattr, (method.__self__, method.__func__.__name__)


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    dispatch_table = ChainMap(
        {types.MethodType: _reduce_method}, cloudpickle.CloudPickler.dispatch_table
    )


def _dumps(obj: object) -> bytes:
    """cloudpickle (lambdas, closures, ``__main__``'s functions go by value)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def dump_result(obj: object) -> bytes:
    """Pickle a task's result: the standard pickle first (fast), cloudpickle if it must."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return _dumps(obj)


#: Arguments the standard pickle sends exactly as cloudpickle would.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})


def _plain_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A call the standard pickle sends as cloudpickle would: a function found
    by its module and name (not ``__main__``'s, not a lambda or closure, not
    from a module registered to go by value), and arguments of plain types."""
    if type(fn) is types.FunctionType:
        module = fn.__module__
        if module in (None, "__main__") or "<" in fn.__qualname__ or module in _BY_VALUE_MODULES:
            return False
    elif type(fn) is not types.BuiltinFunctionType:
        return False
    plain = _PLAIN_TYPES
    return all(type(arg) in plain for arg in args) and all(
        type(value) in plain for value in kwargs.values()
    )


_BY_VALUE_MODULES: Any = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())


def dump_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """(Parent side) pickle a call for `run_task`; raises if it cannot be pickled.

    A plain call (see `_plain_call`) goes by the standard pickle, four times
    faster than cloudpickle, with the same bytes' meaning.
    """
    if _plain_call(fn, args, kwargs):
        try:
            return pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass  # (cloudpickle says why, below)
    return _dumps((fn, args, kwargs))


def run_task(payload: bytes | memoryview) -> tuple[bool, bytes]:
    """Run one task in the worker; returns ``(ok, pickled result or exception)``."""
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
        return True, dump_result(result)
    except BaseException as error:
        return False, _dump_error(error, pickling_result=True)


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


class PartialChunk(NamedTuple):
    """A ``map`` chunk that failed part-way through (see `run_chunk`)."""

    results: list[Any]  #: of the calls before the failing one, in order
    error: bytes  #: the failing call's exception, pickled as a failed task's (`_dump_error`)


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any] | PartialChunk:
    """Run ``fn`` over one chunk of ``map`` arguments, in order.

    Returns the results; if a call raises after others have returned, a
    `PartialChunk`, so that ``map`` yields their results before it raises,
    as it would with one task per call. (A first call that raises raises.)
    """
    results: list[Any] = []
    try:
        # (extend keeps what it appended before an error, as a loop would.)
        results.extend(itertools.starmap(fn, chunk))
    except BaseException as error:
        if not results:
            raise
        return PartialChunk(results, _dump_error(error))
    return results


def run_chunk_single(fn: Callable[[Any], Any], chunk: Iterable[Any]) -> list[Any] | PartialChunk:
    """`run_chunk` for a ``map`` over one iterable (no argument tuples to build)."""
    results: list[Any] = []
    try:
        results.extend(map(fn, chunk))
    except BaseException as error:
        if not results:
            raise
        return PartialChunk(results, _dump_error(error))
    return results


def dump_config(config: WorkerConfig) -> bytes:
    """(Parent side) pickle a pool's configuration, the part of ``INIT`` that never changes."""
    return _dumps(config)


def init_message(config: bytes, env: dict[bytes, bytes] | None) -> bytes:
    """(Parent side) a worker's whole ``INIT`` message, made as it starts.

    ``config``: from `dump_config`; ``env``: the pool's own variables, set
    over this process's current environment.
    """
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # (deleted, say: the worker stays where the fork server is)
        cwd = None
    state = pickle.dumps(ParentState(cwd, _environ_now(env)), pickle.HIGHEST_PROTOCOL)
    length = INIT_META.size + len(state) + len(config)
    return TO_WORKER.pack(length, INIT) + INIT_META.pack(len(state)) + state + config


def _environ_now(env: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """A copy of ``os.environb``, ``env`` on top.

    Another thread may change the environment as it is copied (the copy
    iterates): then copy again.
    """
    while True:
        try:
            environ = dict(os.environb)
            break
        except (RuntimeError, KeyError):
            continue
    if env:
        environ.update(env)
    return environ
