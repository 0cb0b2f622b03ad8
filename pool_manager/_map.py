"""``map`` for every pool here: ordered or not, chunked, lazy where it must be.

`map_lazily` is the one implementation every pool's map methods share
(``map``, ``imap``, ``imap_unordered``, ``starmap``, ``starmap_unordered``:
`_map_methods.MapMethods`, through each engine's ``_map_calls``; the Dask
and loky pools' through their base, `_queued.ChunkedTaskPool`, whose chunks
run as `chunk_runner`, a task of their own). Its input is a `MapInput`
(the iterables zipped, or one iterable of argument tuples). It cuts the
input into chunks (`_ChunkSizer`: fixed, cut from a known length, or sized
by measured run times), keeps a bounded window of them submitted, yields
results in order (`_InOrder`; those before a failing call first: see
`PartialChunk`) or as their chunks finish (`_AsCompleted`, fed by the
chunks' done-callbacks), and cancels what is left when the consumer stops
early or the timeout passes. With ``return_exceptions`` it yields every
call's outcome, an exception in place of a result, and runs again the
calls of a chunk that its worker took down after the call that did
(`_chunk_outcomes`). `OpenMaps` is how a pool knows it has a lazy
iterator not yet finished (a manager does not expire it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import queue
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sized
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures.process import _ExceptionWithTraceback, _rebuild_exc
from typing import Any, NamedTuple, TypeVar

from ._durations import MAX_WAIT, wait_step
from ._protocol import CallFailed, PartialChunk, load_outcome
from .errors import ResultTimeoutError
from .progress import ProgressOption, asks_for_a_bar, with_progress

__all__ = [
    "CHUNKS_PER_WORKER",
    "MAX_CHUNK",
    "TARGET_CHUNK_SECONDS",
    "MapInput",
    "OpenMaps",
    "known_length",
    "chunk_runner",
    "map_lazily",
]

T = TypeVar("T")


#: ``map`` with no chunk size: a sized input is cut in about this many
#: chunks per worker; an unsized one in chunks of about this many seconds.
CHUNKS_PER_WORKER = 16
TARGET_CHUNK_SECONDS = 0.01
MAX_CHUNK = 65536

_TIMED_OUT = "map: a result was not ready within its timeout; the tasks not started were cancelled"


class MapInput(NamedTuple):
    """What a map calls ``fn`` with: one item of each of ``iterables`` per
    call (zipped, as ``map`` does), or, with ``star`` (``starmap``), the
    items of the one iterable, each a tuple of the call's arguments."""

    iterables: tuple[Iterable[Any], ...]
    star: bool = False

    @property
    def starred(self) -> bool:
        """Is each call's item a tuple of its arguments (else the one argument)?"""
        return self.star or len(self.iterables) != 1

    def items(self) -> Iterator[Any]:
        """Each call's item (`starred`: its arguments), read as they are asked for."""
        if len(self.iterables) == 1:
            return iter(self.iterables[0])
        return zip(*self.iterables)


def _result_or_cancel(future: Future[Any], end_time: float | None) -> Any:
    """``future``'s result by ``end_time``; cancels it if that fails.

    Raises `ResultTimeoutError` (both ``TimeoutError`` classes, on 3.10 too)
    when ``end_time`` passes first.
    """
    try:
        if end_time is None:
            return future.result()
        try:
            # (In steps: a wait of centuries overflows Condition.wait.)
            while end_time - time.monotonic() > MAX_WAIT:
                with contextlib.suppress(FuturesTimeoutError):
                    return future.result(MAX_WAIT)
            return future.result(end_time - time.monotonic())
        except concurrent.futures.TimeoutError as error:
            if future.done() and not future.cancelled() and future.exception() is error:
                raise  # the task's own exception, not the wait's
            raise ResultTimeoutError(_TIMED_OUT) from None
    finally:
        future.cancel()


def _outcome(future: Future[Any], end_time: float | None) -> tuple[bool, Any]:
    """`_result_or_cancel` as ``(ok, result or the task's exception)``.

    What the wait raises itself (the map's timeout, an interrupt) is raised.
    """
    try:
        return True, _result_or_cancel(future, end_time)
    except BaseException as error:
        if future.cancelled():
            if isinstance(error, CancelledError):
                return False, error
        elif future.done() and future.exception() is error:
            return False, error
        raise


def known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    """How many calls ``map`` makes, if every iterable knows its length."""
    lengths = []
    for iterable in iterables:
        if not isinstance(iterable, Sized):
            return None
        try:
            lengths.append(len(iterable))
        except TypeError:
            return None
    return min(lengths) if lengths else 0


class _MapHold:
    """Held by a lazy ``map`` iterator while it is unfinished (see `OpenMaps`)."""

    __slots__ = ("__weakref__",)


class OpenMaps:
    """A pool's lazy ``map`` iterators that are not exhausted, closed or collected.

    Each iterator holds a `_MapHold` until it ends (its generator drops it on
    exhaustion, on error and on ``close()``; an iterator never started drops
    it when collected). The set is weak and takes no lock, so an iterator
    collected on any thread, under any lock, costs nothing but its removal.
    """

    def __init__(self) -> None:
        self._holds: weakref.WeakSet[_MapHold] = weakref.WeakSet()

    def __len__(self) -> int:
        return len(self._holds)

    def hold(self) -> _MapHold:
        hold = _MapHold()
        self._holds.add(hold)
        return hold


class _ChunkSizer:
    """``map``'s chunk size: fixed, cut from a known length, or measured as it goes."""

    def __init__(
        self,
        chunksize: int | None,
        length: int | None,
        workers: int,
        target: float = TARGET_CHUNK_SECONDS,
    ) -> None:
        self.fixed = chunksize
        self._target = target  # seconds of calls in a measured chunk
        if chunksize is None and length is not None:
            self.fixed = max(1, min(MAX_CHUNK, -(-length // (workers * CHUNKS_PER_WORKER))))
        self._size = 1
        self._per_call: float | None = None

    def next_size(self) -> int:
        if self.fixed is not None:
            return self.fixed
        size = self._size
        if self._per_call is None:
            self._size = min(MAX_CHUNK, size * 2)  # ramp up until the first measure
        return size

    def observe(self, calls: int, run_time: float | None) -> None:
        if self.fixed is not None or not calls or run_time is None:
            return
        self._per_call = run_time / calls
        self._size = max(1, min(MAX_CHUNK, int(self._target / max(self._per_call, 1e-7))))


def map_lazily(
    fn: Callable[..., T],
    inputs: MapInput,
    *,
    submit: Callable[[float | None, Callable[..., Any], tuple[Any, ...]], Future[Any]],
    submit_chunk: Callable[[float | None, list[Any]], Future[list[Any] | PartialChunk]],
    timeout: float | None,
    chunksize: int | None,
    workers: int,
    window: int | None,
    progress: ProgressOption,
    name: str | None,
    ordered: bool = True,
    target_chunk_seconds: float = TARGET_CHUNK_SECONDS,
    open_maps: OpenMaps | None = None,
    return_exceptions: bool = False,
) -> Iterator[Any]:
    """The chunked map that every pool's map methods share.

    ``fn`` over ``inputs`` (see `MapInput`). ``ordered``: results in input
    order; else in completion order, a chunk's results as its chunk is
    done (a chunk run again goes back in flight). ``submit(deadline, fn,
    args)`` sends one call; ``submit_chunk(deadline,
    chunk)`` sends a list of argument items (a tuple each when
    ``inputs.starred``) and its future's result is the list of results, or a
    `PartialChunk` when a call failed after others had returned (or a
    ``(results, exception)`` tuple, from a runner that does without
    pool_manager: the Dask pool's): those results are yielded, then the
    error raised (as with one task per call). Under
    backpressure both wait for room until ``deadline`` (``time.monotonic()``
    time ``timeout`` after the call; None: no limit), then raise
    ``TimeoutError``: the map raises it, and cancels what it submitted. With no
    ``chunksize``, an input with a length is cut into about
    ``CHUNKS_PER_WORKER`` chunks per worker and submitted at once; an input
    without one is read ``window`` tasks ahead (``max(8, 4 * workers)`` when
    ``window`` is None) in chunks sized by the measured time of each call.
    A ``window`` also bounds an input with a length (backpressure).
    Measured chunks hold about ``target_chunk_seconds`` of calls.
    ``progress``/``name``: see `MapMethods.map`. The iterator is in
    ``open_maps`` until it is exhausted, closed or collected.

    ``return_exceptions``: yield every call's outcome, an
    exception in place of a result (see `_chunk_outcomes`); ``submit_chunk``
    then sends a runner that goes on past a call that raises (its results
    list holds a `CallFailed`, or the exception itself, in that call's
    place). A chunk future with per-call reports (a pool's task with a
    deadline: ``reports``, ``reported_late``, ``lost_with_worker``, see
    ``_pool_tasks._TaskFuture``) keeps the results before a call that took
    its worker down, and the calls after it run again as a new task when
    the map still needs them. The map's ``timeout`` still raises.
    """
    if chunksize is not None:
        if isinstance(chunksize, bool) or not isinstance(chunksize, int):
            raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    end_time = None if timeout is None else timeout + time.monotonic()
    length = known_length(inputs.iterables)

    def start() -> Iterator[T]:
        calls = inputs.items()
        starred = inputs.starred
        ahead = max(8, 4 * workers) if window is None and length is None else window
        sizer = _ChunkSizer(chunksize, length, workers, target_chunk_seconds)
        chunks: dict[Future[Any], list[Any]] = {}  # a submitted chunk's calls, where kept
        if sizer.fixed == 1:
            if starred:
                tasks: Iterator[Future[Any]] = (submit(end_time, fn, args) for args in calls)
            else:
                tasks = (submit(end_time, fn, (arg,)) for arg in calls)
            chunked = False
        else:

            def chunk_tasks() -> Iterator[Future[Any]]:
                while True:
                    chunk = list(itertools.islice(calls, sizer.next_size()))
                    if not chunk:
                        return
                    future = submit_chunk(end_time, chunk)
                    if return_exceptions or getattr(future, "reports", None) is not None:
                        chunks[future] = chunk  # (to run again what its worker took down)
                    yield future

            tasks = chunk_tasks()
            chunked = True
        in_flight: _InOrder | _AsCompleted = _InOrder() if ordered else _AsCompleted()
        # Held from before the first submission: the pool is never idle in between.
        hold = None if open_maps is None else open_maps.hold()
        try:
            in_flight.extend(itertools.islice(tasks, ahead))
        except BaseException:  # the pool stayed full to the deadline, or shut down
            in_flight.cancel_all()
            hold = None  # (the traceback keeps this frame)
            raise

        def resend(calls: list[Any]) -> Future[Any]:
            future = submit_chunk(end_time, calls)
            chunks[future] = calls
            return future

        return _map_results(
            in_flight,
            tasks,
            end_time,
            sizer=sizer,
            hold=hold,
            chunks=chunks,
            resend=resend if chunked else None,
            return_exceptions=return_exceptions,
        )

    if not asks_for_a_bar(progress):
        return start()
    return with_progress(start, progress, name, length, "item", in_input_order=ordered)


class _InOrder:
    """A map's tasks in flight, taken back in the order they were sent (a
    chunk sent again goes first: its calls are the next in the input)."""

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: deque[Future[Any]] = deque()

    def __bool__(self) -> bool:
        return bool(self._futures)

    def extend(self, futures: Iterable[Future[Any]]) -> None:
        self._futures.extend(futures)

    def add_rerun(self, future: Future[Any]) -> None:
        self._futures.appendleft(future)

    def take(self, end_time: float | None) -> Future[Any]:
        """The next task in order, done or not (`_outcome` waits for it)."""
        return self._futures.popleft()

    def cancel_all(self) -> None:
        for future in self._futures:
            future.cancel()


class _AsCompleted:
    """A map's tasks in flight, taken back as they finish (or are cancelled).

    Each task's done-callback puts it on this map's own queue, so taking the
    next one costs the same however many are in flight (where
    ``concurrent.futures.wait`` would look at each of them). The callback
    is the library's own (one ``put``); it runs where the pool runs
    done-callbacks, a pool's one at a time.
    """

    __slots__ = ("_in_flight", "_done")

    def __init__(self) -> None:
        self._in_flight: set[Future[Any]] = set()
        #: Signalled by the tasks' done-callbacks (each task puts itself once).
        self._done: queue.SimpleQueue[Future[Any]] = queue.SimpleQueue()

    def __bool__(self) -> bool:
        return bool(self._in_flight)

    def extend(self, futures: Iterable[Future[Any]]) -> None:
        for future in futures:
            self._in_flight.add(future)
            future.add_done_callback(self._done.put)

    def add_rerun(self, future: Future[Any]) -> None:
        self.extend((future,))

    def take(self, end_time: float | None) -> Future[Any]:
        """The next task to finish: waits for one until ``end_time`` (None: no limit).

        A task that finished by then is taken even when ``end_time`` has
        passed, as `_result_or_cancel` returns a result that is ready.

        Raises:
            ResultTimeoutError: none finished by ``end_time``.
        """
        while True:
            left = None if end_time is None else end_time - time.monotonic()
            try:
                if left is not None and left <= 0:
                    future = self._done.get_nowait()
                else:  # (in steps: a wait of centuries overflows the lock's wait)
                    future = self._done.get(timeout=wait_step(left))
                break
            except queue.Empty:
                if left is not None and left <= 0:
                    raise ResultTimeoutError(_TIMED_OUT) from None
        self._in_flight.discard(future)
        return future

    def cancel_all(self) -> None:
        for future in self._in_flight:
            future.cancel()


class _ChunkOutcome(NamedTuple):
    """What a chunk's future came to, in the map's terms (see `_chunk_outcomes`)."""

    results: list[Any]  #: to yield, in order (exceptions among them, with return_exceptions)
    failure: BaseException | None  #: to raise after them
    rerun: list[Any] | None  #: the chunk's calls to send again, after them


def _chunk_outcomes(
    ok: bool,
    value: Any,
    future: Future[Any],
    chunk: list[Any] | None,
    return_exceptions: bool,
) -> _ChunkOutcome:
    """A chunk's outcomes: its results, the error to raise, the calls to run again.

    Its results are those its worker reported as it went (a task with a
    deadline: `_pool_tasks._TaskFuture.reports`), then its answer's: a
    list, a `PartialChunk`, or a Dask runner's ``(results, error)``. A
    chunk that failed as a whole (``ok`` false) failed at the call after
    the reported ones: if its worker was lost running that call (past its
    deadline, past ``kill_worker_memory``, or dead), that call fails alone
    and the calls after it run again (when the map still needs them: with
    ``return_exceptions``); any other failure (a chunk without reports, a
    terminated pool, arguments that would not unpickle, a result that
    would not) is every unreported call's. A report read after the pool had
    decided to end the worker for its deadline means no call overran: the
    ones not reported run again. With ``return_exceptions``, failures go among the results
    (a `CallFailed` loaded, or the chunk's error once for each call it
    took), and nothing is raised.
    """
    reports: list[bytes | bytearray] | None = getattr(future, "reports", None)
    results: list[Any] = []
    failure: BaseException | None = None
    for body in reports or ():
        loaded_ok, loaded = load_outcome(True, body)
        if not loaded_ok and not return_exceptions:
            return _ChunkOutcome(results, loaded, None)
        results.append(loaded)
    if not ok:
        failure = value
    elif isinstance(value, PartialChunk):
        results.extend(value.results)
        failure = load_outcome(False, value.error)[1]
    elif isinstance(value, tuple):
        results.extend(value[0])
        failure = _traced(value[1])
    else:
        results.extend(value)
    rerun = None
    if (
        failure is not None
        and chunk is not None
        and reports is not None
        and getattr(future, "lost_with_worker", False)
    ):
        done = len(results)
        if getattr(future, "reported_late", False):
            failure, rerun = None, chunk[done:]
        elif return_exceptions:
            results.append(failure)
            failure, rerun = None, chunk[done + 1 :]
    if return_exceptions:
        for index, result in enumerate(results):
            if type(result) is CallFailed:
                results[index] = load_outcome(False, result.error)[1]
            elif type(result) is _ExceptionWithTraceback:
                results[index] = _traced(result)
        if failure is not None:
            assert chunk is not None
            results.extend(itertools.repeat(failure, len(chunk) - len(results)))
            failure = None
    return _ChunkOutcome(results, failure, rerun or None)


def _traced(error: Any) -> Any:
    """A chunk runner's error: loaded with its worker's traceback as its cause, or
    (run in this process: a Dask worker's thread) still wrapped, then unwrapped."""
    if type(error) is _ExceptionWithTraceback:
        return _rebuild_exc(error.exc, error.tb)  # type: ignore[arg-type]  # (tb: its text)
    return error


def _map_results(
    in_flight: _InOrder | _AsCompleted,
    tasks: Iterator[Future[Any]],
    end_time: float | None,
    *,
    sizer: _ChunkSizer,
    hold: _MapHold | None,
    chunks: dict[Future[Any], list[Any]],
    resend: Callable[[list[Any]], Future[Any]] | None,
    return_exceptions: bool,
) -> Iterator[Any]:
    # A generator of its own, so that map_lazily submits its first window
    # now. It keeps no reference to a result it has handed out (nor to its
    # future), as Executor.map does: results go out by list.pop().
    # (``resend``: a chunked map's; it sends calls again as a chunk.)
    unsubmitted: BaseException | None = None  # why the rest of the input was not sent
    try:
        while in_flight:
            future = in_flight.take(end_time)
            ok, value = _outcome(future, end_time)
            if resend is None:
                if not (ok or return_exceptions):
                    raise value
                results, failure = [value], None
            else:
                chunk = chunks.pop(future, None)
                # A call failed part-way: the results before it go out
                # first, as they would with one task per call.
                results, failure, rerun = _chunk_outcomes(
                    ok, value, future, chunk, return_exceptions
                )
                if ok:
                    sizer.observe(len(results), getattr(future, "run_time", None))
                if rerun is not None:
                    # In order: before the others (the map's order is the input's).
                    try:
                        in_flight.add_rerun(resend(rerun))
                    except Exception as error:  # the pool full to the deadline, or shut down
                        failure = error
            del future, value
            # Keep the pool fed before handing the result out.
            if unsubmitted is None and failure is None:
                try:
                    in_flight.extend(itertools.islice(tasks, 1))
                except ResultTimeoutError as error:
                    # The pool stayed full to the deadline. Results ready by
                    # then still go out; the first one that is not raises.
                    unsubmitted = error
            results.reverse()
            while results:
                yield results.pop()
            if failure is not None:
                raise failure
        if unsubmitted is not None:
            raise unsubmitted
    finally:
        # The map is over: no longer in its pool's OpenMaps (nor kept there
        # by a traceback that holds this frame).
        del hold
        in_flight.cancel_all()


def chunk_runner(
    fn: Callable[..., Any], starred: bool, catch: bool = False
) -> Callable[[list[Any]], Any]:
    """What a worker runs for one ``map`` chunk of a pool that sends each chunk as
    one task of its own (the Dask and loky pools'): the list of results, or,
    when a call raises after others have returned, ``(results, error)``, so
    that ``map`` yields those results before it raises (see `map_lazily`).
    With ``catch`` (``return_exceptions``), every call runs and one that
    raised has its exception in its place (one that cannot be pickled, a
    ``RuntimeError`` that describes it, as a `BaseWorkerPool`'s worker
    sends it), so the other calls' results still travel. Each error goes
    with its traceback (as ``ProcessPoolExecutor`` sends a task's: it loads
    with the worker's traceback as its ``__cause__``).

    A nested function travels by value (cloudpickle), with builtins,
    itertools and cloudpickle only: a worker needs nothing of pool_manager
    to run it (a Dask worker may not have it).
    """

    def run_chunk(chunk: list[Any]) -> Any:
        from concurrent.futures.process import _ExceptionWithTraceback as traced

        results: list[Any] = []
        if catch:
            import cloudpickle

            for item in chunk:
                try:
                    results.append(fn(*item) if starred else fn(item))
                except BaseException as error:
                    where = error.__traceback__
                    try:
                        cloudpickle.dumps(error)
                    except BaseException as pickling_error:
                        error = RuntimeError(
                            f"{type(error).__qualname__}: {error} (the exception itself could "
                            f"not be pickled: {pickling_error!r})"
                        )
                    results.append(traced(error, where))  # type: ignore[arg-type]
            return results
        try:
            # (extend keeps what it appended before an error, as a loop would.)
            results.extend(itertools.starmap(fn, chunk) if starred else map(fn, chunk))
        except BaseException as error:
            if not results:
                raise
            return results, traced(error, error.__traceback__)  # type: ignore[arg-type]
        return results

    return run_chunk
