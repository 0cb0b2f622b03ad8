"""Shared data per pool: one large read-only object for every worker of a pool.

``BaseWorkerPool(..., shared_data=obj)`` (and ``WorkerPoolManager(...,
shared_data=obj)``, for every pool its default factory builds) pickles
``obj`` once, in the parent, as the pool is built (`SharedData`): protocol
5, its large buffers out of band (numpy arrays' data, a
``pickle.PickleBuffer``, a large top-level ``bytes``: the same rule as a
task's arguments, ``_protocol.BUFFER_THRESHOLD``), each written once into a
memfd segment by ``_buffers.share`` (which reuses a live segment of the same
content). The pool holds the segments for its life; a manager's are made
once and held by each of its pools.

Each worker gets the small pickle in its ``INIT`` (in `_worker.WorkerConfig`,
as a `SharedPickle`) and the segments' descriptors with it (``SCM_RIGHTS``);
it maps them read-only (`load`, so a numpy array it gets is not writeable)
and loads the object once, before the initializer runs, and keeps it for its
life: `shared_data` returns it to a task or the initializer. A ``bytes`` or
``bytearray`` loads as a copy of its own in each worker (those types own
their memory); an array, or a ``PickleBuffer`` (a read-only ``memoryview``
in the worker), is a view of the mapping that every worker shares.

Lifetime: a segment's descriptor is closed in the parent when nothing holds
it (`_buffers.Segment`): not the pool once it is disposed (its workers
gone) or collected, nor the manager once it is shut down, nor an ``INIT``
not yet sent. A worker's mappings go when it exits.

The loky engine's pools do the same with one named shared-memory segment
instead of memfd descriptors (``_loky_shared.py``); their workers store
the object here too (`set_value`), for `shared_data` to return.

A worker also keeps its index in its pool here (`set_worker_index`), for
`worker_index` to return to a task or the initializer.

It imports ``_buffers`` and ``_protocol`` only: the workers import it.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

from ._buffers import Segment, map_segments, share
from ._protocol import ByReference, _is_large_bytes, _LargeBytes, _OutOfBand, dumps

__all__ = [
    "SharedData",
    "SharedPickle",
    "is_worker",
    "load",
    "mark_worker",
    "set_value",
    "set_worker_index",
    "shared_data",
    "worker_index",
]


class SharedPickle(NamedTuple):
    """What a worker's ``INIT`` says of its pool's shared data (in ``WorkerConfig``)."""

    data: bytes  #: the pickle, its large buffers left out
    buffers: int  #: how many of the ``INIT`` message's descriptors hold them, in order


class SharedData:
    """(Parent side) a pool's shared data, pickled once: the pickle, and the
    segments of its large buffers (held: their descriptors stay open while
    this lives)."""

    __slots__ = ("segments", "spec")

    def __init__(self, obj: object, main: ByReference | None) -> None:
        """Raises ``TypeError`` if ``obj`` cannot be pickled, ``OSError`` if its
        buffers cannot be put in shared memory."""
        out_of_band = _OutOfBand()
        try:
            data = dumps(
                _LargeBytes(obj) if _is_large_bytes(obj) else obj,  # type: ignore[arg-type]
                main,
                buffer_callback=out_of_band,
            )
        except Exception as error:
            raise TypeError(f"shared_data must be picklable: {error}") from error
        try:
            self.segments: tuple[Segment, ...] = share(out_of_band.buffers)
        except pickle.PicklingError as error:
            raise OSError(
                f"shared_data's large buffers could not be put in shared memory: {error.__cause__}"
            ) from error.__cause__
        self.spec = SharedPickle(data, len(self.segments))

    @classmethod
    def of(cls, obj: object, main: ByReference | None) -> SharedData | None:
        """A pool's ``shared_data``, pickled (None: none; a manager's comes pickled,
        once for all its pools)."""
        return obj if obj is None or isinstance(obj, SharedData) else cls(obj, main)

    @property
    def size(self) -> int:
        """Bytes in shared memory."""
        return sum(segment.size for segment in self.segments)


# -- in the worker ------------------------------------------------------------------

_NOT_A_WORKER = object()
_NONE = object()
#: This process's shared data: `_NOT_A_WORKER` until a worker sets itself up
#: (`mark_worker`, `load`), then `_NONE` or the object.
_value: Any = _NOT_A_WORKER


#: (Worker side) its index in its pool; None: not a worker (`worker_index`).
_index: int | None = None


def mark_worker() -> None:
    """(Worker side) this process is a worker (of a pool with no shared data, until `load`)."""
    global _value
    _value = _NONE


def set_worker_index(index: int) -> None:
    """(Worker side) this worker's index in its pool (`worker_index`)."""
    global _index
    _index = index


def worker_index() -> int:
    """This worker's index in its pool, for a task or the initializer (as mpire's
    ``worker_id``): 0 for the pool's first worker, up to ``max_size - 1``.

    A new worker takes the lowest index that no worker of its pool taking
    tasks holds, so a worker that replaces one (recycled, timed out,
    crashed, idle and started again) takes the index it left free: one
    index per working worker, e.g. to pick a GPU or a scratch file. (A
    worker leaving, still running its ``finalizer``, has given its index up
    already.) Fork-server and loky pools set it; a Dask pool's workers are
    Dask's and have none.

    Raises:
        LookupError: not in a worker process of a fork-server or loky pool.
    """
    index = _index
    if index is None:
        raise LookupError(
            "pool_manager.worker_index() is for a task or initializer running in a worker "
            "process of a fork-server or loky pool; this process is not one"
        )
    return index


def is_worker() -> bool:
    """True in a worker process of this library's pools (either engine)."""
    return _value is not _NOT_A_WORKER


def set_value(value: object) -> None:
    """(Worker side) this worker's shared data is ``value`` (loaded by another
    engine: a loky worker's, ``_loky_shared.load``)."""
    global _value
    _value = value


def load(spec: SharedPickle, fds: Sequence[int]) -> None:
    """(Worker side) map the segments ``fds`` read-only (the descriptors are
    closed, whatever happens) and load the shared data from them, once.

    Raises whatever mapping or unpickling raises: the worker's setup fails.
    """
    global _value
    # (Views, not the mappings: a PickleBuffer then loads as a read-only
    # memoryview, which has no close() to pull the memory from under its readers.)
    buffers = [memoryview(mapping) for mapping in map_segments(fds, readonly=True)]
    _value = pickle.loads(spec.data, buffers=buffers)


def shared_data() -> Any:
    """The shared data of the pool this worker belongs to (``shared_data=`` of
    `BaseWorkerPool`, `WorkerPoolManager`, or the loky engine's
    ``LokyWorkerPool`` and ``LokyPoolFactory``), for a task or the initializer.

    The object was pickled once when the pool was built and loaded once in
    this worker, before its initializer ran: every call returns the same
    object. A numpy array in it is a read-only view of memory every worker
    of the pool shares (writing to it raises ``ValueError``: copy it
    first)::

        import numpy
        from pool_manager import BaseWorkerPool, shared_data

        def row_sum(row: int) -> float:
            return float(shared_data()[row].sum())

        table = numpy.random.default_rng(0).random((10_000, 1_000))  # 80 MB
        with BaseWorkerPool(4, shared_data=table) as pool:
            sums = list(pool.map(row_sum, range(10_000)))

    Raises:
        LookupError: not in a worker process of this library, or in one of a
            pool built without ``shared_data``.
    """
    value = _value
    if value is _NOT_A_WORKER:
        raise LookupError(
            "pool_manager.shared_data() is for a task or initializer running in a worker "
            "process of a pool; this process is not one (pass the object itself here)"
        )
    if value is _NONE:
        raise LookupError(
            "this worker's pool has no shared data: build it with shared_data=obj "
            "(BaseWorkerPool, WorkerPoolManager, LokyWorkerPool or LokyPoolFactory)"
        )
    return value
