"""joblib and scikit-learn on a key's pool (optional: ``pip install 'pool-manager[joblib]'``).

Importing this module registers a joblib parallel backend named
``"pool_manager"`` (`register` does it again, under another name if asked).
Inside ``joblib.parallel_config(backend="pool_manager", ...)``, every
``joblib.Parallel`` call, and so every scikit-learn ``n_jobs=``, runs its
tasks on one key's pool of a `WorkerPoolManager`::

    import joblib
    import pool_manager.joblib  # registers the backend
    from pool_manager import WorkerPoolManager

    with WorkerPoolManager(4, 600, 4 * 3600) as manager:
        with joblib.parallel_config(
            backend="pool_manager", n_jobs=4, manager=manager, key="tenant-a"
        ):
            squares = joblib.Parallel()(joblib.delayed(pow)(i, 2) for i in range(100))
            scores = cross_val_score(model, X, y, cv=5)  # (scikit-learn's n_jobs too)

The backend's parameters, given to ``parallel_config`` (or to
`PoolManagerBackend` itself, passed as ``Parallel(backend=...)``):

- ``manager``: the `WorkerPoolManager` whose pools run the tasks. Default:
  `default_manager`, one per process, built on first use (see below).
- ``key``: the key whose pool runs them. Default: ``"joblib"``.

What the manager gives a ``Parallel`` call:

- its caps: at most ``pool_size`` of the key's tasks run at once (a batch of
  tasks is one of the pool's tasks), and across keys at most
  ``max_total_workers`` processes and ``max_busy_workers`` busy ones;
- its pool's life: the call holds a lease on the key's pool from start to
  end (taken as joblib configures the backend, released when the call ends,
  whether it returns, raises, or its generator is closed), so the pool never
  expires under a call; once released, the pool ages and expires as any
  other (``stale_pool_expiration``), and its warm workers serve the next
  call meanwhile;
- crash isolation: a worker that dies (``os._exit``, a segfault, the
  manager's ``kill_worker_memory`` or ``task_timeout``) fails only its batch,
  and the call raises `WorkerLostError` as joblib raises any task's
  exception (`WorkerMemoryError`, a subclass, past ``kill_worker_memory``;
  `TaskTimeoutError` past ``task_timeout``); the pool replaces the worker
  and serves the next call.

``n_jobs`` follows joblib's conventions, with the pool as "all":
``None`` is 1, ``-1`` is the manager's ``pool_size``, ``-2`` one less, and
so on (at least 1); any count is capped at ``pool_size``. ``0`` raises
``ValueError``. Where it comes to 1 (``n_jobs=1``, or a manager whose
``pool_size`` is 1), joblib runs the calls one after the other in the
calling process, as it does with every backend: no pool is leased and no
worker runs them. Like joblib's own process backends, the backend runs a
call sequentially when ``n_jobs`` is not given at all (joblib's default is
1): give ``n_jobs`` to ``parallel_config`` or to ``Parallel``.

Nested calls: a ``Parallel`` call inside a task (scikit-learn nests them,
in ``GridSearchCV`` over a forest, say) runs sequentially in the worker.
The manager's ``max_busy_workers`` counts each worker as one CPU, and a
worker never builds pools of its own.

When a task raises, joblib cancels the call's tasks that have not started
(`PoolManagerBackend.abort_everything`); the ones already running finish in
their workers and their results are dropped (use the manager's
``task_timeout`` to bound a task; joblib's ``Parallel(timeout=...)``
stops waiting, it does not stop the task).

The default manager (`default_manager`): ``pool_size`` is the number of
CPUs this process may use (affinity and cgroup quota), an idle pool expires
after `DEFAULT_STALE_POOL_EXPIRATION` seconds (5 minutes, as joblib's loky
workers), pools are retired after `DEFAULT_MAX_POOL_LIFETIME` (an hour), and
it leaves signal handling to the application (``handle_signals=False``). It
is shut down at interpreter exit, or by `shutdown_default_manager` (the
next use builds a fresh one).

joblib 1.3 or later (its ``parallel_config``). Data is pickled to the
workers as for any other task (cloudpickle; large buffers travel through
shared memory): joblib's memory mapping of large arrays (``max_nbytes``,
``mmap_mode``, ``temp_folder``) is loky's and does not apply here, nor
does ``inner_max_num_threads``.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, NamedTuple

try:
    from joblib import register_parallel_backend
    from joblib.parallel import (
        AutoBatchingMixin,
        FallbackToBackend,
        ParallelBackendBase,
        SequentialBackend,
    )
except ImportError as error:
    raise ImportError(
        "pool_manager.joblib needs joblib, which is not installed: "
        "pip install 'pool-manager[joblib]'"
    ) from error

from . import _process, _shared, _threads
from .manager import WorkerPoolManager
from .pool import WorkerPool

__all__ = [
    "BACKEND_NAME",
    "DEFAULT_KEY",
    "DEFAULT_MAX_POOL_LIFETIME",
    "DEFAULT_STALE_POOL_EXPIRATION",
    "PoolManagerBackend",
    "default_manager",
    "register",
    "shutdown_default_manager",
]

#: The name `register` gives the backend by default (and importing this module does).
BACKEND_NAME = "pool_manager"
#: The key whose pool runs a ``Parallel`` call when the backend is given none.
DEFAULT_KEY = "joblib"
#: `default_manager`'s ``stale_pool_expiration``: seconds an unused pool is kept.
DEFAULT_STALE_POOL_EXPIRATION = 300.0
#: `default_manager`'s ``max_pool_lifetime``: seconds after which a pool is retired.
DEFAULT_MAX_POOL_LIFETIME = 3600.0


# -- the default manager ------------------------------------------------------

_default_lock = threading.Lock()
_default: WorkerPoolManager | None = None


def default_manager() -> WorkerPoolManager:
    """The manager of a backend given none: one per process, built on first use.

    ``WorkerPoolManager(pool_size=<the CPUs this process may use>,
    stale_pool_expiration=DEFAULT_STALE_POOL_EXPIRATION,
    max_pool_lifetime=DEFAULT_MAX_POOL_LIFETIME, handle_signals=False)``, and
    the manager's defaults otherwise. Shut down at interpreter exit; after
    `shutdown_default_manager` (or its own ``shutdown``) the next call builds
    a fresh one, and so does the first call in a process forked from this one.
    """
    global _default
    with _default_lock:
        if _default is None or _default._shut_down:
            _default = WorkerPoolManager(
                _process.cpu_count(),
                DEFAULT_STALE_POOL_EXPIRATION,
                DEFAULT_MAX_POOL_LIFETIME,
                handle_signals=False,
            )
        return _default


def shutdown_default_manager(wait: bool = True) -> None:
    """Shut the default manager down, if one was built (see `WorkerPoolManager.shutdown`).

    Its pools are disposed once their work is done; a later use builds a new one.
    """
    global _default
    with _default_lock:
        manager, _default = _default, None
    if manager is not None:
        manager.shutdown(wait=wait)


atexit.register(shutdown_default_manager)


def _forget_default_after_fork() -> None:
    # The parent's manager is inert here (it raises UsedAfterForkError): the
    # child builds its own on first use. The lock may have been held by a
    # thread that did not come along.
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_default_after_fork)


# -- the backend ----------------------------------------------------------------


class _Lease(NamedTuple):
    pool: WorkerPool
    done: Callable[[], None]


class PoolManagerBackend(AutoBatchingMixin, ParallelBackendBase):  # type: ignore[misc]
    """A joblib parallel backend that runs each ``Parallel`` call on one key's pool.

    Args:
        manager: the manager whose pool runs the tasks; default: `default_manager`
            (built when a call first needs it).
        key: the key of that pool (any hashable); default: ``"joblib"``.
        nesting_level: joblib's (it sets it; leave it out).

    Registered by importing this module, as ``"pool_manager"``, so that
    ``parallel_config(backend="pool_manager", manager=..., key=...)`` builds
    one. An instance serves one ``Parallel`` call at a time (as joblib's own
    backends do), and any number of calls one after the other.

    ``effective_n_jobs`` caps ``n_jobs`` at the manager's ``pool_size``:
    ``-1`` is ``pool_size``, ``-2`` one less, ``None`` is 1 (see the module's
    docstring). A call holds a lease on the key's pool from `configure` to
    `terminate`, with ``send_size`` its ``n_jobs``: the pool is granted that
    many workers (up to ``pool_size``).

    Raises:
        TypeError: ``manager`` is not a `WorkerPoolManager`, or ``key`` is
            not hashable.
    """

    supports_retrieve_callback = True
    supports_return_generator = True
    #: joblib's ``Parallel(timeout=...)``: joblib stops waiting and raises
    #: ``TimeoutError``; the tasks not started are cancelled (a running one
    #: runs to its end: the manager's ``task_timeout`` ends it).
    supports_timeout = True
    supports_inner_max_num_threads = False
    #: Worker processes: no memory shared with the caller (``require="sharedmem"``
    #: makes joblib use threads instead, as for its process backends).
    supports_sharedmem = False
    uses_threads = False

    def __init__(
        self,
        manager: WorkerPoolManager | None = None,
        key: Hashable = DEFAULT_KEY,
        *,
        nesting_level: int | None = None,
    ) -> None:
        if manager is not None and not isinstance(manager, WorkerPoolManager):
            raise TypeError(f"manager must be a WorkerPoolManager, not {type(manager).__name__}")
        try:
            hash(key)
        except TypeError:
            raise TypeError(f"key must be hashable, not {type(key).__name__}") from None
        super().__init__(nesting_level=nesting_level)
        self._manager = manager
        self.key = key
        # _lock guards _leases and _futures (joblib's callbacks run on the
        # pools' callback threads while the caller's thread aborts).
        self._lock = threading.Lock()
        #: The leases of the calls under way, the last one's pool in use (one
        #: per call: joblib configures once and terminates once per call).
        self._leases: list[_Lease] = []
        #: The tasks submitted and not done: what `abort_everything` cancels.
        self._futures: set[Future[Any]] = set()
        self._n_jobs = 1

    @property
    def manager(self) -> WorkerPoolManager:
        """The manager that runs the tasks (`default_manager` if none was given)."""
        return self._manager if self._manager is not None else default_manager()

    def __repr__(self) -> str:
        manager = "the default manager" if self._manager is None else repr(self._manager)
        return f"<PoolManagerBackend key={self.key!r} of {manager}>"

    # -- joblib's calls -----------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """How many tasks at once: ``n_jobs`` by joblib's conventions, capped at ``pool_size``.

        ``None`` is 1; ``-1`` is the manager's ``pool_size`` and ``-k`` is
        ``pool_size + 1 - k`` (at least 1). In a worker process of this
        library (a nested call), 1: the call runs there, sequentially.

        Raises:
            ValueError: ``n_jobs`` is 0.
        """
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None or _shared.is_worker():
            return 1
        size = self.manager.pool_size
        count = int(n_jobs)
        if count < 0:
            count = max(size + 1 + count, 1)
        return min(count, size)

    def configure(
        self,
        n_jobs: int | None = 1,
        parallel: Any = None,
        prefer: str | None = None,
        require: str | None = None,
        **backend_kwargs: Any,
    ) -> int:
        """(joblib, as a call starts) Lease the key's pool; returns the call's ``n_jobs``.

        An ``n_jobs`` that comes to 1 leases nothing: joblib runs the call in
        this process (``FallbackToBackend``, as joblib's own backends do).
        joblib's memory-mapping options (``max_nbytes``, ``mmap_mode``,
        ``temp_folder``) are ignored.
        """
        count = self.effective_n_jobs(n_jobs)
        if count == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._n_jobs = count
        self._take_lease()
        return count

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Future[Any]], object] | None = None
    ) -> Future[Any]:
        """(joblib) Run a batch of tasks on the key's pool; ``callback(future)`` when done.

        Never waits for room (the pool's ``max_pending``): joblib bounds what
        it sends ahead itself (``pre_dispatch``, ``2 * n_jobs`` batches by
        default), and it sends while holding the lock that its handling of
        finished tasks needs, so a wait here would hold up the whole call
        (a task's exception, ``timeout``, the results of a generator).
        """
        with self._lock:
            if not self._leases:
                raise RuntimeError("the pool_manager backend is not configured for a call")
            pool = self._leases[-1].pool
        with _threads.as_library_thread():  # (admitted beyond max_pending)
            future = pool.submit(func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    #: joblib before 1.5 calls ``apply_async`` (the same thing).
    apply_async = submit

    def retrieve_result_callback(self, out: Future[Any]) -> Any:
        """(joblib, in ``submit``'s callback) The batch's results, or raise its exception."""
        return out.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """(joblib, when a task failed or the call was interrupted) Cancel what is queued.

        The call's tasks that have not started are cancelled; running ones
        finish in their workers (results dropped). With ``ensure_ready``
        (a ``with Parallel(...)`` block goes on), the lease is renewed: a
        fresh pool if the key's was retired or shut down meanwhile, else the
        same one. Without it, the lease goes at `terminate`, which follows.
        """
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.cancel()
        if not ensure_ready:
            return
        with self._lock:
            old = self._leases.pop() if self._leases else None
        if old is None:
            return  # (no call under way: nothing to renew)
        try:
            self._take_lease()
        finally:
            old.done()

    def terminate(self) -> None:
        """(joblib, as a call ends, however it ends) Release the call's lease."""
        with self._lock:
            lease = self._leases.pop() if self._leases else None
        if lease is not None:
            lease.done()
        self.reset_batch_stats()

    def get_nested_backend(self) -> tuple[ParallelBackendBase, int | None]:
        """(joblib) What a ``Parallel`` call inside a task uses: the sequential backend.

        A worker counts as one CPU under the manager's ``max_busy_workers``;
        threads or pools of its own would go past it.
        """
        level = (self.nesting_level or 0) + 1
        return SequentialBackend(nesting_level=level), None

    # -- internals ----------------------------------------------------------------

    def _take_lease(self) -> None:
        pool, done = self.manager.get_pool(self.key, self._n_jobs)
        with self._lock:
            self._leases.append(_Lease(pool, done))

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)


def register(name: str = BACKEND_NAME) -> None:
    """Register `PoolManagerBackend` with joblib as ``name`` (again: nothing changes).

    Importing this module calls ``register()``; call it with another name
    to select the backend under that name too.
    """
    register_parallel_backend(name, PoolManagerBackend)


register()
