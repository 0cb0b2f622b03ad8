"""Each key's pool on a Dask distributed cluster (optional: ``pip install 'pool-manager[dask]'``).

``DaskPoolFactory(client)`` is a manager factory: the pool it builds for a
key, a `DaskWorkerPool`, sends that key's tasks to the cluster behind
``client`` instead of starting local processes. The manager, its cache of
pools, leases, expiry and each key's queue stay on the client side; the
cluster only ever sees tasks::

    with WorkerPoolManager(4, 600, 4 * 3600) as manager:
        with manager.lease("tenant-a", factory=DaskPoolFactory(client)) as pool:
            results = list(pool.map(crunch, range(100)))

How a task travels::

    submit ──▶ local queue ──▶ dispatch ──────────▶ ClientExecutor ──▶ scheduler ──▶ worker
      │        (cancellable;    (at most             (client.submit,                    │
      │         backpressure)    worker_count         pure=False)                       │
      │                          in flight)                                             │
      ▼                                                                                 │
    future ◀── _finish ◀── done callback, on the Client's event-loop thread ◀── result ◀─┘

- The per-key cap: at most `DaskWorkerPool.worker_count` of a key's tasks
  are on the cluster at once (sent, not answered); the rest wait in the
  pool's local queue, where ``cancel()`` works. Dask itself has no such cap:
  ``Client.submit`` sends everything at once.
- Backpressure: with ``max_pending`` set, ``submit`` blocks while
  ``worker_count + max_pending`` tasks are unfinished, as `BaseWorkerPool`
  does: both are `QueuedPool`s (``_queued.py``), which hold admission,
  backpressure, the counts, cancel while queued and ``shutdown``; this
  module holds sending to the cluster, its answers, and ``dispose``.
  ``map`` submits only what the pool can hold (Dask's own ``map`` is
  eager), and reads an input without a length a bounded window ahead.
- Disposal shuts the key's ``ClientExecutor`` down (it holds no thread or
  process of its own) and never closes the shared client.
- A worker lost on the cluster: Dask reruns the tasks it held on other
  workers; a task whose workers keep dying (``distributed.scheduler.allowed-failures``
  more times, 3 by default) fails with `WorkerLostError`, caused by Dask's
  ``KilledWorker``. Other tasks complete; one that was running on a dead
  worker runs again (at least once, not exactly once). See ``docs/dask.md``.

Only this module imports ``distributed``; the rest of the package never
needs it. The workers need only the task's code (and Dask): nothing of
pool_manager is sent to them (``map``'s chunk runner is a nested function,
which cloudpickle sends by value, and uses builtins and itertools only).
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Executor, Future
from typing import Any, TypeVar

try:
    from distributed import Client, KilledWorker
except ImportError as error:
    raise ImportError(
        "pool_manager.dask needs Dask's distributed scheduler, which is not installed: "
        "pip install 'pool-manager[dask]'"
    ) from error

from ._durations import to_count
from ._queued import ChunkedTaskPool, _QueuedFuture
from .errors import PoolTerminatedError, WorkerLostError

__all__ = ["DaskPoolFactory", "DaskWorkerPool"]

T = TypeVar("T")

logger = logging.getLogger("pool_manager")

#: ``map`` over an input without a length, with no chunk size: chunks are
#: sized to about this many seconds of calls, as measured from the client
#: (a Dask task costs about a millisecond of scheduling, so chunks are
#: longer than a `BaseWorkerPool`'s).
TARGET_CHUNK_SECONDS = 0.1

_UNSET: Any = object()

#: ``Client.status`` values after which a client answers nothing more.
_CLIENT_GONE = frozenset({"closing", "closed"})
#: Seconds between two looks at the client's status while `dispose` waits.
_CLIENT_CHECK = 1.0


def _on_loop_of(client: Client) -> bool:
    """True on the thread running ``client``'s event loop (in a done callback, say).

    Waiting there for a task of the cluster would wait forever: the loop
    that would deliver its answer is the one waiting. (Dask's own blocking
    calls, ``cancel`` among them, refuse to run there.)
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(client.loop, "asyncio_loop", running)


class _DaskTaskFuture(_QueuedFuture):
    """The future `DaskWorkerPool.submit` returns.

    While the task waits in the pool's local queue it can be cancelled; once
    sent to the cluster (``_sent``) it is *running* (as a
    ``ProcessPoolExecutor`` task in its call queue), whether or not a Dask
    worker has started it yet. Its done-callbacks run on the Client's
    event-loop thread, which they cannot end
    (`_threads.GuardedCallbacksFuture`).
    """

    def __init__(
        self, pool: DaskWorkerPool, call: tuple[Callable[..., Any], tuple[Any, ...]]
    ) -> None:
        super().__init__(pool)
        self._call: tuple[Callable[..., Any], tuple[Any, ...]] | None = call  # until sent
        self._inner: Future[Any] | None = None  # the ClientExecutor's future, until answered
        self._sent_at = 0.0
        #: Seconds from sending the task to the cluster to its answer, once answered.
        self.run_time: float | None = None

    def _let_go(self) -> None:
        self._call = None


def _not_sent(client: Client) -> CancelledError:
    return CancelledError(
        f"the pool's Dask client is {client.status}: the task was not sent to the cluster "
        "(close the client only after the manager has shut down)"
    )


def _not_answered(client: Client) -> CancelledError:
    return CancelledError(
        f"the pool's Dask client is {client.status} and never answered for this task"
    )


def _describe_lost(error: BaseException) -> WorkerLostError:
    """Dask's ``KilledWorker`` as this package's `WorkerLostError` (with it as the cause)."""
    failures = getattr(error, "allowed_failures", None)
    worker = getattr(getattr(error, "last_worker", None), "address", None)
    tries = f"{failures + 1} Dask workers" if isinstance(failures, int) else "Dask workers"
    lost = WorkerLostError(
        f"{tries} died while running this task (the last: {worker or 'unknown'}); Dask "
        "reran it after each loss, up to distributed.scheduler.allowed-failures times. "
        "The pool's other tasks are unaffected; the workers' logs say why they died"
    )
    lost.__cause__ = error
    return lost


#: Dask pools not yet disposed, for the exit hook below.
_live_pools: weakref.WeakSet[DaskWorkerPool] = weakref.WeakSet()


@atexit.register
def _finish_accepted_work_at_exit() -> None:
    # Registered after importing distributed, so it runs before Dask's own
    # exit hook closes the default client: a program that ends with Dask
    # pools it never shut down lets their accepted work finish first, as
    # ProcessPoolExecutor (and a BaseWorkerPool) does at exit.
    for pool in list(_live_pools):
        try:
            pool.dispose(wait=True)
        except Exception:
            logger.exception("disposing a Dask pool at exit failed")


class DaskWorkerPool(ChunkedTaskPool[_DaskTaskFuture]):
    """One key's pool on a Dask cluster: an ``Executor`` whose tasks run on ``client``.

    Usually built by `DaskPoolFactory` for a `WorkerPoolManager`. At most
    `worker_count` of its tasks are on the cluster at once; the others wait
    in a local queue. Tasks travel as Dask pickles them (cloudpickle:
    lambdas and closures work); each is a separate Dask task with a fresh
    key (``pure=False``), so equal calls all run.

    The client must be a synchronous ``distributed.Client`` (the default kind)
    and stays open: the pool never closes it. Tasks queued behind the cap are
    sent from the Client's event-loop thread when a running one finishes, and
    the futures' done-callbacks (and idle callbacks) run there too: keep them
    short, and do not wait in one for another task of the cluster. A
    ``submit`` there is never held by backpressure (see `submit`).

    It has no ``native_threads`` (the other engines' limit on each worker's
    BLAS and OpenMP threads): a Dask worker's are the cluster's to set (its
    nanny sets ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
    ``OPENBLAS_NUM_THREADS`` to 1 by default: ``distributed.nanny.pre-spawn-environ``).

    Args:
        client: the ``distributed.Client`` to run tasks on.
        max_size: the most tasks of this pool on the cluster at once.
        max_pending: backpressure. ``None`` (the default) never blocks; an int
            ``n`` blocks ``submit`` while `worker_count` tasks are on the
            cluster and ``n`` more wait in the local queue.
        retries: Dask's ``retries``: a task that *raises* runs again, up to
            this many times, before its exception is reported. (A worker that
            dies is another matter: see the module docstring.)
        resources: Dask worker resources each task needs, e.g. ``{"GPU": 1}``.
        workers: worker addresses or names the tasks may run on.
        allow_other_workers: with ``workers``, let tasks run elsewhere too.
        shared_data: not supported (``TypeError``): a Dask pool has no
            worker processes of its own to give an object to once. Scatter
            it instead (``client.scatter(obj, broadcast=True)``) and pass
            the Dask future as a task's positional argument: Dask resolves
            it to the object on the worker, once per worker.

    Raises:
        TypeError, ValueError: for arguments of the wrong type or range.
    """

    _size_label = "cap"
    _idle_callback_failed = "an idle callback of a Dask pool failed"
    _target_chunk_seconds = TARGET_CHUNK_SECONDS

    def __init__(
        self,
        client: Client,
        max_size: int,
        *,
        max_pending: int | None = None,
        retries: int | None = None,
        resources: Mapping[str, float] | None = None,
        workers: str | Sequence[str] | None = None,
        allow_other_workers: bool = False,
        shared_data: object = None,
    ) -> None:
        if shared_data is not None:
            raise TypeError(
                "DaskWorkerPool does not take shared_data (pool_manager.shared_data() is for "
                "the fork-server pools): scatter it with client.scatter(obj, broadcast=True) "
                "and pass the future as a positional argument of the tasks"
            )
        options = _executor_options(
            client, max_pending, retries, resources, workers, allow_other_workers
        )
        # The local queue (_pending), its lock and conditions, the counts and
        # the grant (_drained: waiters for every future settled); _lock
        # guards them and everything below.
        super().__init__(to_count("max_size", max_size, minimum=1), max_pending)
        self._client = client
        # Client.get_executor is not annotated: its ClientExecutor is an Executor.
        self._executor: Executor = client.get_executor(**options)  # type: ignore[no-untyped-call]

        self._outstanding: set[_DaskTaskFuture] = set()  # accepted, not finished
        self._in_flight: set[_DaskTaskFuture] = set()  # sent to the cluster, not answered
        self._unsettled = 0  # accepted, future not yet settled (dispose waits for 0)
        self._stop_sending = False  # terminate, or shutdown(cancel_futures=True)
        self._executor_closed = False
        _live_pools.add(self)

    # -- WorkerPool ------------------------------------------------------

    @property
    def client(self) -> Client:
        """The ``distributed.Client`` this pool runs its tasks on (shared; never closed here)."""
        return self._client

    # (max_size, max_pending, worker_count, grant_workers, unfinished_tasks,
    # unfinished_maps, add_idle_callback, task_counts, is_shut_down and
    # shutdown: `QueuedPool`'s. worker_count is the cap of tasks on the
    # cluster; idle callbacks usually run on the Client's event-loop thread.)

    def worker_pids(self) -> list[int]:
        """Always ``[]``: the pool starts no local process (Dask's workers are the cluster's).

        So the manager's memory samples and worker limits see nothing here.
        """
        return []

    # -- Executor --------------------------------------------------------

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` on the cluster; returns a ``concurrent.futures.Future``.

        The task is sent at once if fewer than `worker_count` of the pool's
        tasks are on the cluster, else it waits in the local queue. Blocks
        while the pool is full (only when ``max_pending`` is set), but never
        on a thread running an event loop (the Client's, where done-callbacks
        run, or the application's: ``loop.run_in_executor``) nor on one of
        pool_manager's own threads: there the task is admitted at once,
        beyond ``max_pending``. Dask
        futures among the positional arguments are resolved by Dask, as with
        ``Client.submit``; keyword arguments are passed as they are (so
        names like ``key`` or ``workers`` reach ``fn``, not Dask).

        A task that Dask cannot pickle, or one sent after the client was
        closed, fails its future (as ``ProcessPoolExecutor`` fails an
        unpicklable task's).

        Raises:
            TypeError: ``fn`` is not callable.
            PoolShutDownError: (a ``RuntimeError``) the pool is shut down.
        """
        return self._submit(None, fn, args, kwargs)

    def _submit(
        self,
        deadline: float | None,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Future[T]:
        """`submit`; waits for room only until ``deadline`` (a ``time.monotonic()``
        time), then raises ``TimeoutError``."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        call: Callable[..., Any] = functools.partial(fn, **kwargs) if kwargs else fn
        with self._lock:
            self._admit(deadline)
            future = _DaskTaskFuture(self, (call, args))
            self._outstanding.add(future)
            self._unsettled += 1
            self._enqueue(future)
        self._dispatch()
        return future

    def dispose(self, wait: bool = True) -> None:
        """Stop accepting work, let accepted work finish, then shut the key's executor down.

        Never closes the client: other keys' pools share it. Queued tasks are
        still sent as the cap allows. With ``wait``, blocks until every
        accepted task's future is settled. Called on the Client's event-loop
        thread (from a done callback), it does not wait, as waiting there
        would never end. Idempotent; blocked ``submit`` calls raise
        `PoolShutDownError`.
        """
        if wait and _on_loop_of(self._client):
            wait = False
        with self._lock:
            self._close_admission()
            if not wait:
                return
        while True:
            with self._lock:
                if self._unsettled:
                    self._drained.wait(_CLIENT_CHECK)
                if not self._unsettled:
                    break
                # A closed client may never answer for the tasks it had (its
                # loop stops): they fail rather than hold this wait forever.
                gone = self._client.status in _CLIENT_GONE
                abandoned = list(self._in_flight) if gone else []
            for future in abandoned:
                self._finish(future, False, _not_answered(self._client))
        with self._dispose_lock:
            if self._executor_closed:
                return
            self._executor_closed = True
            _live_pools.discard(self)
            # Every task of this executor is answered, so this returns after
            # one trip through the client's loop. A closed client has nothing
            # left to release (and a loop that may never answer).
            if self._client.status in _CLIENT_GONE:
                return
            try:
                self._executor.shutdown(wait=True)
            except Exception:  # the client closing under us: nothing is left to release
                logger.debug("shutting a Dask executor down failed", exc_info=True)

    def terminate(self) -> None:
        """Stop now: cancel queued tasks, drop the running ones, return when settled.

        Tasks on the cluster fail with `PoolTerminatedError` at once, and are
        cancelled there; a Dask worker cannot interrupt a task that already
        started, so it runs to its end and its result is dropped. The client
        stays open. Idempotent; `submit` afterwards raises.
        """
        self._cancel_queued(terminate=True)  # (and no more sending: _stop_dispatch)
        with self._lock:
            in_flight = list(self._in_flight)
        cancel_on_cluster = not _on_loop_of(self._client)  # Dask's cancel needs that loop
        for future in in_flight:
            inner = future._inner
            error = PoolTerminatedError(
                "the pool was terminated while this task ran on the Dask cluster; "
                "its result is dropped"
            )
            self._finish(future, False, error)
            if inner is not None and cancel_on_cluster:
                inner.cancel()
        self.dispose(wait=True)

    # -- QueuedPool's hooks ------------------------------------------------

    def _running(self) -> int:
        return len(self._in_flight)

    def _after_grant(self) -> None:
        self._dispatch()  # (queued tasks that now fit are sent)

    def _stop_dispatch(self, terminate: bool) -> None:
        self._stop_sending = True

    def _finish_cancelled(self, future: _DaskTaskFuture) -> None:
        self._finish(future, None, None)

    # -- dispatch ------------------------------------------------------------

    def _next_to_send(self) -> _DaskTaskFuture | None:
        """Take the next queued task if the cap allows; it is then running (holds _lock)."""
        if self._stop_sending:
            return None
        queue = self._pending
        while queue and len(self._in_flight) < max(1, self.worker_count):
            future = queue.popleft()
            if future._dropped:
                continue
            future._sent = True
            future.set_running_or_notify_cancel()
            self._in_flight.add(future)
            return future
        return None

    def _dispatch(self) -> None:
        """Send queued tasks while the cap allows.

        Called by ``submit``, ``grant_workers`` and each answer. Dask pickles
        a task in ``Client.submit``, so sending happens outside the lock;
        the cap is counted under it, before sending.
        """
        while True:
            with self._lock:
                future = self._next_to_send()
            if future is None:
                return
            self._send(future)

    def _send(self, future: _DaskTaskFuture) -> None:
        call, future._call = future._call, None
        assert call is not None
        fn, args = call
        future._sent_at = time.monotonic()
        if self._client.status in _CLIENT_GONE:
            self._finish(future, False, _not_sent(self._client), send_next=False)
            return  # (_dispatch goes on, failing the rest of the queue)
        try:
            inner = self._executor.submit(fn, *args)
        except BaseException as error:  # unpicklable, or the client is closed
            self._finish(future, False, error, send_next=False)
            if not isinstance(error, Exception):
                raise
            return
        if self._client.status in _CLIENT_GONE:
            # Closed while we sent it: its answer may never come (a closed
            # client's loop stops), so the task fails now.
            self._finish(future, False, _not_sent(self._client), send_next=False)
            return
        future._inner = inner
        # Runs at once if already answered; else on the Client's event-loop thread.
        inner.add_done_callback(functools.partial(self._answered, future))

    def _answered(self, future: _DaskTaskFuture, inner: Future[Any]) -> None:
        """The cluster answered (or Dask cancelled the task): settle ``future``."""
        future._inner = None  # the Dask future (and its result on the cluster) can go
        future.run_time = time.monotonic() - future._sent_at
        ok: bool
        value: Any
        if inner.cancelled():
            ok = False
            value = CancelledError(
                "the task was cancelled on the Dask cluster (the client was closed or "
                "restarted, or the task was cancelled there)"
            )
        else:
            error = inner.exception()
            if error is None:
                ok, value = True, inner.result()
            elif isinstance(error, KilledWorker):
                ok, value = False, _describe_lost(error)
            else:
                ok, value = False, error
        self._finish(future, ok, value)

    def _finish(
        self, future: _DaskTaskFuture, ok: bool | None, value: Any, *, send_next: bool = True
    ) -> None:
        """Count a finished task, send the next, then settle its future (``ok`` None: cancelled).

        The task leaves `unfinished_tasks` before its future settles: a waiter
        woken by the future sees the pool without it. A task settled already
        (by `terminate`) is left alone.
        """
        with self._lock:
            if future not in self._outstanding:
                return
            self._outstanding.discard(future)
            self._in_flight.discard(future)
            callbacks = self._count_finished((ok,))
        try:
            try:
                if send_next:
                    self._dispatch()
                self._run_idle_callbacks(callbacks)
            finally:
                self._settle(future, ok, value)
        finally:
            with self._lock:
                self._unsettled -= 1
                if not self._unsettled:
                    self._drained.notify_all()


class DaskPoolFactory:
    """A `WorkerPoolManager` factory: ``factory(max_size)`` builds a `DaskWorkerPool` on ``client``.

    Pass it where the manager takes a factory::

        factory = DaskPoolFactory(client)
        with manager.lease("tenant-a", factory=factory) as pool: ...
        pool, done = manager.get_pool_with_factory("tenant-a", 1, factory)

    (``get_pool`` itself uses the manager's `default_factory` method; a
    subclass of `WorkerPoolManager` that overrides it with this factory makes
    every key's pool a Dask pool.) Every pool shares ``client``; disposing
    one shuts its own executor down and leaves the client open. Close the
    client after the manager has shut down.

    Args:
        client: a synchronous ``distributed.Client``.
        max_pending: backpressure of each pool (see `DaskWorkerPool`).
            Default: the pool's size, as the manager's default factory
            (its ``max_pending`` default is ``pool_size``). ``None`` never
            blocks.
        retries, resources, workers, allow_other_workers: passed to every
            task (see `DaskWorkerPool`).

    Raises:
        TypeError, ValueError: for arguments of the wrong type or range.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_pending: int | None = _UNSET,
        retries: int | None = None,
        resources: Mapping[str, float] | None = None,
        workers: str | Sequence[str] | None = None,
        allow_other_workers: bool = False,
    ) -> None:
        checked = None if max_pending is _UNSET else max_pending
        _executor_options(client, checked, retries, resources, workers, allow_other_workers)
        self._client = client
        self._max_pending = max_pending
        self._retries = retries
        self._resources = dict(resources) if resources is not None else None
        self._workers = workers if isinstance(workers, str) or workers is None else list(workers)
        self._allow_other_workers = allow_other_workers

    @property
    def client(self) -> Client:
        """The shared ``distributed.Client``."""
        return self._client

    def __call__(self, max_size: int) -> DaskWorkerPool:
        """A new `DaskWorkerPool` of ``max_size`` (the manager passes its ``pool_size``)."""
        max_pending = max_size if self._max_pending is _UNSET else self._max_pending
        return DaskWorkerPool(
            self._client,
            max_size,
            max_pending=max_pending,
            retries=self._retries,
            resources=self._resources,
            workers=self._workers,
            allow_other_workers=self._allow_other_workers,
        )

    def __repr__(self) -> str:
        return f"<DaskPoolFactory client={self._client!r}>"


def _executor_options(
    client: object,
    max_pending: int | None,
    retries: int | None,
    resources: Mapping[str, float] | None,
    workers: str | Sequence[str] | None,
    allow_other_workers: bool,
) -> dict[str, Any]:
    """Check a pool's arguments; returns the options for ``Client.get_executor``."""
    if not isinstance(client, Client):
        raise TypeError(f"client must be a distributed.Client, not {type(client).__name__}")
    if max_pending is not None:
        to_count("max_pending", max_pending, minimum=0)
    options: dict[str, Any] = {"pure": False}  # each call is a task of its own
    if retries is not None:
        options["retries"] = to_count("retries", retries, minimum=0)
    if resources is not None:
        if not isinstance(resources, Mapping):
            raise TypeError(f"resources must be a mapping, not {type(resources).__name__}")
        options["resources"] = dict(resources)
    if workers is not None:
        if isinstance(workers, str):
            options["workers"] = [workers]
        elif isinstance(workers, Sequence):
            options["workers"] = list(workers)
        else:
            raise TypeError(
                f"workers must be an address or a sequence of them, not {type(workers).__name__}"
            )
    if allow_other_workers:
        if workers is None:
            raise ValueError("allow_other_workers needs workers")
        options["allow_other_workers"] = True
    return options
