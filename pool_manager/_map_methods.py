"""The map methods every pool has: `MapMethods`, a base of `WorkerPool`.

``map`` (``Executor.map``), ``imap`` (its alias for one iterable),
``imap_unordered``, ``starmap`` and ``starmap_unordered``: the public
signatures, once, each a thin call of the engine's one hook,
``_map_calls(fn, inputs, *, ordered, ...)``. `BaseWorkerPool` (``pool.py``)
and `ChunkedTaskPool` (``_queued.py``, the loky and Dask pools) define it,
both through `_map.map_lazily`; the default here, for a custom pool that
defines only ``submit``, sends one task per call, all at once, as
``Executor.map`` does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any, Literal, TypeVar, overload

from ._map import MapInput, map_lazily
from .progress import ProgressOption

__all__ = ["MapMethods"]

T = TypeVar("T")
A = TypeVar("A")


def _no_chunks(deadline: float | None, chunk: list[Any]) -> Future[Any]:
    raise AssertionError("the default _map_calls submits one task per call")  # (chunksize=1)


class MapMethods(Executor):
    """``map`` and the maps ported from ``multiprocessing.Pool`` and mpire.

    Each returns a lazy iterator, and each takes ``timeout``, ``chunksize``,
    ``progress`` and ``return_exceptions`` as `map` does; the unordered ones
    yield each chunk's results as soon as that chunk is done.
    """

    #: (`WorkerPool.name`: the progress bars' description.)
    name: str | None

    @overload
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: ProgressOption = False,
        return_exceptions: Literal[False] = False,
    ) -> Iterator[T]: ...

    @overload
    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool,
    ) -> Iterator[T | BaseException]: ...

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool = False,
    ) -> Iterator[T | BaseException]:
        """Return an iterator of ``fn`` over the iterables, in order (``Executor.map``).

        Keyword arguments the same for every call: map a
        ``functools.partial(fn, key=value)`` (of a module's function, it
        travels by reference). ``map`` stops at the shortest iterable.

        As ``Executor.map``, with an automatic ``chunksize`` when none is
        given: an input with a length is cut into about
        ``CHUNKS_PER_WORKER`` chunks per worker and submitted at once (a
        ``map`` nobody iterates still runs); an input without one (a
        generator) is read a bounded window ahead, in chunks sized by the
        measured time of each call (about ``TARGET_CHUNK_SECONDS`` of
        calls), and more is read as results are consumed, so an unbounded
        input never fills memory. A bounded pool (``max_pending`` set) also
        submits only what it can hold. ``chunksize=1`` sends one task per
        call (for a Dask pool, one Dask task). ``timeout`` counts from this
        call, also while the pool is full: once it has passed,
        ``TimeoutError`` is raised (by the call itself if its first
        submissions wait that long for room, else on iteration), and the
        tasks the map submitted that have not started are cancelled; so are
        they when the iterator is closed. While the iterator is unfinished,
        the pool counts it (`WorkerPool.unfinished_maps`): a manager does
        not expire the pool under it.

        The pool's ``task_timeout`` (a `BaseWorkerPool`'s) is each call's,
        chunks or not: a call still running that long after it started has
        its worker ended and fails with `TaskTimeoutError`; the calls before
        it keep their results. A call that raises, or whose worker dies,
        costs no result of the calls before it either: they are yielded
        first, then its error is raised.

        ``return_exceptions`` (as ``asyncio.gather``'s): yield every call's
        outcome in order, the exception in place of the result for a call
        that failed, and go on past it. A call that raised yields its
        exception (one that cannot be pickled, a ``RuntimeError`` that
        describes it). In a `BaseWorkerPool`: a call past
        ``task_timeout``, `TaskTimeoutError`, and a call whose worker died
        or was ended for ``kill_worker_memory``, `WorkerLostError`
        (`WorkerMemoryError`): in a chunk with a deadline the worker
        reports each call, so that error is that call's alone and the
        chunk's calls after it run again in a new task; in a chunk without
        one (no ``task_timeout``), every call of the chunk yields it (run
        with ``chunksize=1`` to lose only the call). A result that cannot be
        pickled is its call's error in a chunk with a deadline, every
        call's of its chunk without one. In the loky and Dask pools, a task
        that failed as a whole (its worker lost: `WorkerLostError`; or
        cancelled) yields that error for every call of its chunk. Any other
        failure of a whole task (a terminated pool, arguments that cannot
        be pickled or unpickled, a failed worker start) is yielded for each
        call of its task that has no result. The map's ``timeout`` still
        raises ``TimeoutError``.

        ``progress`` (True, the bar's description, or a dict of tqdm's
        keyword arguments such as ``{"desc": "tenant-a", "leave": False,
        "position": 1}``) draws a tqdm progress bar (the extra
        ``pool-manager[progress]``) that advances as results are handed out,
        in input order (its postfix says so), described by the pool's
        `name` (a manager's key); its total is the input's length when it
        has one.

        A pool that defines only ``submit`` (a custom `WorkerPool`) sends
        one task per call, all at once, as ``Executor.map`` does, whatever
        the ``chunksize``.

        Raises:
            ValueError: ``chunksize`` < 1.
            ModuleNotFoundError: ``progress`` asked for and tqdm is not installed.
            ResultTimeoutError: a result was not ready in time, or the pool
                stayed full until the timeout (a ``TimeoutError`` and a
                ``concurrent.futures.TimeoutError``, also on 3.10).
            Exception: (on iteration, without ``return_exceptions``)
                whatever ``fn`` raised, or the task's error
                (`TaskTimeoutError`, `WorkerLostError`, ...).
        """
        return self._map_calls(
            fn,
            MapInput(iterables),
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    @overload
    def imap(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: Literal[False] = False,
    ) -> Iterator[T]: ...

    @overload
    def imap(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool,
    ) -> Iterator[T | BaseException]: ...

    def imap(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool = False,
    ) -> Iterator[T | BaseException]:
        """``fn(item)`` for each item, in order: ``map(fn, iterable)``, by another name.

        As ``multiprocessing.Pool.imap``; everything as `map` (``chunksize``
        is by keyword).
        """
        return self._map_calls(
            fn,
            MapInput((iterable,)),
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    @overload
    def imap_unordered(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: Literal[False] = False,
    ) -> Iterator[T]: ...

    @overload
    def imap_unordered(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool,
    ) -> Iterator[T | BaseException]: ...

    def imap_unordered(
        self,
        fn: Callable[[A], T],
        iterable: Iterable[A],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool = False,
    ) -> Iterator[T | BaseException]:
        """``fn(item)`` for each item, results as they finish.

        As ``multiprocessing.Pool.imap_unordered`` (and mpire's
        ``imap_unordered``; ``chunksize`` is by keyword). A chunk's results
        go out, in their chunk's order, as soon as that chunk is done,
        whatever the chunks before it. Nothing else differs from `map`: the
        bounded window over an input without a length (more is read as
        results go out), ``timeout``, the cancel of what is queued when the
        iterator is closed or the timeout passes, the hold on the pool while
        unfinished, ``return_exceptions`` (the exception in place of its
        call's result; the calls that a lost worker took from a chunk with a
        deadline run again, and go out when they are done). Its progress bar
        counts results as they go out, in completion order. Each result
        comes back through its task's done-callback (the map's own, O(1)
        per result): a done-callback of yours that blocks, on the same
        pool, holds them up as it holds up the pool's other callbacks.
        """
        return self._map_calls(
            fn,
            MapInput((iterable,)),
            ordered=False,
            timeout=timeout,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    @overload
    def starmap(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: Literal[False] = False,
    ) -> Iterator[T]: ...

    @overload
    def starmap(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool,
    ) -> Iterator[T | BaseException]: ...

    def starmap(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool = False,
    ) -> Iterator[T | BaseException]:
        """``fn(*args)`` for each ``args`` of ``iterable``, in order (``itertools.starmap``).

        Returns a lazy iterator, as `map` does, where
        ``multiprocessing.Pool.starmap`` returns a list (``list(...)`` it).
        Everything else as `map`.
        """
        return self._map_calls(
            fn,
            MapInput((iterable,), star=True),
            ordered=True,
            timeout=timeout,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    @overload
    def starmap_unordered(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: Literal[False] = False,
    ) -> Iterator[T]: ...

    @overload
    def starmap_unordered(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool,
    ) -> Iterator[T | BaseException]: ...

    def starmap_unordered(
        self,
        fn: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        timeout: float | None = None,
        progress: ProgressOption = False,
        return_exceptions: bool = False,
    ) -> Iterator[T | BaseException]:
        """`starmap`, results as they finish, as `imap_unordered` yields them."""
        return self._map_calls(
            fn,
            MapInput((iterable,), star=True),
            ordered=False,
            timeout=timeout,
            chunksize=chunksize,
            progress=progress,
            return_exceptions=return_exceptions,
        )

    def _map_calls(
        self,
        fn: Callable[..., Any],
        inputs: MapInput,
        *,
        ordered: bool,
        timeout: float | None,
        chunksize: int | None,
        progress: ProgressOption,
        return_exceptions: bool,
    ) -> Iterator[Any]:
        """The engine's map, which every map method calls: ``fn`` over
        ``inputs``, in order (``ordered``) or as the tasks finish.

        This default (a pool that defines only ``submit``) sends one task per
        call through ``submit``, all at once, as ``Executor.map`` does
        (``chunksize`` is not used), so no iterator of it is left waiting to
        send (`WorkerPool.unfinished_maps` stays 0).
        """
        return map_lazily(
            fn,
            inputs,
            submit=lambda deadline, call, args: self.submit(call, *args),
            submit_chunk=_no_chunks,
            timeout=timeout,
            chunksize=1,
            workers=1,
            window=sys.maxsize,  # (everything at once)
            progress=progress,
            name=self.name,
            ordered=ordered,
            return_exceptions=return_exceptions,
        )
