"""Shared data on the loky engine: one large read-only object for every loky worker.

``LokyWorkerPool(..., shared_data=obj)`` (and `LokyPoolFactory` and
``WorkerPoolManager(..., engine="loky", shared_data=obj)``, once for all
their pools) does what the fork server does (``_shared.py``), without
descriptor passing, which loky's workers (fresh interpreters, on every
platform loky runs on) cannot have:

- In the parent, as the pool is built (`LokySharedData`): ``obj`` is
  pickled once (cloudpickle, protocol 5), its large buffers out of band by
  the fork server's rule (each contiguous buffer of at least
  ``_protocol.BUFFER_THRESHOLD`` bytes: numpy arrays' data, a
  ``pickle.PickleBuffer``, a large top-level ``bytes`` or ``bytearray``),
  and those buffers are written into one *named* shared-memory segment
  (``multiprocessing.shared_memory``: POSIX ``shm_open``, or Windows named
  memory), each at an offset aligned to `ALIGNMENT`, after a random token
  of `TOKEN_SIZE` bytes. What a worker needs (`LokySharedSpec`: the small
  pickle, the segment's name and size, the token, the buffers' offsets) is
  a few bytes plus the pickle, and travels in each slot's initializer
  arguments (``_loky_slots._start_slot``).
- In each worker, before the pool's initializer (`load`): the segment is
  mapped read-only (``PROT_READ`` on POSIX; a read-only view on Windows),
  its token checked, and the pickle loaded with read-only views of the
  mapping as its buffers: a numpy array in it is a view of memory all the
  workers share, not writeable (``ValueError``). ``bytes`` and
  ``bytearray`` load as copies of their own (those types own their memory),
  as on the fork server. The object is kept for the worker's life
  (``_shared.shared_data`` returns it), and so is the mapping.

The resource tracker: a worker never registers the segment with one (it
opens it with ``shm_open`` itself, as ``SharedMemory`` does, rather than
through ``SharedMemory``, which before Python 3.13 registers what it
attaches, CPython gh-82300): a worker's exit unlinks nothing. The parent's
``SharedMemory(create=True)`` registers it with multiprocessing's resource
tracker, so if the parent dies abruptly (``SIGKILL``) the tracker unlinks
it once the parent and its workers (whose watchdogs end them within about a
second) are gone, with a "leaked shared_memory" warning. On Windows named
memory has no name to leave behind: it is freed when its last handle
closes, the parent's (held for the segment's life) or a worker's.

Lifetime (parent side): a `LokySharedData` holds its segment while it
lives; when it is collected, or at `LokySharedData.release`, the segment
is unlinked (POSIX; closed on Windows): a pool holds it until it is
disposed (its slots gone) or collected, a manager or a factory until it is
shut down (the manager) or collected, and its pools. Only the process that
made it unlinks it (not a process forked from it).

It imports ``_shared`` and ``_protocol`` only: loky's workers import it.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import secrets
import sys
import weakref
from multiprocessing import shared_memory
from typing import Any, NamedTuple

from . import _shared
from ._protocol import BUFFER_THRESHOLD, _is_large_bytes, _LargeBytes, dumps

__all__ = ["ALIGNMENT", "TOKEN_SIZE", "LokySharedData", "LokySharedSpec", "load"]

#: Each buffer starts at a multiple of this many bytes of its segment (numpy's
#: widest alignment, and a cache line).
ALIGNMENT = 64
#: The random token at the start of a segment, that a worker checks: the
#: segment it opened by name is its pool's.
TOKEN_SIZE = 16
#: Segments are named ``pool_manager_<pid>_<8 hex digits>`` (``/dev/shm/`` on
#: Linux: at most 30 characters with the slash, under macOS's 31).
NAME_PREFIX = "pool_manager_"

_POSIX = sys.platform != "win32"


class LokySharedSpec(NamedTuple):
    """What a loky worker needs to load its pool's shared data (pickled into
    each slot's initializer arguments)."""

    data: bytes  #: the pickle, its large buffers left out
    name: str | None  #: the segment holding them (None: none, all in the pickle)
    size: int  #: the segment's bytes
    token: bytes  #: the segment's first `TOKEN_SIZE` bytes
    layout: tuple[tuple[int, int], ...]  #: each buffer's (offset, bytes), in order


class _Buffers:
    """A ``buffer_callback``: each contiguous buffer of at least ``BUFFER_THRESHOLD``
    bytes stays out of band (as the fork server's rule, with no cap on their
    number: no descriptors travel here), the others in band."""

    __slots__ = ("buffers",)

    def __init__(self) -> None:
        self.buffers: list[pickle.PickleBuffer] = []

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        with memoryview(buffer) as view:
            if view.nbytes < BUFFER_THRESHOLD or not view.contiguous:
                return True  # (in band)
        self.buffers.append(buffer)
        return False


class LokySharedData:
    """(Parent side) a loky pool's shared data, pickled once: the pickle, and the
    named segment of its large buffers (held while this lives: see the module
    docstring).

    Raises ``TypeError`` if the object cannot be pickled, ``OSError`` if its
    buffers cannot be put in shared memory.
    """

    __slots__ = ("__weakref__", "_finalizer", "spec")

    def __init__(self, obj: object) -> None:
        out_of_band = _Buffers()
        try:
            data = dumps(
                _LargeBytes(obj) if _is_large_bytes(obj) else obj,  # type: ignore[arg-type]
                buffer_callback=out_of_band,
            )
        except Exception as error:
            raise TypeError(f"shared_data must be picklable: {error}") from error
        layout = []
        end = TOKEN_SIZE
        for buffer in out_of_band.buffers:
            with buffer.raw() as raw:
                offset = -(-end // ALIGNMENT) * ALIGNMENT
                layout.append((offset, raw.nbytes))
                end = offset + raw.nbytes
        if not layout:
            self.spec = LokySharedSpec(data, None, 0, b"", ())
            self._finalizer: weakref.finalize[Any, Any] | None = None
            return
        token = secrets.token_bytes(TOKEN_SIZE)
        segment = _create(end)
        try:
            memory = segment.buf
            assert memory is not None
            memory[:TOKEN_SIZE] = token
            for (offset, size), buffer in zip(layout, out_of_band.buffers):
                with buffer.raw() as raw:
                    memory[offset : offset + size] = raw
            del memory
            if _POSIX:
                # (The name keeps it; the parent's mapping and descriptor are
                # let go. On Windows the handle is what keeps the memory.)
                segment.close()
        except BaseException:
            _release(segment, os.getpid())
            raise
        self.spec = LokySharedSpec(data, segment.name, end, token, tuple(layout))
        self._finalizer = weakref.finalize(self, _release, segment, os.getpid())

    @classmethod
    def of(cls, obj: object) -> LokySharedData | None:
        """A pool's ``shared_data``, pickled (None: none; a manager's or a factory's
        comes pickled, once for all their pools)."""
        return obj if obj is None or isinstance(obj, LokySharedData) else cls(obj)

    @property
    def name(self) -> str | None:
        """The segment's name (None: no large buffers, no segment)."""
        return self.spec.name

    @property
    def size(self) -> int:
        """Bytes in shared memory."""
        return self.spec.size

    def release(self) -> None:
        """Unlink the segment now (idempotent; every holder must be done with it)."""
        if self._finalizer is not None:
            self._finalizer()

    def __reduce__(self) -> Any:
        raise TypeError("a pool's pickled shared data does not travel (its pool holds it)")


def _create(size: int) -> shared_memory.SharedMemory:
    """A new named segment of ``size`` bytes (registered with multiprocessing's
    resource tracker on POSIX)."""
    while True:
        name = f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        try:
            return shared_memory.SharedMemory(name, create=True, size=size)
        except FileExistsError:
            continue


def _release(segment: shared_memory.SharedMemory, owner: int) -> None:
    """Close the parent's handle of ``segment`` and, on POSIX, unlink it (and tell
    the resource tracker), only in the process that made it."""
    if os.getpid() != owner:
        return  # (a forked child's copy: the segment is its parent's)
    segment.close()
    if _POSIX:
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()


# -- in the worker ------------------------------------------------------------------

#: (In a loky worker) the mapping of its pool's segment, kept for the worker's life.
_mapping: mmap.mmap | None = None


def load(spec: LokySharedSpec) -> None:
    """(In a loky worker) map the pool's segment read-only and load its shared
    data, once, for `_shared.shared_data` to return.

    Raises whatever opening, mapping or unpickling raises (``OSError`` if the
    segment is gone or is not the pool's): the worker's setup fails.
    """
    global _mapping
    buffers: list[memoryview] = []
    if spec.name is not None:
        mapping = _open(spec.name, spec.size)
        view = memoryview(mapping).toreadonly()
        if view[:TOKEN_SIZE] != spec.token:
            view.release()
            mapping.close()
            raise OSError(f"the shared-memory segment {spec.name!r} is not this pool's")
        buffers = [view[offset : offset + size] for offset, size in spec.layout]
        _mapping = mapping
    _shared.set_value(pickle.loads(spec.data, buffers=buffers))


def _open(name: str, size: int) -> mmap.mmap:
    """The segment ``name``, mapped (read-only on POSIX), registered with no
    resource tracker."""
    if sys.platform == "win32":
        # (As SharedMemory attaches on Windows; the views are read-only. A name
        # that is gone would map new zeroed memory: the token check fails.)
        return mmap.mmap(-1, size, tagname=name)
    import _posixshmem  # type: ignore[import-not-found]  # (SharedMemory's own, no tracker)

    fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
    try:
        return mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
