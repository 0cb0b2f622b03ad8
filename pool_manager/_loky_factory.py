"""`LokyPoolFactory`: a manager factory for loky pools (re-exported by
`pool_manager.loky`, where it is documented and used)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._durations import Duration, memory_limits, to_count, to_seconds
from ._loky_shared import LokySharedData
from ._loky_slots import _check_options
from ._native_threads import NativeThreads, ThreadLimit

if TYPE_CHECKING:
    from .loky import LokyWorkerPool

_built: list[Callable[..., LokyWorkerPool]] = []  # the pool class (`builds`)


def builds(pool_class: Callable[..., LokyWorkerPool]) -> None:
    """(``loky.py``, as `LokyWorkerPool` is defined) the class the factory builds
    (this module is imported by ``loky.py``, never the other way)."""
    _built[:] = [pool_class]


__all__ = ["LokyPoolFactory"]

_UNSET: Any = object()


class LokyPoolFactory:
    """A `WorkerPoolManager` factory: ``factory(max_size)`` builds a `LokyWorkerPool`.

    Pass it where the manager takes a factory::

        factory = LokyPoolFactory()
        with manager.lease("tenant-a", factory=factory) as pool: ...
        pool, done = manager.get_pool_with_factory("tenant-a", 1, factory)

    (A subclass of `WorkerPoolManager` whose `default_factory` returns
    ``factory(max_size)`` makes every key's pool a loky pool; so does
    ``WorkerPoolManager(..., engine="loky")``.) The manager's caps across
    keys (``max_total_workers``, ``max_busy_workers``) apply to these pools.

    Args:
        max_pending: backpressure of each pool (see `LokyWorkerPool`).
            Default: the pool's size, as the manager's default factory.
            ``None`` never blocks.
        context, initializer, initargs, finalizer, finalargs, env, task_timeout,
        max_tasks_per_worker, max_worker_memory, kill_worker_memory,
        idle_timeout, native_threads: passed to every pool (see
            `LokyWorkerPool`; ``native_threads="auto"`` is worked out for
            each pool's size).
        shared_data: one large read-only object for every worker of every
            pool it builds (see `LokyWorkerPool`), pickled once, here: its
            pools share one shared-memory segment, unlinked once the factory
            and every pool it built are gone (collected, or disposed).

    Raises:
        TypeError, ValueError: for arguments of the wrong type or range, or
            that cannot be pickled (``initializer``, ``initargs``,
            ``shared_data``).
        OSError: ``shared_data``'s buffers could not be put in shared memory.
    """

    def __init__(
        self,
        *,
        max_pending: int | None = _UNSET,
        context: str = "loky",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        finalizer: Callable[..., object] | None = None,
        finalargs: tuple[Any, ...] = (),
        env: dict[str, str] | None = None,
        task_timeout: Duration | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_memory: int | str | None = None,
        kill_worker_memory: int | str | None = None,
        idle_timeout: Duration | None = None,
        shared_data: object = None,
        native_threads: NativeThreads = "auto",
    ) -> None:
        checked = None if max_pending is _UNSET else max_pending
        _check_options(checked, initializer, initargs, context, env, finalizer, finalargs)
        ThreadLimit.of(native_threads, 1, 1)  # (checked now; each pool works out "auto")
        to_seconds("task_timeout", task_timeout, allow_none=True)
        to_seconds("idle_timeout", idle_timeout, allow_none=True)
        if max_tasks_per_worker is not None:
            to_count("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        memory_limits(max_worker_memory, kill_worker_memory)
        self._limits: dict[str, Any] = {
            "task_timeout": task_timeout,
            "max_tasks_per_worker": max_tasks_per_worker,
            "max_worker_memory": max_worker_memory,
            "kill_worker_memory": kill_worker_memory,
            "idle_timeout": idle_timeout,
            "native_threads": native_threads,
        }
        self._max_pending = max_pending
        self._context = context
        self._initializer = initializer
        self._initargs = initargs
        self._finalizer = finalizer
        self._finalargs = finalargs
        self._env = None if env is None else dict(env)
        self._shared = LokySharedData.of(shared_data)  # (last: every argument is checked)

    def __call__(self, max_size: int) -> LokyWorkerPool:
        """A new `LokyWorkerPool` of ``max_size`` (the manager passes its ``pool_size``)."""

        max_pending = max_size if self._max_pending is _UNSET else self._max_pending
        return _built[0](
            max_size,
            max_pending=max_pending,
            initializer=self._initializer,
            initargs=self._initargs,
            finalizer=self._finalizer,
            finalargs=self._finalargs,
            context=self._context,
            env=self._env,
            shared_data=self._shared,
            **self._limits,
        )

    def __repr__(self) -> str:
        return f"<LokyPoolFactory context={self._context!r}>"
