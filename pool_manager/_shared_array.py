"""Shared arrays: numpy arrays made in shared memory, sent to workers without a copy.

A numpy argument is written into a memfd segment as it is submitted
(``_buffers.py``): for a while the caller's array and its segment both
exist, twice the memory. `shared_array` makes the array in a memfd from the
start::

    shared_array(shape, dtype) ── memfd (ftruncate: zeros) ── mmap MAP_SHARED, read/write
        │                                   │
        ▼                                   ▼
    numpy.ndarray ── base ──▶ _SharedMapping (the mapping) ── segment ──▶ Segment.adopt(fd)
                                                                              ▲
    submit(f, array) ── pickle: PickleBuffer ── _buffers.share ── owned_segment

When a task's (or a pool's ``shared_data``'s) buffer is all of a shared
array's memory (`owned_segment`: the array's ``base`` chain leads to its
mapping, and the buffer starts where the mapping does and is as large),
``_buffers.share`` sends the array's own segment: nothing is written, and
its content is not checked. A part of the array (a slice, a row) is
written into a segment of its own, as any buffer is.

Semantics: the worker maps the segment as it maps any argument's (copy on
write: a task may write to its argument; no one else sees it) or, for a
pool's ``shared_data``, read-only and shared. The memory is the caller's
array's own: a write the caller makes after a submit may be seen by a task
that has not read that part yet (do not write to it while tasks that read
it run, as with ``multiprocessing.shared_memory``).

Lifetime: the array (any view of it) holds the mapping; the mapping holds
the segment, which owns the descriptor. A task's payload holds the segment
too, so the memory outlives the array while a task that needs it is
unfinished; the kernel frees it when the last descriptor and mapping are
gone. Before Python 3.13 the mapping keeps a duplicate of the descriptor
(two per array). After ``os.fork()`` the child's copy of the descriptor is
closed (``_buffers._forget_segments_in_child``): its array still works,
mapped shared with the parent's, and is written into a new segment when
the child submits it, as any buffer is.

It imports ``_buffers`` only (numpy when an array is made), and sets
``_buffers.owned_segment`` when it makes its first array.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex

from . import _buffers
from ._buffers import _UNTRACKED, Segment

if TYPE_CHECKING:
    import numpy
    from numpy.typing import DTypeLike

__all__ = ["shared_array"]

#: How many ``base`` links `owned_segment` follows from a buffer's exporter to
#: a mapping (numpy keeps the chain short: a view's base is the array that
#: wraps the mapping).
_MOST_LINKS = 16
#: ``numpy.ndarray``, once a shared array has been made (`owned_segment`
#: follows only arrays' ``base``).
_ndarray: Any = None


class _SharedMapping(mmap.mmap):
    """The mapping of a shared array's memfd: its array's ``base``, unmapped when
    the last array over it goes. Holds the segment (the descriptor)."""

    __slots__ = ("address", "segment")

    address: int  #: where the mapping starts in this process
    segment: Segment


def shared_array(
    shape: SupportsIndex | Sequence[SupportsIndex],
    dtype: DTypeLike = float,
    *,
    order: Literal["C", "F"] = "C",
) -> numpy.ndarray[Any, numpy.dtype[Any]]:
    """A new writable numpy array of zeros in shared memory, which a pool sends to
    its workers as it is: no copy, and no check of its content.

    Use it for a large array that tasks read (as an argument, or as a pool's
    ``shared_data``), so that the job holds it once: an ordinary array is
    copied into shared memory as it is submitted, and both exist while the
    tasks run. Fill it in place (``array[:] = ...``, ``numpy.copyto``, an
    ``out=`` argument); an operation that makes a new array (``array + 1``)
    makes an ordinary one.

    Its memory is a memfd (no name in ``/dev/shm``, nothing left after a
    crash) mapped shared and read/write in this process; it is freed once
    the array, every view of it and every unfinished task given it are
    gone. Only the whole array travels without a copy: a slice, a row or
    any view that is part of it is copied as an ordinary array is (into
    shared memory if at least 1 MiB, else in the pickle). In a worker, a
    task's argument is a private copy-on-write view (its writes reach no
    one else) and a pool's ``shared_data`` a read-only one. Do not write to
    the array while tasks that read it run: a task may see the new values
    in the parts it has not read yet, as with
    ``multiprocessing.shared_memory``. After ``os.fork()`` the child's
    array still works (it is the parent's memory, shared), and is copied
    when the child submits it.

    ``shape``, ``dtype`` and ``order`` (``"C"`` or ``"F"``) are those of
    ``numpy.zeros``. An array of no elements has no memory to share: it is
    an ordinary ``numpy.zeros`` array.

    Raises:
        ImportError: numpy is not installed.
        ValueError: a dimension is negative, the array is too large to
            address, or ``order`` is neither ``"C"`` nor ``"F"``.
        TypeError: a dimension is not an integer, or the dtype holds
            Python objects (which cannot live in shared memory).
        OSError: the memfd could not be made or mapped (no memory, no
            descriptors).
    """
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "pool_manager.shared_array needs numpy, which is not installed: pip install numpy"
        ) from None
    dims = _dimensions(shape)
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    kind = numpy.dtype(dtype)
    if kind.hasobject:
        raise TypeError(
            f"a shared array cannot hold Python objects (dtype {kind}): "
            "use a numeric, string or structured dtype"
        )
    size = math.prod(dims) * kind.itemsize
    if size == 0:
        return numpy.zeros(dims, kind, order=order)
    if size > sys.maxsize:
        raise ValueError(f"a shared array of shape {dims} and dtype {kind} is too large")
    fd = os.memfd_create("pool_manager-shared-array", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)  # (zeros; pages are allocated as they are written)
        mapping = _SharedMapping(
            fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, **_UNTRACKED
        )
    except BaseException:
        os.close(fd)
        raise
    mapping.segment = Segment.adopt(fd, size)
    array: numpy.ndarray[Any, numpy.dtype[Any]] = numpy.ndarray(
        dims, kind, buffer=mapping, order=order
    )
    mapping.address = array.__array_interface__["data"][0]
    global _ndarray
    if _ndarray is None:  # (from now on, share looks for shared arrays)
        _ndarray = numpy.ndarray
        _buffers.owned_segment = owned_segment
    return array


def _dimensions(shape: SupportsIndex | Sequence[SupportsIndex]) -> tuple[int, ...]:
    dims: tuple[int, ...]
    try:
        dims = (operator.index(shape),)  # type: ignore[arg-type]
    except TypeError:
        try:
            dims = tuple(operator.index(dim) for dim in shape)  # type: ignore[union-attr]
        except TypeError:
            raise TypeError(
                f"shape must be an integer or a sequence of integers, not {shape!r}"
            ) from None
    if any(dim < 0 for dim in dims):
        raise ValueError(f"a shared array's dimensions cannot be negative: {dims}")
    return dims


def owned_segment(view: memoryview) -> Segment | None:
    """The segment of the shared array whose memory ``view`` (a ``PickleBuffer``'s
    raw view) is all of, or None (not a shared array's, only part of one, or
    its descriptor closed: in a forked child)."""
    exporter: Any = view.obj
    mapping: Any = exporter
    ndarray = _ndarray
    if ndarray is None or not isinstance(exporter, ndarray):
        return None
    for _ in range(_MOST_LINKS):
        mapping = mapping.base
        if not isinstance(mapping, ndarray):
            break
    if type(mapping) is not _SharedMapping:
        return None
    segment = mapping.segment
    if segment.fd < 0 or view.nbytes != segment.size:
        return None
    if exporter.__array_interface__["data"][0] != mapping.address:
        return None
    return segment
