"""The wire protocol: every byte format and every code that crosses a process boundary.

Three processes talk (see ``_process.py`` for who starts whom): the *parent*
(a pool's process), the *fork server*, and each *worker*. This module says
what the bytes between them mean, for both sides: ``pool.py`` and
``_process.py`` in the parent, ``_process.py`` and ``_worker.py`` in the fork
server and its workers. It imports nothing of the package at its top (the
parent's `load_outcome` imports two errors when it needs them), so that any
module may import it, and the fork server loads little at boot (it imports
``_buffers``, which imports nothing of the package either, where a message
carries descriptors).

Parent ↔ worker: one Unix stream socket per worker
    Each message is a fixed header and a body. Parent to worker:
    `TO_WORKER` (body length, kind), kinds `INIT`, `TASKS`, `EXIT`. Worker
    to parent: `TO_PARENT` (body length, kind, reason, task id, value),
    kinds `RESULT`, `ERROR`, `LEAVING`, `STARTED`, `INIT_FAILED`, `READY`,
    read by `MessageReader` into `Message` records (whose docstring says
    what each field means for each kind). A worker reads ``INIT`` (the body:
    `INIT_META`, then the parent's state and the pool's configuration), says
    ``READY`` (or ``INIT_FAILED``), then reads ``TASKS`` (the body:
    `TASKS_META`, then the tasks) until ``EXIT``. Tasks travel in batches
    (one message, many tasks) when they queue up; results travel one
    message per task, so a worker that dies has reported every task it
    finished. A ``TASKS`` or ``RESULT`` message may carry descriptors
    (``SCM_RIGHTS``, sent with its first byte): the shared-memory segments
    of its large buffers (``_buffers.py``), which every reader receives
    with ``recvmsg``, so none is ever dropped; so may an ``INIT``: those of
    the pool's shared data (``_shared.py``).

Parent ↔ fork server: a control socket, and one status pipe per worker
    The server writes `SERVER_READY` once it has booted, then its
    `MAIN_REPORT`: a length, and (when the parent asked it to import the
    main module, `MainToImport`) the pickled `MainReport` of that import.
    To start a worker
    the parent sends `FORK_REQUEST` with two descriptors (the worker's end
    of its socket, the write end of its status pipe); the server answers
    `WORKER_PID`. When it has reaped the worker it writes its exit status
    (`STATUS`) to the status pipe and closes it; a worker that ended itself
    exits with one of the ``*_EXIT_CODE`` statuses below.

The task envelope
    A task crosses as ``(task id, timeout, payload)``: the payload is the
    pickled ``(fn, args, kwargs)`` (`dump_call`, in the parent: the main
    module's functions and classes by reference where the workers have
    them, see ``_main_module.py``, else by value), loaded
    *inside* the task in the worker, so an argument that fails to unpickle
    fails that task alone. Its outcome comes back as a ``RESULT`` (the
    pickled result: `dump_result`) or an ``ERROR`` (the pickled ``(kind,
    exception, traceback text)``: `dump_error`), and the parent loads it
    per task (`load_outcome`), for the same reason. A ``map`` chunk that
    fails part-way returns a `PartialChunk`; one that runs on past a call
    that raised (``return_exceptions``) holds a `CallFailed` in that call's
    place. A chunk with a deadline reports each call's start (``STARTED``,
    from its second call on) with the previous call's pickled result, so
    that the deadline is each call's and the results before a call that
    overran reach the parent before its worker is ended.

Large buffers, out of band
    Calls and results are pickled with protocol 5: a buffer of at least
    `BUFFER_THRESHOLD` bytes (a numpy array's data, a large top-level
    ``bytes`` or ``bytearray``) is left out of the pickle (`WithBuffers`)
    and travels as a shared-memory segment (``_buffers.py``), written once
    and mapped by the reader: the socket carries only its descriptor.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import socket
import struct
import threading
import traceback
import types
from collections import ChainMap, deque
from collections.abc import Callable
from typing import Any, NamedTuple

import cloudpickle

__all__ = [
    "BUDGET",
    "DEADLINE",
    "ERROR",
    "EXIT",
    "EXIT_REASONS",
    "FORK_REQUEST",
    "IDLE",
    "INIT",
    "INITIALIZER",
    "INIT_FAILED",
    "INIT_FAILED_EXIT_CODE",
    "INIT_META",
    "LEAVING",
    "MAIN_REPORT",
    "MEMORY",
    "NO_REASON",
    "ORPHAN_EXIT_CODE",
    "READY",
    "RECYCLED_MEMORY",
    "RECYCLED_TASKS",
    "RESULT",
    "SERVER_READY",
    "SETUP",
    "SHUTDOWN",
    "STARTED",
    "STATUS",
    "TASKS",
    "TASKS_META",
    "TO_PARENT",
    "TO_WORKER",
    "UNREACHABLE_EXIT_CODE",
    "WORKER_PID",
    "MainReport",
    "MainToImport",
    "Message",
    "MessageReader",
    "BUFFER_THRESHOLD",
    "CallFailed",
    "MAX_BUFFERS",
    "PartialChunk",
    "WithBuffers",
    "dump_call",
    "dump_error",
    "dump_result",
    "dump_result_out_of_band",
    "dumps",
    "load_outcome",
]

# -- parent → worker -----------------------------------------------------------

#: Parent → worker header: body length, kind.
TO_WORKER = struct.Struct("<QB")
#: Kinds, parent → worker: set yourself up (the body: see `INIT_META`); run
#: these tasks (the body: see `TASKS_META`); leave once the tasks you hold
#: have run (no body: why is the pool's to remember, see the reasons below).
INIT, TASKS, EXIT = 1, 2, 3

#: An ``INIT`` body: the length of the pickled parent state (its working
#: directory and environment as of this worker's start: ``_worker.ParentState``),
#: that state, then the pool's cloudpickled configuration
#: (``_worker.WorkerConfig``: limits, initializer, the shared data's pickle
#: and how many descriptors, its segments, the message carries).
INIT_META = struct.Struct("<I")

#: A ``TASKS`` body: the length of a pickled list of (task id, timeout,
#: payload length, buffers), the number of descriptors the message carries,
#: and how many of them, the last, are blank segments for the worker to
#: write its large results into (``_buffers`` spares: a worker whose last
#: result had large buffers gets one, if the parent has one); that list,
#: then the payloads one after another (so a large argument is sent from
#: the bytes it was pickled into, not copied). A
#: payload is a pickled call (`dump_call`); a timeout is in seconds, or None;
#: ``buffers``: the indices, among the message's descriptors, of the
#: segments holding the call's out-of-band buffers, in order (a tuple,
#: empty for most calls); ``~index`` (negative) for a segment the worker
#: reads into a ``bytes`` instead of mapping it (``_buffers.copies``: the
#: parent may use its memory again once the task has settled).
TASKS_META = struct.Struct("<IBB")

# -- worker → parent -----------------------------------------------------------

#: Worker → parent header: body length, kind, reason, task id, value.
TO_PARENT = struct.Struct("<QBBqd")
#: Kinds, worker → parent (what their fields hold: see `Message`).
RESULT, ERROR, LEAVING, STARTED, INIT_FAILED, READY = 1, 2, 3, 4, 5, 6

#: ``INIT_FAILED`` reasons: applying ``INIT`` failed (the directory, the
#: environment, unpickling the initializer or its arguments); the
#: initializer raised.
SETUP, INITIALIZER = 1, 2

#: Why a worker ended. Only the ``RECYCLED_*`` reasons travel (a worker's
#: ``LEAVING``: it did its share after a task); the pool keeps the others
#: itself, for the worker it ended (``DEADLINE``: a task ran past its
#: timeout; ``MEMORY``: past ``kill_worker_memory``) or told to leave with
#: ``EXIT`` (``IDLE``: past ``idle_timeout``; ``BUDGET``: the caps across
#: keys took its place; ``SHUTDOWN``: the pool shuts down).
NO_REASON, DEADLINE, MEMORY, RECYCLED_TASKS, RECYCLED_MEMORY, IDLE, BUDGET, SHUTDOWN = range(8)

#: How the parent words a clean exit's reason (its worker events, its stats).
EXIT_REASONS = {
    RECYCLED_TASKS: "max_tasks_per_worker",
    RECYCLED_MEMORY: "max_worker_memory",
    IDLE: "idle_timeout",
    BUDGET: "max_total_workers",
}


class Message(NamedTuple):
    """A message from a worker (a `TO_PARENT` header and its body), as `MessageReader` reads it.

    What ``reason``, ``task_id``, ``value`` and ``body`` hold depends on
    ``kind`` (a field a kind does not use is 0, or empty):

    - ``RESULT``: the task ``task_id`` returned; ``value``: its run time in
      the worker (seconds); ``body``: the pickled result
      (`dump_result_out_of_band`);
      ``reason``: how many out-of-band buffers it has (descriptors sent
      with the message), in ``buffers`` as the message is read (mapped, or
      copied before Python 3.13: ``_buffers.load_segments``; or, if they
      could not be, the ``OSError`` that says why).
    - ``ERROR``: the task ``task_id`` failed (it raised, its call failed to
      unpickle, or its result failed to pickle); ``value``: its run time;
      ``body``: the pickled ``(kind, exception, traceback text)`` (`dump_error`).
    - ``LEAVING``: the worker leaves after the task it just answered;
      ``reason``: ``RECYCLED_TASKS`` (``value``: the tasks it ran) or
      ``RECYCLED_MEMORY`` (``value``: its resident memory, in bytes).
    - ``STARTED``: the task ``task_id``, which has a deadline, starts now;
      ``value``: its timeout in seconds (the pool's clock for it starts
      when it reads this). A ``map`` chunk sends one more before each of
      its calls after the first (``_worker.run_chunk``): the clock starts
      again, for that call; ``body``: the previous call's pickled result
      (`dump_result`, in band; a `CallFailed` for a call that raised, with
      ``return_exceptions``). The chunk's own answer then holds only the
      calls after the last report.
    - ``INIT_FAILED``: the worker could not set itself up; ``reason``:
      ``SETUP`` or ``INITIALIZER``; ``body``: the traceback, UTF-8 text. It
      exits with ``INIT_FAILED_EXIT_CODE``.
    - ``READY``: the worker has set itself up (its initializer has run) and
      takes tasks.
    """

    kind: int
    reason: int
    task_id: int
    value: float
    body: bytes | bytearray
    buffers: tuple[Any, ...] | OSError = ()


#: Bodies at least this large are read straight into a buffer of their size.
_LARGE_BODY = 1 << 16
_CHUNK = 1 << 18
#: Room for the most descriptors one message may carry (``SCM_MAX_FD``, 253).
_ANCILLARY_SPACE = (
    socket.CMSG_SPACE(253 * 4) if hasattr(socket, "CMSG_SPACE") else 0  # (see _platform.py)
)
_NO_BUFFERS: tuple[Any, ...] = ()
# (The I/O loop builds a Message per message: tuple.__new__ takes about 60%
# of the time Message(...) does, which goes through a Python-level __new__.)
_new_message = tuple.__new__


_local = threading.local()


def _scratch() -> bytearray:
    """This thread's receive buffer: a recv of ``_CHUNK`` bytes into a new
    bytes object costs an allocation of that size each time (for glibc, an
    mmap, an mremap and a munmap: about a tenth of a warm round trip)."""
    try:
        return _local.scratch  # type: ignore[no-any-return]
    except AttributeError:
        _local.scratch = scratch = bytearray(_CHUNK)
        return scratch


class MessageReader:
    """Reads `TO_PARENT` messages from one worker's non-blocking socket.

    It reads with ``recvmsg``: the descriptors a ``RESULT`` carries arrive
    with its first byte, wait here in order, and are loaded (and closed)
    once the message is whole. Call `close` when the socket is done with.
    """

    __slots__ = ("_body", "_fds", "_filled", "_head", "_buffer")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._body: bytearray | None = None  # a large body being read in place
        self._filled = 0
        self._head: tuple[int, int, int, float] = (0, 0, 0, 0.0)
        self._fds: deque[int] = deque()  # received, not yet taken by their message

    @property
    def partial(self) -> bool:
        """A message has begun to arrive, and not all of it has."""
        return self._body is not None or bool(self._buffer)

    def read(self, sock: socket.socket, out: list[Message], drain: bool = False) -> bool:
        """Read what is there (``drain``: until none is left); False at end of stream."""
        while True:
            body = self._body
            try:
                if body is not None:
                    with memoryview(body) as view:
                        count, ancillary, _, _ = sock.recvmsg_into(
                            [view[self._filled :]], _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                        )
                    if ancillary:
                        self._keep(ancillary)
                    if count:
                        self._filled += count
                        if self._filled == len(body):
                            kind, reason, task_id, value = self._head
                            buffers = self._take(reason, body) if kind == RESULT and reason else ()
                            out.append(Message(kind, reason, task_id, value, body, buffers))
                            self._body = None
                        continue
                    return False
                scratch = _scratch()
                count, ancillary, _, _ = sock.recvmsg_into(
                    [scratch], _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                return True
            except OSError:
                return False
            if ancillary:
                self._keep(ancillary)
            if not count:
                return False
            with memoryview(scratch) as view:
                self._buffer += view[:count]
            self._parse(out)
            if count < _CHUNK and not drain:
                return True

    def _keep(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        from ._buffers import receive_descriptors

        receive_descriptors(ancillary, self._fds)

    def _take(self, count: int, body: bytes | bytearray) -> tuple[Any, ...] | OSError:
        """The buffers of the next ``count`` descriptors (closed), or why not.

        (A result that is a large ``bytes`` is read straight into one: the
        load then takes it as it is, no second copy.) A segment read into a
        copy is kept as a spare (``_buffers.keep_spare``): the worker wrote
        it and let it go, and no one else has it.
        """
        from ._buffers import keep_spare, load_segments, read_segment

        fds = self._fds
        taken = [fds.popleft() for _ in range(min(count, len(fds)))]
        try:
            if len(taken) < count:
                raise OSError(f"{count - len(taken)} of {count} descriptors did not arrive")
            buffers: tuple[Any, ...]
            if count == 1 and body == _BYTES_RESULT:
                buffers = (read_segment(taken[0]),)
            else:
                buffers = tuple(load_segments(taken))
        except (OSError, ValueError) as error:  # (ValueError: an empty segment)
            for fd in taken:
                os.close(fd)
            return error if isinstance(error, OSError) else OSError(str(error))
        for fd, buffer in zip(taken, buffers):
            if isinstance(buffer, (bytes, bytearray)):  # (a copy, not a mapping)
                keep_spare(fd, len(buffer))
            else:
                os.close(fd)
        return buffers

    def close(self) -> None:
        """Close the descriptors of messages that will never be whole."""
        fds = self._fds
        while fds:
            with contextlib.suppress(OSError):
                os.close(fds.popleft())

    def _parse(self, out: list[Message]) -> None:
        buffer = self._buffer
        size = TO_PARENT.size
        offset = 0
        while len(buffer) - offset >= size:
            length, kind, reason, task_id, value = TO_PARENT.unpack_from(buffer, offset)
            start = offset + size
            end = start + length
            if len(buffer) < end:
                if length >= _LARGE_BODY:
                    # Read the rest straight into a buffer of its own.
                    body = bytearray(length)
                    have = len(buffer) - start
                    body[:have] = buffer[start:]
                    self._body, self._filled = body, have
                    self._head = (kind, reason, task_id, value)
                    offset = len(buffer)
                break
            data = bytes(buffer[start:end])
            buffers = self._take(reason, data) if reason and kind == RESULT else _NO_BUFFERS
            out.append(_new_message(Message, (kind, reason, task_id, value, data, buffers)))
            offset = end
        if offset:
            del buffer[:offset]


# -- parent ↔ fork server --------------------------------------------------------

#: The fork server's first byte to the parent: booted, ready to fork.
SERVER_READY = b"R"
#: The parent's request to fork a worker: this byte, with two descriptors
#: (``SCM_RIGHTS``): the worker's end of its socket, the write end of its
#: status pipe. A request without them (or the control socket's end) tells
#: the server to end its workers and exit.
FORK_REQUEST = b"F"
#: The server's answer to a ``FORK_REQUEST``: the worker's pid, or minus the
#: ``errno`` of a fork that failed.
WORKER_PID = struct.Struct("<q")
#: What follows ``SERVER_READY``: the length of the pickled `MainReport`
#: that follows it; 0 (and nothing follows) when no import was asked.
MAIN_REPORT = struct.Struct("<I")


class MainToImport(NamedTuple):
    """The parent's main module, as the fork server imports it (under the name
    ``__mp_main__``) for every worker: by module name, or by file path."""

    name: str | None  #: ``python -m pkg.mod``: the module's name
    path: str | None  #: ``python script.py``: the script's absolute path
    argv: list[str]  #: the parent's ``sys.argv``, in place while the module runs


class MainReport(NamedTuple):
    """The fork server's import of the main module (`MainToImport`): what it defines.

    ``imported`` False: the import raised (``error`` says what); the workers
    have no main module, and ``__main__``'s objects travel by value.
    """

    imported: bool
    #: The module's functions (defined in it): name -> the line of its ``def``.
    functions: dict[str, int]
    #: The module's classes (defined in it): name -> the line of its
    #: ``class`` statement where Python tells it (``__firstlineno__``), else 0.
    classes: dict[str, int]
    #: Every global name the module defines (functions and classes included).
    names: frozenset[str]
    error: str = ""  #: the traceback of an import that failed


#: An exit status, as the fork server writes it to a status pipe once it has
#: reaped the worker (as ``Popen.returncode`` words it: negative for a signal).
STATUS = struct.Struct("<i")

#: Exit statuses of a worker that ended itself, besides 0 (it left: after
#: ``EXIT`` or ``LEAVING``, or at its socket's end) and 1 (an error: its
#: socket broke as it wrote, the pool's process gone, or a bug): its parent
#: (the fork server) died; it could not set itself up (or its initializer
#: raised: after ``INIT_FAILED``); its loop returned or raised past its last
#: guard, which it never should.
ORPHAN_EXIT_CODE = 75
INIT_FAILED_EXIT_CODE = 78
UNREACHABLE_EXIT_CODE = 70

# -- the task envelope -----------------------------------------------------------


def _reduce_method(method: types.MethodType) -> tuple[Any, tuple[Any, str]]:
    # By reference, as the standard pickle does: cloudpickle would copy the
    # function by value and lose its source file (and a traceback's lines).
    return getattr, (method.__self__, method.__func__.__name__)


def _reduce_code(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    # cloudpickle names the file of code it sends by value "<dynamic-code>": a
    # traceback then loses the script's path and lines. The real name goes.
    make, args = cloudpickle.CloudPickler.dispatch_table[types.CodeType](code)
    filename = code.co_filename
    return make, tuple(filename if type(a) is str and a == "<dynamic-code>" else a for a in args)


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    dispatch_table = ChainMap(
        {types.MethodType: _reduce_method, types.CodeType: _reduce_code},
        cloudpickle.CloudPickler.dispatch_table,
    )


#: Which of ``__main__``'s functions and classes go by reference (to the main
#: module the workers imported: ``_main_module.py``); None: all by value.
ByReference = Callable[[object], bool]


_cloudpickle_reducer_override = cloudpickle.CloudPickler.reducer_override


class _MainPickler(_Pickler):
    """`_Pickler` that lets the standard pickle write ``__main__``'s functions
    and classes by reference (``__main__ name``) where ``by_reference`` says
    the workers have them. (Called for objects that are not of a basic type:
    for a call of plain arguments, the function alone.)"""

    _by_reference: ByReference  # (set by `dumps`: no __init__ of ours to call)

    def reducer_override(self, obj: Any) -> Any:
        if (type(obj) is types.FunctionType or isinstance(obj, type)) and (
            obj.__module__ == "__main__" and self._by_reference(obj)
        ):
            return NotImplemented  # (the standard pickle's save_global)
        return _cloudpickle_reducer_override(self, obj)


def dumps(
    obj: object,
    main: ByReference | None = None,
    buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None,
) -> bytes:
    """cloudpickle (lambdas and closures go by value; ``__main__``'s functions
    and classes too, but those ``main`` says go by reference). ``buffer_callback``:
    as pickle's (protocol 5: which buffers stay out of the pickle)."""
    buffer = io.BytesIO()
    if main is None:
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(
            obj
        )
    else:
        pickler = _MainPickler(
            buffer, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback
        )
        pickler._by_reference = main
        pickler.dump(obj)
    return buffer.getvalue()


#: Arguments the standard pickle sends exactly as cloudpickle would.
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None), complex})

_BY_VALUE_MODULES: Any = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", ())


def _plain_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    main: ByReference | None = None,
) -> bool:
    """A call the standard pickle sends as cloudpickle would: a function found
    by its module and name (not a lambda or closure, not from a module
    registered to go by value, not ``__main__``'s unless ``main`` says it goes
    by reference), and arguments of plain types."""
    if type(fn) is types.FunctionType:
        module = fn.__module__
        if (
            module in (None, "__main__") or "<" in fn.__qualname__ or module in _BY_VALUE_MODULES
        ) and (module != "__main__" or main is None or not main(fn)):
            return False
    elif type(fn) is not types.BuiltinFunctionType:
        return False
    plain = _PLAIN_TYPES
    return all(type(arg) in plain for arg in args) and all(
        type(value) in plain for value in kwargs.values()
    )


def dump_call(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    main: ByReference | None = None,
) -> bytes | WithBuffers:
    """(Parent side) pickle a call, a task's payload; raises if it cannot be pickled.

    ``main``: which of ``__main__``'s functions and classes go by reference
    (None: all by value; the fork-server engine's pools pass it when the
    workers import the main module). The worker loads the call with
    ``cloudpickle.loads`` (``_worker.run_task``). A plain call (see
    `_plain_call`) goes by the standard pickle, four times faster than
    cloudpickle, with the same bytes' meaning. A call with large buffers
    comes back as `WithBuffers` (see `BUFFER_THRESHOLD`). A plain call's
    arguments are looked at for a large ``bytes`` or ``bytearray`` before
    anything is pickled (their types and sizes only), so that a 10 MB
    argument is not pickled in band first, to be thrown away.
    """
    if _plain_call(fn, args, kwargs, main):
        if _large_bytes(args, kwargs):  # (not pickled in band first, to be thrown away)
            return _dump_with_buffers(fn, args, kwargs, main, plain=True)
        try:
            return pickle.dumps((fn, args, kwargs), pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass  # (cloudpickle says why, below)
    return _dump_with_buffers(fn, args, kwargs, main, plain=False)


#: Buffers at least this large (bytes) travel out of band, through shared
#: memory (``_buffers.py``); smaller ones stay in the pickle. (Below about
#: 1 MiB, a segment's creation and mapping cost more than the socket.)
BUFFER_THRESHOLD = 1 << 20
#: The most out-of-band buffers one call or result may have (the descriptors
#: one message may carry, ``SCM_MAX_FD``); past it, they stay in band.
MAX_BUFFERS = 253


class WithBuffers(NamedTuple):
    """A pickle whose large buffers were left out of it (protocol 5), to be
    loaded with ``buffers=`` those buffers, in order."""

    data: bytes
    #: ``pickle.PickleBuffer`` objects as pickled; in the parent, once
    #: shared, the ``_buffers.Segment`` holding each (a task's payload holds
    #: them: they live while it is unfinished).
    buffers: tuple[Any, ...]


class _LargeBytes:
    """A large top-level ``bytes`` or ``bytearray``: pickle keeps those in band
    (only a ``PickleBuffer`` goes out): this one goes out, and loads as the
    same type (copied out of its segment)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


class _OutOfBand:
    """A ``buffer_callback``: keeps each buffer of at least `BUFFER_THRESHOLD`
    bytes out of band (up to `MAX_BUFFERS`), the others in band."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[pickle.PickleBuffer] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        with memoryview(buffer) as view:
            if (
                view.nbytes < BUFFER_THRESHOLD
                or not view.contiguous
                or len(self.buffers) >= MAX_BUFFERS
            ):
                return True  # (in band)
        self.buffers.append(buffer)
        return False


#: The whole pickle of a result that is a large ``bytes`` (its one buffer out of band).
_BYTES_RESULT = pickle.dumps(
    _LargeBytes(b"-"), pickle.HIGHEST_PROTOCOL, buffer_callback=lambda buffer: False
)


def _is_large_bytes(value: object) -> bool:
    return type(value) in (bytes, bytearray) and len(value) >= BUFFER_THRESHOLD  # type: ignore[arg-type]


def _large_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return any(map(_is_large_bytes, args)) or any(map(_is_large_bytes, kwargs.values()))


def _dump_with_buffers(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    main: ByReference | None,
    plain: bool,
) -> bytes | WithBuffers:
    if _large_bytes(args, kwargs):
        args = tuple(_LargeBytes(arg) if _is_large_bytes(arg) else arg for arg in args)
        kwargs = {
            name: _LargeBytes(value) if _is_large_bytes(value) else value
            for name, value in kwargs.items()
        }
    out_of_band = _OutOfBand()
    if plain:
        data = pickle.dumps(
            (fn, args, kwargs), pickle.HIGHEST_PROTOCOL, buffer_callback=out_of_band
        )
    else:
        data = dumps((fn, args, kwargs), main, buffer_callback=out_of_band)
    if out_of_band.buffers:
        return WithBuffers(data, tuple(out_of_band.buffers))
    return data


def dump_result(obj: object) -> bytes:
    """(Worker side) pickle a result in band: the standard pickle first
    (fast), cloudpickle if it must (a ``map`` chunk's report of a call's
    result, a ``STARTED`` body; a task's own result: `dump_result_out_of_band`)."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dumps(obj)


def dump_result_out_of_band(obj: object) -> bytes | WithBuffers:
    """(Worker side) pickle a task's result, a ``RESULT`` body, as `dump_result`
    does, but its large buffers out of band (`WithBuffers`)."""
    if type(obj) in _BYTES_TYPES and len(obj) >= BUFFER_THRESHOLD:  # type: ignore[arg-type]
        obj = _LargeBytes(obj)  # type: ignore[arg-type]
    out_of_band = _result_buffers
    try:
        try:
            data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL, buffer_callback=out_of_band)
        except Exception:
            out_of_band.buffers.clear()
            data = dumps(obj, buffer_callback=out_of_band)
        if out_of_band.buffers:
            return WithBuffers(data, tuple(out_of_band.buffers))
        return data
    finally:
        out_of_band.buffers.clear()


_BYTES_TYPES = (bytes, bytearray)
#: dump_result_out_of_band's collector, used again and again (by the worker's main
#: thread alone: a result is pickled there, one at a time).
_result_buffers = _OutOfBand()


def dump_error(
    error: BaseException, *, unpickling_arguments: bool = False, pickling_result: bool = False
) -> bytes:
    """(Worker side) pickle a task's failure, an ``ERROR`` body: ``(kind, error,
    traceback text)``, ``kind`` one of ``"arguments"`` (the call failed to
    unpickle), ``"result"`` (the result failed to pickle), ``"raised"``. An
    exception that cannot be pickled becomes a ``RuntimeError`` that describes it.
    """
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    kind = "arguments" if unpickling_arguments else "result" if pickling_result else "raised"
    try:
        return dumps((kind, error, text))
    except BaseException as pickling_error:
        description = (
            f"{type(error).__qualname__}: {error} (the exception itself could not be "
            f"pickled: {pickling_error!r})"
        )
        return dumps((kind, RuntimeError(description), text))


class PartialChunk(NamedTuple):
    """A ``map`` chunk that failed part-way through (see ``_worker.run_chunk``):
    the result of a task that ran one."""

    results: list[Any]  #: of the calls before the failing one, in order
    error: bytes  #: the failing call's exception, pickled as a failed task's (`dump_error`)


class CallFailed(NamedTuple):
    """A call of a ``map`` chunk that raised, in its place among the chunk's results,
    when the map goes on past it (``return_exceptions``; see ``_worker.run_chunk``)."""

    error: bytes  #: its exception, pickled as a failed task's (`dump_error`)


def _remote_traceback(text: str) -> BaseException:
    """The worker's traceback, as ``ProcessPoolExecutor`` attaches it (``__cause__``)."""
    # (Imported here, as the errors below: the parent alone decodes outcomes,
    # and the fork server, which imports this module, need not load them.)
    from concurrent.futures.process import _RemoteTraceback

    return _RemoteTraceback(f'\n"""\n{text}"""')  # type: ignore[arg-type]


def load_outcome(
    ok: bool, data: bytes | bytearray, buffers: tuple[Any, ...] | OSError = ()
) -> tuple[bool, Any]:
    """(Parent side) a ``RESULT`` (``ok``) or ``ERROR`` body as ``(ok, result or exception)``.

    ``buffers``: the mappings of its out-of-band buffers (`Message.buffers`).
    The exception has the worker's traceback as its ``__cause__``; one that
    could not be loaded (or whose buffers could not be mapped) becomes
    `ResultUnpicklingError`, a call that could not be loaded in the worker
    `ArgumentUnpicklingError`.
    """
    try:
        if not buffers:
            loaded = pickle.loads(data)
        elif isinstance(buffers, OSError):
            raise OSError(f"its large buffers could not be mapped: {buffers}") from buffers
        else:
            loaded = pickle.loads(data, buffers=buffers)
    except BaseException as unpickling_error:
        from .errors import ResultUnpicklingError

        what = "result" if ok else "exception"
        result_failure = ResultUnpicklingError(
            f"the task ran, but its {what} failed to unpickle in the parent process: "
            f"{type(unpickling_error).__name__}: {unpickling_error}"
        )
        # Its traceback as text: the frames themselves would pin the pool's
        # I/O loop's locals until a garbage collection.
        text = "".join(traceback.format_exception(unpickling_error))
        result_failure.__cause__ = _remote_traceback(text)
        return False, result_failure
    if ok:
        return True, loaded
    kind, error, text = loaded
    if kind == "arguments":
        from .errors import ArgumentUnpicklingError

        argument_failure = ArgumentUnpicklingError(
            "the task's function or arguments failed to unpickle in the worker process: "
            f"{type(error).__name__}: {error}"
        )
        argument_failure.__cause__ = _remote_traceback(text)
        return False, argument_failure
    error.__cause__ = _remote_traceback(text)
    return False, error
