"""Large buffers out of band: shared-memory segments between a pool and its workers.

A call or a result is pickled with protocol 5 (``_protocol.dump_call``,
``_protocol.dump_result``); each buffer of at least
``_protocol.BUFFER_THRESHOLD`` bytes that its pickle reduction yields as a
``pickle.PickleBuffer`` (a numpy array's data; a large top-level ``bytes``
or ``bytearray``, which ``_protocol`` wraps so that it does) stays out of
the pickle. Here each such buffer is written once into a `Segment`: an
anonymous ``memfd`` (no name in ``/dev/shm``, nothing to clean up after a
crash), whose descriptor travels with the message (``SCM_RIGHTS``). The
reader maps it (`map_segments`, ``MAP_PRIVATE``: a task may write to its
array without touching anyone else's), closes the descriptor, and loads the
pickle with the mappings as its buffers: a numpy argument is a view of its
mapping, no copy. A task's argument of exact type ``bytes`` is read into a
``bytes`` instead (`copies`, `read_segment`): no mapping outlives the read.

Lifetime (parent side): a task's payload holds its segments (strongly),
so a segment's descriptor is closed (`Segment.close`, from ``__del__``)
once no unfinished task holds it: the future lets go of its payload when it
settles, whatever settled it (result, error, kill, timeout, cancel, a lost
worker, shutdown), and a pool dropped without shutdown lets go of its
futures. The kernel frees a memfd when its last descriptor and mapping are
gone: a worker that dies leaks nothing. A segment no one maps (``copied``)
is kept as a spare instead, and the next segment is written into its memory
(see "spare segments" below).

Dedupe: the same buffer submitted to many tasks is written once while a
segment of it is alive (`share`): segments are found by their exporter's
identity (a segment holds its exporter, so the id cannot be reused), and one
is reused only if its content still equals the exporter's (an immutable
``bytes`` needs no check): a task sees its argument as it was when it was
submitted.

A pool's shared data (``_shared.py``) is shared the same way, once for
the pool's life: its segments go with each worker's ``INIT``, and the
worker maps them read-only and shared (`map_segments` with ``readonly``).

A shared array (``_shared_array.py``) is already in a memfd: its segment is
adopted (`Segment.adopt`: nothing written), and `share` sends a buffer that
is all of its memory as that segment, with no content check (`owned_segment`,
set once a shared array is made); a part of it is copied as any buffer.

It imports nothing of the package (the worker and the wire use it).
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import os
import pickle
import socket
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "MAX_DESCRIPTORS",
    "PASSING_ERRORS",
    "Carrying",
    "Inbox",
    "Segment",
    "SPARE_AGE",
    "SPARE_COUNT",
    "SPARE_SIZE",
    "close_all",
    "copies",
    "descriptors_message",
    "load_segments",
    "map_segments",
    "keep_spare",
    "keep_spares",
    "read_segment",
    "receive_descriptors",
    "recvmsg_into",
    "share",
    "trim_spares",
    "write_segment",
]

#: The most descriptors one ``sendmsg`` may carry (Linux's ``SCM_MAX_FD``).
MAX_DESCRIPTORS = 253
#: The ancillary buffer that holds that many.
_ANCILLARY_SPACE = (
    socket.CMSG_SPACE(MAX_DESCRIPTORS * array.array("i").itemsize)
    if hasattr(socket, "CMSG_SPACE")
    else 0  # (no descriptor passing: the fork server does not run here, see _platform.py)
)
#: How many bytes a content check reads at once.
_COMPARE_CHUNK = 1 << 20
_monotonic = time.monotonic


def write_segment(view: memoryview) -> int:
    """A memfd (close-on-exec) holding ``view``'s bytes; returns its descriptor.

    A spare segment's memory is used again if there is one (`keep_spare`):
    writing into pages a segment already has costs a quarter of a new
    segment's (whose pages the kernel must allocate, zero and later free).
    Written with ``pwrite`` (no mapping: the writer's resident memory does
    not grow by the segment, and it is faster than copying into a map).
    Raises ``OSError`` (out of memory, out of descriptors).
    """
    data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    total = data.nbytes
    fd = _take_spare()
    try:
        if fd < 0:
            fd = os.memfd_create("pool_manager-buffer", os.MFD_CLOEXEC)
        else:
            os.ftruncate(fd, total)  # (its readers take the file's size as the buffer's)
        written = 0
        while written < total:
            written += os.pwrite(fd, data[written:], written)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd


# -- spare segments --------------------------------------------------------------
#
# A segment whose readers all copied it out (``Segment.copied``: a task's
# large ``bytes`` argument, which the worker reads with ``pread``; a result
# the parent read into a ``bytes``) is kept when released, for the next
# segment to be written into: no reader of it is left (see `Segment`). A
# mapped segment is never kept: a mapping would see the next content.
#
# Bounded: at most `SPARE_COUNT` of at most `SPARE_SIZE` bytes each, for at
# most `SPARE_AGE` seconds (`trim_spares`), and only while the process's I/O
# loop runs, which trims them (`keep_spares`: it stops when the process has
# no worker left, and closes them). Their
# lock is only ever tried, never waited for (a release runs from
# ``__del__``, wherever a collection or a signal handler happens to run): a
# release that cannot take it closes the descriptor, a writer that cannot
# makes a new segment.

#: The most spare segments kept, and the largest one kept (bytes).
SPARE_COUNT = 2
SPARE_SIZE = 64 << 20
#: Seconds a spare segment is kept unused.
SPARE_AGE = 1.0
#: (descriptor, when released, its file's (st_dev, st_ino)), oldest first
_spares: list[tuple[int, float, tuple[int, int]]] = []
_spares_lock = threading.Lock()
#: The number of spare segments used again in this process (for tests and benchmarks).
spares_taken = 0
_keepers = 0  # (under _spares_lock) I/O loop threads running (one, but one may be ending)


def keep_spares(keep: bool) -> None:
    """Start or stop keeping spare segments (once no one keeps them, those kept
    are closed). The I/O loop's thread calls it as it starts and ends, and
    trims them (`trim_spares`) while it runs."""
    global _keepers
    with _spares_lock:  # (its holders never wait: this waits for no one long)
        _keepers += 1 if keep else -1
        kept = list(_spares) if _keepers <= 0 else []
        if kept:
            _spares.clear()
    _close_spares(kept)


def keep_spare(fd: int, size: int, _close: Callable[[int], None] = os.close) -> None:
    """Keep a released segment that no one reads any more as a spare, or close it."""
    kept = False
    try:
        status = os.fstat(fd)
    except OSError:
        return  # (not open: nothing to keep or close)
    identity = (status.st_dev, status.st_ino)
    if 0 < size <= SPARE_SIZE and _spares_lock.acquire(blocking=False):
        try:
            # An entry with the same number is stale: its file was closed
            # elsewhere and the number reused; it is dropped, never closed.
            for index in range(len(_spares) - 1, -1, -1):
                if _spares[index][0] == fd:
                    del _spares[index]
            if _keepers > 0 and len(_spares) < SPARE_COUNT:
                _spares.append((fd, _monotonic(), identity))
                kept = True
        finally:
            _spares_lock.release()
    if not kept:
        _close(fd)


def _take_spare() -> int:
    """The newest spare segment's descriptor (now the caller's), or -1."""
    global spares_taken
    spare = None
    if _spares and _spares_lock.acquire(blocking=False):
        try:
            if _spares:
                spare = _spares.pop()
        finally:
            _spares_lock.release()
    if spare is None:
        return -1
    fd, _released, identity = spare
    # Still the file kept? (A descriptor closed elsewhere, its number then
    # reused, must never be written into: it is dropped, not closed.)
    try:
        status = os.fstat(fd)
    except OSError:
        return -1
    if (status.st_dev, status.st_ino) != identity:
        return -1
    spares_taken += 1
    return fd


def trim_spares(max_age: float = SPARE_AGE) -> bool:
    """Close the spare segments kept longer than ``max_age`` seconds (all with 0);
    returns whether any is left."""
    if not _spares or not _spares_lock.acquire(blocking=False):
        return bool(_spares)
    try:
        cutoff = _monotonic() - max_age
        stale = [spare for spare in _spares if max_age <= 0 or spare[1] <= cutoff]
        del _spares[: len(stale)]
        left = bool(_spares)
    finally:
        _spares_lock.release()
    _close_spares(stale)
    return left


def _close_spares(spares: list[tuple[int, float, tuple[int, int]]]) -> None:
    """Close spares taken out of the list, each only if its descriptor is still the
    file kept (one closed elsewhere and its number reused is someone else's)."""
    for fd, _released, identity in spares:
        try:
            status = os.fstat(fd)
        except OSError:
            continue
        if (status.st_dev, status.st_ino) == identity:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Held:
    """A segment's descriptor and what its release does with it: the state a
    `Segment` shares with its release, which runs once the segment is
    collected (`_release`)."""

    __slots__ = ("copied", "fd", "size")

    def __init__(self, fd: int, size: int, copied: bool) -> None:
        self.fd = fd
        self.size = size
        #: Every reader copies it out (``pread``), none maps it: once
        #: released, no one reads it, and it is kept as a spare. Only ever
        #: turned off (`share` for a reader that maps it).
        self.copied = copied

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        # (os.close bound at definition: a release may run as the interpreter
        # exits, once the module's globals are gone.)
        fd, self.fd = self.fd, -1
        if fd >= 0:
            _close(fd)


def _release(held: _Held, _keep_spare: Callable[[int, int], None] = keep_spare) -> None:
    """A segment was collected: every task that held it has settled, so each
    worker that read it has finished reading (its task ran, or the worker is
    gone); keep its memory as a spare if no one maps it, else close it.

    It runs as a weak reference's callback, after every weak reference to
    the segment was cleared: no lookup (`share`'s reuse by content) can find
    the segment any more. (A ``__del__`` runs before they are cleared: a
    lookup on another thread, while it released the GIL, could take the
    segment back with its descriptor closed, or about to be.)
    """
    if held.copied and held.fd >= 0:
        fd, held.fd = held.fd, -1
        try:
            _keep_spare(fd, held.size)
        except BaseException:  # (the interpreter's exit: the module is gone)
            held.fd = fd
            held.close()
    else:
        held.close()


class Segment:
    """One buffer's bytes in a memfd, as they were when it was written (parent side).

    It holds the buffer's exporter (so that its ``id``, the dedupe key,
    cannot be reused while the segment lives), and its descriptor until it
    is collected (then `_release`), or at `close`.
    """

    __slots__ = ("__weakref__", "exporter", "held", "size")

    def __init__(self, view: memoryview, exporter: object, copied: bool = False) -> None:
        self._start(_Held(write_segment(view), view.nbytes, copied), view.nbytes, exporter)
        global segments_written
        segments_written += 1

    def _start(self, held: _Held, size: int, exporter: object) -> None:
        self.held = held
        self.size = size
        self.exporter = exporter
        finalizer = weakref.finalize(self, _release, held)
        finalizer.atexit = False  # (the process's exit closes its descriptors)
        _every_segment.add(self)  # (closed in a forked child)

    @property
    def fd(self) -> int:
        """Its descriptor (-1 once closed)."""
        return self.held.fd

    @property
    def copied(self) -> bool:
        """Every reader copies it out, none maps it (see `_Held.copied`)."""
        return self.held.copied

    @copied.setter
    def copied(self, copied: bool) -> None:
        self.held.copied = copied

    @classmethod
    def spare(cls) -> Segment | None:
        """A spare segment (`keep_spare`) to give away, as a worker's blank for its
        results; None if there is none. (Collected, it closes its descriptor:
        once sent, the memory is the worker's.)"""
        fd = _take_spare()
        if fd < 0:
            return None
        segment = cls.__new__(cls)
        segment._start(_Held(fd, 0, False), 0, None)
        return segment

    @classmethod
    def adopt(cls, fd: int, size: int, exporter: object = None) -> Segment:
        """A segment of the ``size`` bytes already in the memfd ``fd`` (a shared
        array's, ``_shared_array.py``): nothing is written or counted in
        `segments_written`; the segment owns ``fd`` from now on (closes it
        when collected, or at `close`, as any segment). It is never offered
        for reuse by content (`share` finds it by its memory, through
        `owned_segment`), so no one writes to it or checks it. ``exporter``:
        what must live as long as the segment (None: nothing).
        """
        segment = cls.__new__(cls)
        segment._start(_Held(fd, size, False), size, exporter)  # (mapped: never a spare)
        return segment

    def holds(self, view: memoryview) -> bool:
        """Is ``view``'s content still what the segment holds?

        A whole ``bytes`` object cannot have changed. Otherwise the segment is
        read back a chunk at a time into one buffer and compared with
        ``memcmp`` (``bytearray ==`` another buffer): about 0.2 ms a MiB,
        under half the cost of writing a new segment, and no second copy
        alive. (A hash costs more than the comparison; so does a memoryview
        comparison, which goes item by item.)
        """
        exporter = self.exporter
        if type(exporter) is bytes and len(exporter) == view.nbytes:
            return True
        data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = self.size
        chunk = bytearray(min(_COMPARE_CHUNK, size))
        with memoryview(chunk) as into:
            offset = 0
            while offset < size:
                count = os.preadv(self.held.fd, [into], offset)
                if not count:
                    return False
                part: Any = data[offset : offset + count]
                if (chunk if count == len(chunk) else into[:count].tobytes()) != part:
                    return False
                offset += count
        return True

    def close(self) -> None:
        """Close its descriptor now (a forked child's copy; tests)."""
        self.held.close()


#: The number of segments written in this process (for tests and benchmarks).
segments_written = 0
#: The live segments that may be reused, by (id of exporter, size).
_reusable: weakref.WeakValueDictionary[tuple[int, int], Segment] = weakref.WeakValueDictionary()
_every_segment: weakref.WeakSet[Segment] = weakref.WeakSet()
_reusable_lock = threading.Lock()  # innermost: nothing is called under it
#: The segment that already holds all of a buffer's memory (an adopted one,
#: `Segment.adopt`, whose descriptor is open), or None: set by
#: ``_shared_array`` when it makes its first array (None until then: nothing
#: to find).
owned_segment: Callable[[memoryview], Segment | None] | None = None


def share(buffers: Sequence[pickle.PickleBuffer], copy: bool = False) -> tuple[Segment, ...]:
    """(Parent side) a segment for each buffer: the shared array's own, if the
    buffer is all of one (`owned_segment`), else a live one with the same
    content, or a new one.

    ``copy``: the readers copy out the buffers of exact type ``bytes`` (a
    task's arguments, see `copies`), so that those segments may be kept as
    spares once released; otherwise (a pool's shared data) every reader maps
    them.

    Raises ``pickle.PicklingError`` (which fails the task's future, as a call
    that cannot be pickled does) if one cannot be created (no memory, no
    descriptors): it never falls back to the socket, which would take more
    memory still.
    """
    try:
        return tuple(_segment_for(buffer, copy) for buffer in buffers)
    except OSError as error:
        size = sum(memoryview(buffer).nbytes for buffer in buffers)
        raise pickle.PicklingError(
            f"the task's large buffers ({size / 1e6:.1f} MB) could not be put in shared "
            f"memory (memfd): {error}; free memory or descriptors, or pass smaller arguments"
        ) from error


def copies(exporter: object) -> bool:
    """Does a worker copy this exporter's buffer out of its segment, as a task's
    argument? Those of exact type ``bytes``: the call loads them as ``bytes``
    (a ``pread``; a ``bytes`` is read-only, so a ``memoryview`` of a mapping
    would give nothing more). Others it maps (a numpy argument is a view of it)."""
    return type(exporter) is bytes


def _segment_for(buffer: pickle.PickleBuffer, copy: bool) -> Segment:
    view = buffer.raw()
    if owned_segment is not None:
        owned = owned_segment(view)
        if owned is not None:  # (a shared array's memory: sent as it is)
            return owned
    exporter = view.obj
    copied = copy and copies(exporter)
    key = (id(exporter), view.nbytes)
    with _reusable_lock:
        segment = _reusable.get(key)
    if segment is not None and segment.exporter is exporter and segment.holds(view):
        if not copied:
            segment.copied = False  # (a reader maps it: never a spare)
        return segment
    # (Written outside the lock: two threads may each write a segment for
    # the same buffer; the later one is kept for reuse, both are correct.)
    segment = Segment(view, exporter, copied)
    with _reusable_lock:
        _reusable[key] = segment
    return segment


def _forget_segments_in_child() -> None:
    # A forked child's copies of the parent's descriptors: the child's own
    # pools are new, and the parent's inherited tasks are never sent.
    global _spares_lock, _keepers
    for segment in list(_every_segment):
        with contextlib.suppress(OSError):
            segment.copied = False
            segment.close()
    _reusable.clear()
    _spares_lock = threading.Lock()  # (another thread may have held it at the fork)
    _keepers = 0  # (until this process's own I/O loop starts)
    _close_spares(list(_spares))
    _spares.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_segments_in_child)


class Carrying(NamedTuple):
    """(Parent side) the first part of a message not sent yet, and the segments
    whose descriptors go with its first byte (held: their descriptors stay
    open until sent)."""

    view: memoryview
    segments: tuple[Segment, ...]
    #: the message's tasks (they fail if the descriptors cannot pass); none:
    #: a worker's ``INIT``, with its pool's shared data (the worker is ended)
    futures: list[Any]
    rest: int  #: how many parts of the message follow this one


#: ``sendmsg`` errors that mean the descriptors could not be passed (too many
#: in flight: more than ``RLIMIT_NOFILE``; no memory; one not open, which
#: would be a bug), not that the worker is gone: nothing was sent, and the
#: message's tasks fail (a worker that lives on would never answer them).
PASSING_ERRORS = frozenset({errno.ETOOMANYREFS, errno.ENOMEM, errno.ENOBUFS, errno.EBADF})


def descriptors_message(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a ``sendmsg`` that passes ``fds``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def receive_descriptors(ancillary: list[tuple[int, int, bytes]], into: deque[int]) -> None:
    """Add the descriptors a ``recvmsg`` returned to ``into``, in order."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            into.extend(fds)


def recvmsg_into(sock: socket.socket, view: memoryview, fds: deque[int]) -> int:
    """``recv_into`` that keeps the descriptors that came with the bytes (close-on-exec)."""
    count, ancillary, _flags, _address = sock.recvmsg_into(
        [view], _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
    )
    if ancillary:
        receive_descriptors(ancillary, fds)
    return count


#: Python 3.13's mmap can leave the descriptor alone; before, a mapping keeps
#: a duplicate of it open as long as it lives.
_UNTRACKED = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def map_segments(fds: Sequence[int], close: bool = True, readonly: bool = False) -> list[mmap.mmap]:
    """Map each segment privately (copy on write), or with ``readonly`` shared and
    read-only (a pool's shared data: every worker's mapping is the same
    memory); with ``close``, close the descriptors, whatever happens. Raises
    ``OSError`` if one cannot be mapped.

    (Before Python 3.13, each mapping holds a duplicate of its descriptor
    until it is unmapped: fine in a worker, whose task's arguments go with
    the task.)
    """
    try:
        access = mmap.ACCESS_READ if readonly else mmap.ACCESS_COPY
        return [mmap.mmap(fd, 0, access=access, **_UNTRACKED) for fd in fds]
    finally:
        if close:
            close_all(fds)


def read_segment(fd: int) -> bytes:
    """A segment's bytes, read into a new ``bytes`` (the descriptor stays open)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    if len(data) < size:  # (a read stops short only past 2 GiB)
        parts = [data]
        done = len(data)
        while done < size:
            part = os.pread(fd, size - done, done)
            if not part:
                raise OSError(f"a segment ended at {done} of its {size} bytes")
            parts.append(part)
            done += len(part)
        data = b"".join(parts)
    return data


def load_segments(fds: Sequence[int]) -> list[mmap.mmap] | list[bytearray]:
    """(Parent side) a result's segments as buffers to load it from; the
    descriptors stay open (the caller closes them).

    Python 3.13 and later: private mappings (no copy; a numpy result is a
    view of its own). Before: a copy of each, read with ``preadv``, so that
    no descriptor outlives the message (a mapping would keep one open for
    as long as the result lives).
    """
    if _UNTRACKED:
        return map_segments(fds, close=False)
    copies = []
    for fd in fds:
        size = os.fstat(fd).st_size
        copy = bytearray(size)
        with memoryview(copy) as view:
            done = 0
            while done < size:
                count = os.preadv(fd, [view[done:]], done)
                if not count:
                    raise OSError(f"a segment ended at {done} of its {size} bytes")
                done += count
        copies.append(copy)
    return copies


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Inbox:
    """(Worker side) reads the parent's messages from a blocking socket with
    ``recvmsg``, so the descriptors that travel with them are kept (in
    arrival order: those of a message arrive with its first byte, so once a
    message has been read, its descriptors have too)."""

    __slots__ = ("_ahead", "_chunk", "_sock", "fds")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._ahead = bytearray()  # read, not yet asked for
        self._chunk = bytearray(1 << 16)
        self.fds: deque[int] = deque()

    def message(self, header: struct.Struct) -> tuple[int, bytes | bytearray] | None:
        """The next message: ``header`` (``length, kind``), then ``length``
        bytes of body; returns ``(kind, body)``, None at the end of the stream.

        (Most messages arrive whole with one receive: those are taken out of
        it at once, with no other call.)
        """
        ahead = self._ahead
        if not ahead:
            size = header.size
            with memoryview(self._chunk) as view:
                count, ancillary, _flags, _address = self._sock.recvmsg_into(
                    [view], _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
                )
                if ancillary:
                    receive_descriptors(ancillary, self.fds)
                if not count:
                    return None
                if count >= size:
                    length, kind = header.unpack_from(view)
                    end = size + length
                    if end <= count:
                        if end < count:
                            ahead += view[end:count]
                        return kind, bytes(view[size:end])
                ahead += view[:count]
        head = self.read(header.size)
        if len(head) < header.size:
            return None
        length, kind = header.unpack(head)
        body = self.read(length) if length else b""
        if len(body) < length:
            return None
        return kind, body

    def read(self, size: int) -> bytes | bytearray:
        """``size`` bytes, fewer only at the end of the stream (as a file's ``read``)."""
        ahead = self._ahead
        if size >= len(self._chunk) and size > len(ahead):
            # A large body: read straight into a buffer of its size.
            body = bytearray(size)
            have = len(ahead)
            body[:have] = ahead
            ahead.clear()
            with memoryview(body) as view:
                while have < size:
                    count = recvmsg_into(self._sock, view[have:], self.fds)
                    if not count:
                        return bytes(body[:have])
                    have += count
            return body  # (not copied again)
        while len(ahead) < size:
            with memoryview(self._chunk) as view:
                count = recvmsg_into(self._sock, view, self.fds)
                if not count:
                    break
                ahead += view[:count]
        data = bytes(ahead[:size])
        del ahead[:size]
        return data

    def take(self, count: int) -> list[int]:
        """The next ``count`` descriptors received (-1 for any that did not
        arrive: mapping it fails the task that needs it, as its arguments)."""
        fds = self.fds
        taken = [fds.popleft() for _ in range(min(count, len(fds)))]
        return taken + [-1] * (count - len(taken))
