"""Code that runs inside worker processes, and how a pool sets a worker up.

A worker is forked from the fork server (``_process.py``) and runs `serve`:
it reads its ``INIT`` message (the parent's current working directory and
environment, with the native thread pools' variables: ``_native_threads.py``,
limits, initializer, the pool's shared data: ``_shared.py``),
then batches of tasks, and answers each
task with one message. The wire (frames, message kinds, reason codes, exit
statuses) and the task envelope (how a call, a result and an error are
pickled, and how the parent loads them) are ``_protocol.py``'s, the
shared memory of large buffers ``_buffers.py``'s, and the shared data
``_shared.py``'s: this module imports those three, and
``_native_threads.py``, and nothing else of the package.

Deadlines and the hard memory limit are the pool's to enforce, from
outside (a task stuck in C code that holds the GIL cannot stop a thread of
the parent): the worker says when a task with a deadline starts
(``STARTED``), and the pool ends the worker when the deadline passes or its
memory grows past ``kill_worker_memory``. A ``map`` chunk with a deadline
says so before each of its calls, with the previous call's result
(`run_chunk`): each call has the whole deadline, and what the calls before
it returned has left the worker before it runs. Inside, one watchdog thread ends
the worker when the fork server (its parent) is gone.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import cloudpickle

from . import _shared
from ._buffers import (
    Inbox,
    close_all,
    descriptors_message,
    keep_spare,
    keep_spares,
    map_segments,
    read_segment,
    trim_spares,
    write_segment,
)
from ._native_threads import ThreadLimit, limit_loaded
from ._protocol import (
    ERROR,
    EXIT,
    INIT,
    INIT_FAILED,
    INIT_FAILED_EXIT_CODE,
    INIT_META,
    INITIALIZER,
    LEAVING,
    NO_REASON,
    ORPHAN_EXIT_CODE,
    READY,
    RECYCLED_MEMORY,
    RECYCLED_TASKS,
    RESULT,
    SETUP,
    STARTED,
    TASKS,
    TASKS_META,
    TO_PARENT,
    TO_WORKER,
    ByReference,
    CallFailed,
    PartialChunk,
    WithBuffers,
    dump_error,
    dump_result,
    dump_result_out_of_band,
    dumps,
)

#: Seconds between two checks of a worker's parent; a worker outlives a
#: parent that died (even by SIGKILL) by at most about this long.
PARENT_CHECK_INTERVAL = 0.25

#: Signals the watchdog thread leaves to the worker's main thread (as the
#: parent's threads do: ``_process.MAIN_THREAD_SIGNALS``).
_MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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
    index: int = 0  #: the worker's index in its pool (`_shared.worker_index`)
    #: The pool's ``native_threads`` count: the native thread pools loaded
    #: before the worker started are brought in line with ``environ``
    #: (``_native_threads.limit_loaded``); None: left alone.
    native_threads: int | None = None


@dataclass(frozen=True)
class WorkerConfig:
    """The second part of ``INIT``: what a pool tells each new worker."""

    limits: WorkerLimits
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    #: The parent's ``multiprocessing`` authentication key: with it, a
    #: ``multiprocessing.Manager`` proxy passed to a task can connect.
    authkey: bytes = b""
    #: The pool's shared data (``_shared.py``): its pickle, and how many of the
    #: ``INIT`` message's descriptors are the segments of its buffers.
    shared: _shared.SharedPickle | None = None
    #: Run when the worker leaves cleanly (told to by its pool, or after a
    #: task when it is recycled); not when it is ended or dies.
    finalizer: Callable[..., object] | None = None
    finalargs: tuple[Any, ...] = ()


_limits = WorkerLimits()
_tasks_done = 0
_sock: socket.socket | None = None
_send_lock = threading.Lock()
#: The task running now, if it has a deadline: its id and timeout (for a
#: ``map`` chunk's reports, `run_chunk`); None: no deadline.
_deadline: tuple[int, float] | None = None


def _send(
    kind: int,
    body: bytes = b"",
    reason: int = 0,
    task_id: int = 0,
    value: float = 0.0,
    fds: list[int] | None = None,
) -> None:
    """One message to the parent (from the worker's main thread); ``fds``: the
    descriptors it carries (sent with its first byte, then closed here)."""
    assert _sock is not None
    header = TO_PARENT.pack(len(body), kind, reason, task_id, value)
    if fds:
        try:
            sent = _sock.sendmsg([header, body], descriptors_message(fds))
        finally:
            close_all(fds)
        rest = (
            memoryview(header + body)[sent:]
            if sent < len(header)
            else memoryview(body)[sent - len(header) :]
        )
        if rest:
            _sock.sendall(rest)
        return
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
        # (Not a buffered file: recvmsg, so the descriptors that come with
        # a message are kept.)
        reader = Inbox(sock)
        keep_spares(True)  # (the blank segments its parent sends: see _serve_tasks)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        message = _read_message(reader)
        if message is None or message[0] != INIT:
            _exit(0)
        # Whatever fails from here to READY is reported, with its traceback,
        # for the pool to put in the error its callers get (and to log, once:
        # not here, in every worker that tries).
        step = SETUP
        try:
            config = _set_up(message[1], reader)
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
            _send(INIT_FAILED, text.encode("utf-8", "replace"), reason=step)
            _exit(INIT_FAILED_EXIT_CODE)
        _send(READY)
        if _serve_tasks(reader) and config.finalizer is not None:
            _finalize(config.finalizer, config.finalargs)
    except BaseException:  # the parent has gone (a broken socket), or a bug: leave
        code = 1
    _exit(code)


def _finalize(finalizer: Callable[..., object], finalargs: tuple[Any, ...]) -> None:
    """Run the pool's finalizer as the worker leaves cleanly; what it raises is
    written to stderr (the worker still leaves as it would have)."""
    try:
        finalizer(*finalargs)
    except BaseException as error:
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        sys.stderr.write(f"pool_manager: a worker's finalizer failed:\n{text}")


def _set_up(body: bytes | bytearray, reader: Inbox) -> WorkerConfig:
    """Apply an ``INIT`` body: the parent's directory and environment, then the
    config, then the pool's shared data (its segments: the descriptors that
    came with the message).

    The environment comes first, so that unpickling the initializer and the
    shared data (which may import their modules) already sees it; then the
    native thread pools loaded before it (in the fork server) are brought
    in line with it (``native_threads``).
    """
    _shared.mark_worker()
    (state_length,) = INIT_META.unpack_from(body)
    state_end = INIT_META.size + state_length
    state: ParentState = pickle.loads(body[INIT_META.size : state_end])
    _shared.set_worker_index(state.index)
    if state.cwd is not None:
        os.chdir(state.cwd)
    environ = os.environb
    for key in [key for key in environ if key not in state.environ]:
        del environ[key]
    for key, value in state.environ.items():
        if environ.get(key) != value:
            environ[key] = value
    if state.native_threads is not None:
        limit_loaded(state.native_threads)
    config: WorkerConfig = pickle.loads(body[state_end:])
    if config.authkey:
        multiprocessing.current_process().authkey = config.authkey
    if config.shared is not None:
        _shared.load(config.shared, reader.take(config.shared.buffers))
    return config


def _exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _read_message(reader: Inbox) -> tuple[int, bytes | bytearray] | None:
    return reader.message(TO_WORKER)


def _serve_tasks(reader: Inbox) -> bool:
    """Run the batches the parent sends; True once the worker leaves cleanly
    (``EXIT``, or recycled after a task), False if the parent is gone."""
    while True:
        message = _read_message(reader)
        if message is None:
            return False  # the parent is gone
        kind, body = message
        if kind == EXIT:
            return True
        if kind != TASKS:
            continue
        meta_length, fd_count, blanks = TASKS_META.unpack_from(body)
        # (The segments of the tasks' large buffers; most batches have none.)
        fds = reader.take(fd_count) if fd_count else []
        if blanks:  # (for this batch's large results: `write_segment` takes them)
            for fd in fds[fd_count - blanks :]:
                if fd >= 0:
                    keep_spare(fd, 1)
            del fds[fd_count - blanks :]
        try:
            if _serve_batch(body, meta_length, fds):
                return True
        finally:
            if fds:
                close_all(fds)
            if blanks:
                trim_spares(0)  # (one left unused is not kept past its batch)


def _serve_batch(body: bytes | bytearray, meta_length: int, fds: Sequence[int]) -> bool:
    """Run the tasks of one ``TASKS`` body; True if the worker leaves after them."""
    global _deadline
    meta_end = TASKS_META.size + meta_length
    offset = meta_end
    view = memoryview(body)
    tasks = []
    for task_id, timeout, length, buffers in pickle.loads(view[TASKS_META.size : meta_end]):
        tasks.append((task_id, timeout, view[offset : offset + length], buffers))
        offset += length
    del body, view
    for task_id, timeout, payload, buffers in tasks:
        if timeout is not None:
            _deadline = (task_id, timeout)
            _send(STARTED, task_id=task_id, value=timeout)
        started = time.perf_counter()
        if buffers:  # (an index ~i: read the segment, see TASKS_META)
            ok, data = run_task(
                payload, [fds[i if i >= 0 else ~i] for i in buffers], [i < 0 for i in buffers]
            )
        else:
            ok, data = run_task(payload)
        _deadline = None
        elapsed = time.perf_counter() - started
        if isinstance(data, tuple):  # (a result's large buffers, in segments)
            data, result_fds = data
            _send(RESULT, data, len(result_fds), task_id, elapsed, result_fds)
        else:
            _send(RESULT if ok else ERROR, data, task_id=task_id, value=elapsed)
        del data, payload
        reason, detail = _should_retire()
        if reason:
            _send(LEAVING, reason=reason, value=detail)
            return True
    return False


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
        signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_INTERVAL)
    os._exit(ORPHAN_EXIT_CODE)


def _should_retire() -> tuple[int, float]:
    """After each task: has this worker done its share (tasks or memory)?

    Returns (reason, detail) for ``LEAVING``, reason ``NO_REASON`` if not.
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
    return NO_REASON, 0.0


# -- tasks -----------------------------------------------------------------------


def run_task(
    payload: bytes | memoryview, fds: Sequence[int] = (), read: Sequence[bool] = ()
) -> tuple[bool, bytes | tuple[bytes, list[int]]]:
    """Run one task in the worker; returns ``(ok, pickled result or exception)``.

    ``fds``: the segments of the call's large buffers (left open), each
    mapped, or read into a ``bytes`` where ``read`` says so (see
    `_protocol.TASKS_META`). A result with large buffers comes back as
    ``(pickle, the descriptors of their segments)``, for the caller to send
    and close.
    """
    try:
        # (Reading fails the task as its arguments, never the worker.)
        if fds:
            buffers = [
                read_segment(fd) if read and read[i] else map_segments((fd,), close=False)[0]
                for i, fd in enumerate(fds)
            ]
            fn, args, kwargs = cloudpickle.loads(payload, buffers=buffers)
            del buffers
        else:
            fn, args, kwargs = cloudpickle.loads(payload)
    except BaseException as error:
        return False, dump_error(error, unpickling_arguments=True)
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:
        return False, dump_error(error)
    del fn, args, kwargs
    try:
        data = dump_result_out_of_band(result)
        del result
        if isinstance(data, WithBuffers):
            return True, (data.data, _write_segments(data.buffers))
        return True, data
    except BaseException as error:
        return False, dump_error(error, pickling_result=True)


def _write_segments(buffers: Iterable[Any]) -> list[int]:
    fds: list[int] = []
    try:
        for buffer in buffers:
            with buffer.raw() as view:
                fds.append(write_segment(view))
    except BaseException:
        close_all(fds)
        raise
    return fds


def run_chunk(
    fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]], catch: bool = False
) -> list[Any] | PartialChunk:
    """Run ``fn`` over one chunk of ``map`` arguments, in order.

    Returns the results; if a call raises after others have returned, a
    `PartialChunk`, so that ``map`` yields their results before it raises,
    as it would with one task per call. (A first call that raises raises.)
    With ``catch`` (``map(..., return_exceptions=True)``), every call runs,
    and one that raised has a `CallFailed` in its place.

    In a task with a deadline (see `_reported_calls`), each call has the
    whole deadline, and the result holds only the calls not reported.
    """
    if _deadline is not None or catch:
        return _reported_calls(fn, chunk, True, catch)
    results: list[Any] = []
    try:
        # (extend keeps what it appended before an error, as a loop would.)
        results.extend(itertools.starmap(fn, chunk))
    except BaseException as error:
        if not results:
            raise
        return PartialChunk(results, dump_error(error))
    return results


def run_chunk_single(
    fn: Callable[[Any], Any], chunk: Iterable[Any], catch: bool = False
) -> list[Any] | PartialChunk:
    """`run_chunk` for a ``map`` over one iterable (no argument tuples to build)."""
    if _deadline is not None or catch:
        return _reported_calls(fn, chunk, False, catch)
    results: list[Any] = []
    try:
        results.extend(map(fn, chunk))
    except BaseException as error:
        if not results:
            raise
        return PartialChunk(results, dump_error(error))
    return results


def _reported_calls(
    fn: Callable[..., Any], chunk: Iterable[Any], starred: bool, catch: bool
) -> list[Any]:
    """A chunk's calls one at a time: with ``catch``, a `CallFailed` for each
    call that raises; in a task with a deadline, each call's start reported.

    The deadline is enforced from outside: before each call after the
    first, a ``STARTED`` restarts the pool's clock (the call has the whole
    timeout) and carries the previous call's result, so that if this call
    overruns (or its worker dies), the results before it are already in the
    parent's socket. The chunk then returns only its last result. Without
    ``catch`` (so with a deadline), a call that raises fails the task: every
    result before it was reported. A result that cannot be pickled fails in the report
    after its call, so its call is the one it is charged to.
    """
    deadline = _deadline
    results: list[Any] = []
    for item in chunk:
        if deadline is not None and results:
            try:
                body = dump_result(results[0])
            except BaseException as error:
                if not catch:
                    raise
                body = dump_result(CallFailed(dump_error(error, pickling_result=True)))
            _send(STARTED, body, task_id=deadline[0], value=deadline[1])
            results.clear()
        try:
            results.append(fn(*item) if starred else fn(item))
        except BaseException as error:
            if not catch:
                raise  # (with a deadline: the results before it were reported)
            results.append(CallFailed(dump_error(error)))
    return results


def check_hook(name: str, hook: object, args: object) -> None:
    """(Parent side) check an ``initializer``/``finalizer`` and its argument tuple.

    Raises:
        TypeError: ``hook`` is not callable (nor None), or ``args`` not a tuple.
    """
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be callable, not {type(hook).__name__}")
    if not isinstance(args, tuple):
        what = "initargs" if name == "initializer" else "finalargs"
        raise TypeError(f"{what} must be a tuple, not {type(args).__name__}")


def dump_config(config: WorkerConfig, main: ByReference | None = None) -> bytes:
    """(Parent side) pickle a pool's configuration, the part of ``INIT`` that never
    changes (``main``: which of ``__main__``'s objects go by reference, as for
    `dump_call`)."""
    return dumps(config, main)


def worker_env(env: object) -> dict[bytes, bytes] | None:
    """(Parent side) check a pool's ``env`` (str keys and values, as ``subprocess`` wants them);
    returns it as ``os.environb`` holds it.

    Raises:
        TypeError: not a mapping, or a key or value that is not a str.
        ValueError: a name that is empty or holds ``=``, a NUL character, or
            text the file system encoding cannot hold.
    """
    if env is None:
        return None
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a dict of str to str, not {type(env).__name__}")
    converted = {}
    for key, value in env.items():
        for part in (key, value):
            if not isinstance(part, str):
                raise TypeError(
                    f"env keys and values must be str, not {type(part).__name__} "
                    f"(in {key!r}: {value!r})"
                )
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(f"env: illegal environment variable {key!r}: {value!r}")
        try:
            converted[os.fsencode(key)] = os.fsencode(value)
        except UnicodeError as error:
            raise ValueError(f"env: {key!r}: {value!r} cannot be encoded: {error}") from error
    return converted


def init_message(
    config: bytes,
    env: dict[bytes, bytes] | None,
    index: int = 0,
    threads: ThreadLimit | None = None,
) -> bytes:
    """(Parent side) a worker's whole ``INIT`` message, made as it starts.

    ``config``: from `dump_config`; ``env``: the pool's own variables, set
    over this process's current environment; ``index``: the worker's in its
    pool; ``threads``: the pool's ``native_threads`` (its variables go in
    the environment too).
    """
    try:
        cwd: str | None = os.getcwd()
    except OSError:  # (deleted, say: the worker stays where the fork server is)
        cwd = None
    environ = _environ_now(env)
    if threads is not None:
        threads.worker_environ(environ, env)
    count = None if threads is None else threads.count
    state = pickle.dumps(ParentState(cwd, environ, index, count), pickle.HIGHEST_PROTOCOL)
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
