"""The manager: keys, leases, factories, expiry, retirement, shutdown.

Expiry is driven by a fake clock and ``manager.sweep()``; only tests that
need real workers start processes.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor
from datetime import timedelta
from pathlib import Path

import pytest

from pool_manager import (
    BaseWorkerPool,
    FactoryError,
    ManagerShutDownError,
    PoolState,
    WorkerPool,
    WorkerPoolManager,
)
from pool_manager.supervisor import Supervisor

from .helpers import (
    FakeClock,
    exit_process,
    getpid,
    poll,
    raise_value_error,
    square,
    wait_for_path,
)

STALE = 60.0
LIFETIME = 600.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["fork_server", "loky"])
def manager(clock: FakeClock, request: pytest.FixtureRequest) -> Iterator[WorkerPoolManager]:
    """A manager on each engine: the Go package's semantics hold on both."""
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    # Memory sampling has its own tests; here it would add a deadline.
    with WorkerPoolManager(
        4, STALE, LIFETIME, clock=clock, memory_sample_interval=None, engine=request.param
    ) as manager:
        yield manager


def engine_pool(manager: WorkerPoolManager) -> type[WorkerPool]:
    """The class of the pools ``manager``'s default factory builds."""
    if manager.engine == "loky":
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool
    return BaseWorkerPool


# -- keyed, lazy, cached -------------------------------------------------------


def test_first_get_pool_builds_and_later_calls_return_the_same_pool(
    manager: WorkerPoolManager,
) -> None:
    assert len(manager) == 0 and "a" not in manager
    pool, done = manager.get_pool("a", 1)
    done()
    again, done_again = manager.get_pool("a", 1)
    done_again()
    other, done_other = manager.get_pool("b", 1)
    done_other()
    assert again is pool
    assert other is not pool
    assert len(manager) == 2 and "a" in manager and "b" in manager
    assert isinstance(pool, WorkerPool)


def test_pool_starts_no_process_until_work_is_submitted(manager: WorkerPoolManager) -> None:
    with manager.lease("a", 4) as pool:
        assert pool.worker_pids() == []
        assert manager.stats()["pools"]["a"]["workers"] == 0
        assert pool.submit(square, 3).result() == 9
        # As ProcessPoolExecutor: a worker starts when a task finds none idle.
        assert manager.stats()["pools"]["a"]["workers"] == 1


@pytest.mark.parametrize("key", [("tenant", 7), 42, frozenset({"x"}), None, 3.5])
def test_any_hashable_is_a_key(manager: WorkerPoolManager, key: object) -> None:
    with manager.lease(key) as pool:  # type: ignore[arg-type]
        assert key in manager
        assert manager.get_pool(key)[0] is pool  # type: ignore[arg-type]


def test_unhashable_key_is_a_type_error(manager: WorkerPoolManager) -> None:
    with pytest.raises(TypeError, match="hashable"):
        manager.get_pool(["not", "hashable"])  # type: ignore[arg-type]
    assert len(manager) == 0


# -- workers granted -----------------------------------------------------------


def test_send_size_grants_workers_up_to_pool_size(manager: WorkerPoolManager) -> None:
    pool, done = manager.get_pool("a", 0)
    assert pool.worker_count == 0
    done()
    pool, done = manager.get_pool("a", 2)
    assert pool.worker_count == 2
    done()
    pool, done = manager.get_pool("a", 1)
    assert pool.worker_count == 3
    done()
    pool, done = manager.get_pool("a", 50)
    assert pool.worker_count == 4
    done()


def test_pool_cannot_grow_past_pool_size_under_23_concurrent_callers(
    clock: FakeClock,
) -> None:
    # The Go package's TestGetPoolCannotCreateLargerPoolsThanExpected.
    pool_size = 1050
    with WorkerPoolManager(pool_size, 1, 5, clock=clock) as manager:
        _, done = manager.get_pool("key", 0)
        done()
        start = threading.Barrier(23)

        def take() -> None:
            start.wait()
            _, done = manager.get_pool("key", 500)
            done()

        threads = [threading.Thread(target=take) for _ in range(23)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        pool, done = manager.get_pool("key", 0)
        done()
        assert pool.worker_count == pool_size
        assert manager.stats()["pools"]["key"]["leases"] == 0


def test_a_pool_granted_no_worker_still_runs_its_work(manager: WorkerPoolManager) -> None:
    with manager.lease("a", 0) as pool:
        assert pool.submit(square, 5).result() == 25
        assert pool.worker_count == 1
        assert len(pool.worker_pids()) == 1


def test_granted_workers_grow_in_place_without_disturbing_running_ones(
    clock: FakeClock, tmp_path: Path
) -> None:
    from .helpers import wait_for_count

    manager = WorkerPoolManager(
        4, STALE, LIFETIME, clock=clock, memory_sample_interval=None, max_busy_workers=None
    )
    with manager, manager.lease("a", 1) as pool:
        first = pool.submit(getpid).result()
        assert pool.worker_pids() == [first]
        manager.get_pool("a", 2)[1]()
        assert pool.worker_count == 3
        # Three tasks that return only when all three run at once: the pool
        # must grow to three workers, keeping the first.
        futures = [pool.submit(wait_for_count, str(tmp_path), "t", 3, 60) for _ in range(3)]
        pids = {f.result(timeout=90) for f in futures}
        assert len(pids) == 3 and first in pids


# -- leases --------------------------------------------------------------------


def test_done_is_idempotent(manager: WorkerPoolManager) -> None:
    _, done = manager.get_pool("a")
    _, other = manager.get_pool("a")
    done()
    done()
    done()
    assert manager.stats()["pools"]["a"]["leases"] == 1
    other()
    assert manager.stats()["pools"]["a"]["leases"] == 0


def test_lease_context_manager_releases_on_error(manager: WorkerPoolManager) -> None:
    with pytest.raises(KeyError), manager.lease("a"):
        assert manager.stats()["pools"]["a"]["leases"] == 1
        raise KeyError("boom")
    assert manager.stats()["pools"]["a"]["leases"] == 0


def test_pool_under_lease_is_never_disposed(manager: WorkerPoolManager, clock: FakeClock) -> None:
    pool, done = manager.get_pool("a")
    for _ in range(4):  # 8 stale periods, still short of LIFETIME
        clock.advance(STALE * 2)
        manager.sweep()
    assert "a" in manager
    assert not pool.is_shut_down  # type: ignore[attr-defined]
    clock.advance(LIFETIME)  # too old now: retired, but still leased
    result = manager.sweep()
    assert result.retired == ["a"] and "a" not in manager
    assert not pool.is_shut_down  # type: ignore[attr-defined]
    assert manager.stats()["retiring"][0]["state"] == PoolState.RETIRING.value
    done()
    manager.sweep()
    assert pool.is_shut_down  # type: ignore[attr-defined]
    assert manager.stats()["retiring"] == []


# -- stale expiry --------------------------------------------------------------


def test_unused_pool_expires_after_stale_pool_expiration(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    pool, done = manager.get_pool("a")
    done()
    clock.advance(STALE - 1)
    assert manager.sweep().expired == []
    assert "a" in manager
    clock.advance(1)
    result = manager.sweep()
    assert result.expired == ["a"] and result.disposed == 1
    assert "a" not in manager and len(manager) == 0
    assert pool.is_shut_down  # type: ignore[attr-defined]
    fresh, done = manager.get_pool("a")
    done()
    assert fresh is not pool


def test_every_use_restarts_the_stale_clock(manager: WorkerPoolManager, clock: FakeClock) -> None:
    pool, done = manager.get_pool("a")
    done()
    for _ in range(10):
        clock.advance(STALE * 0.75)
        manager.sweep()
        again, done = manager.get_pool("a")
        done()
        assert again is pool
    clock.advance(STALE)
    assert manager.sweep().expired == ["a"]


def test_durations_accept_timedelta(clock: FakeClock) -> None:
    with WorkerPoolManager(1, timedelta(minutes=1), timedelta(hours=1), clock=clock) as manager:
        assert manager.stale_pool_expiration == 60.0
        assert manager.max_pool_lifetime == 3600.0
        manager.get_pool("a")[1]()
        clock.advance(59)
        assert manager.sweep().expired == []
        clock.advance(1)
        assert manager.sweep().expired == ["a"]


def test_pool_with_unfinished_work_is_not_expired_until_idle_for_the_full_period(
    manager: WorkerPoolManager, clock: FakeClock, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pool, done = manager.get_pool("a")
    future = pool.submit(wait_for_path, str(gate))
    done()  # the caller walks away; the work is still accepted
    clock.advance(STALE * 3)
    assert manager.sweep().expired == []
    assert "a" in manager and not future.done()
    clock.advance(STALE * 3)
    gate.touch()
    assert future.result(timeout=60) == str(gate)
    # The idle clock started when the work finished, not when the lease went.
    assert manager.sweep().expired == []
    clock.advance(STALE - 1)
    assert manager.sweep().expired == []
    clock.advance(1)
    assert manager.sweep().expired == ["a"]


def test_pool_with_an_unfinished_map_iterator_is_not_expired(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    with manager.lease("a") as pool:
        results = pool.map(square, range(200))  # lazy: a window at a time
    assert pool.unfinished_maps == 1
    assert poll(lambda: pool.unfinished_tasks == 0, timeout=60)
    for _ in range(3):
        clock.advance(STALE * 2)
        assert manager.sweep().expired == []
    assert "a" in manager and manager.stats()["pools"]["a"]["idle_for"] == 0.0
    clock.advance(STALE - 1)
    assert list(results) == [x * x for x in range(200)]  # consumed just before a look
    assert pool.unfinished_maps == 0
    clock.advance(1)
    assert manager.sweep().expired == []  # idle for a second only, not STALE
    clock.advance(STALE)
    assert manager.sweep().expired == ["a"]


def test_a_map_consumed_just_before_a_check_keeps_its_pool_a_stale_period_more(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    with manager.lease("a") as pool:
        results = pool.map(square, range(5))  # all submitted at once
    assert poll(lambda: pool.unfinished_tasks == 0, timeout=60)
    clock.advance(STALE)
    assert manager.sweep().expired == []  # its map is open
    clock.advance(STALE - 1)
    assert list(results) == [0, 1, 4, 9, 16]  # no task ran since
    clock.advance(1)
    assert manager.sweep().expired == []  # idle since the map ended: a second at most
    clock.advance(STALE)
    assert manager.sweep().expired == ["a"]


@pytest.mark.parametrize("end", ["close", "collect"])
def test_a_map_iterator_closed_or_collected_lets_its_pool_expire(
    manager: WorkerPoolManager, clock: FakeClock, end: str
) -> None:
    with manager.lease("a") as pool:
        results = pool.map(square, range(200))
        if end == "close":
            assert next(results) == 0
            results.close()
        else:
            del results  # never started
            gc.collect()
    assert pool.unfinished_maps == 0
    assert poll(lambda: pool.unfinished_tasks == 0, timeout=60)
    clock.advance(STALE)
    assert manager.sweep().expired == ["a"]


def test_a_map_that_raised_holds_its_pool_no_longer(manager: WorkerPoolManager) -> None:
    with manager.lease("a") as pool:
        with pytest.raises(ValueError) as caught:
            list(pool.map(raise_value_error, ["boom"], chunksize=1))
        assert caught.value.args == ("boom",)  # (the traceback, kept, holds the map's frame)
        assert pool.unfinished_maps == 0


def test_retired_pool_with_an_unfinished_map_waits_for_it(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    with manager.lease("a") as pool:
        results = pool.map(square, range(200))
    clock.advance(LIFETIME)
    assert manager.sweep().retired == ["a"]
    assert poll(lambda: pool.unfinished_tasks == 0, timeout=60)
    assert manager.sweep().next_deadline is not None  # it looks again
    assert not pool.is_shut_down  # type: ignore[attr-defined]
    assert sum(results) == sum(x * x for x in range(200))
    assert manager.sweep().disposed == 1
    assert pool.is_shut_down  # type: ignore[attr-defined]


def test_sweep_reports_the_earliest_deadline(manager: WorkerPoolManager, clock: FakeClock) -> None:
    start = clock.now
    assert manager.sweep().next_deadline is None
    manager.get_pool("a")[1]()
    clock.advance(10)
    manager.get_pool("b")[1]()
    _, done_c = manager.get_pool("c")  # leased: only its retirement is a deadline
    assert manager.sweep().next_deadline == start + STALE
    clock.advance(STALE - 10)
    assert manager.sweep().next_deadline == start + 10 + STALE
    done_c()


def test_expiry_happens_in_the_background_without_sweep_calls() -> None:
    # Real time: the supervisor must act on its own, soon after the deadline.
    with WorkerPoolManager(1, 0.2, 3600) as manager:
        with manager.lease("a") as pool:
            assert pool.submit(square, 4).result() == 16
        assert poll(lambda: "a" not in manager, timeout=30)
        assert poll(lambda: pool.is_shut_down and not pool.worker_pids(), timeout=30)  # type: ignore[attr-defined]


# -- max lifetime --------------------------------------------------------------


def test_pool_older_than_max_lifetime_is_retired_under_constant_use(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    first, done = manager.get_pool("a")
    done()
    step = STALE / 2
    pools = [first]
    for _ in range(int(LIFETIME / step) + 2):
        clock.advance(step)
        manager.sweep()
        pool, done = manager.get_pool("a")
        done()
        if pool is not pools[-1]:
            pools.append(pool)
    assert len(pools) == 2  # retired once, at LIFETIME; the fresh one is young
    manager.sweep()
    assert first.is_shut_down  # type: ignore[attr-defined]
    assert not pools[1].is_shut_down  # type: ignore[attr-defined]


def test_get_pool_on_a_too_old_pool_builds_a_fresh_one_at_once(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    old, done_old = manager.get_pool("a")
    clock.advance(LIFETIME)
    fresh, done_fresh = manager.get_pool("a")  # no sweep in between
    assert fresh is not old
    assert len(manager) == 1
    manager.sweep()
    assert not old.is_shut_down  # type: ignore[attr-defined]  # still leased
    done_old()
    manager.sweep()
    assert old.is_shut_down  # type: ignore[attr-defined]
    done_fresh()


def test_retired_pool_finishes_accepted_work_before_disposal(
    manager: WorkerPoolManager, clock: FakeClock, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pool, done = manager.get_pool("a")
    future = pool.submit(wait_for_path, str(gate))
    done()
    clock.advance(LIFETIME)
    assert manager.sweep().retired == ["a"]
    manager.sweep()
    assert not pool.is_shut_down  # type: ignore[attr-defined]
    gate.touch()
    assert future.result(timeout=60) == str(gate)
    manager.sweep()
    assert pool.is_shut_down  # type: ignore[attr-defined]
    # (The supervisor may be the one disposing of it, on its own thread.)
    assert poll(lambda: pool.worker_pids() == [], timeout=30)


# -- factories -----------------------------------------------------------------


class TenantPool(BaseWorkerPool):
    """A pool that carries shared data and releases it on disposal."""

    def __init__(self, max_size: int, data: dict[str, int]) -> None:
        super().__init__(max_size)
        self.data: dict[str, int] | None = data
        self.released = 0

    def dispose(self, wait: bool = True) -> None:
        super().dispose(wait)
        if self.data is not None:
            self.data = None
            self.released += 1


def test_custom_factory_pool_carries_shared_data_and_releases_it(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    sizes = []

    def factory(max_size: int) -> TenantPool:
        sizes.append(max_size)
        return TenantPool(max_size, {"value": 13})

    pool, done = manager.get_pool_with_factory("key", 1, factory)
    assert isinstance(pool, TenantPool) and pool.data == {"value": 13}
    assert sizes == [4]
    assert pool.worker_count == 1  # grows by send_size like the default pools
    done()
    clock.advance(STALE)
    manager.sweep()
    assert pool.data is None and pool.released == 1
    pool.dispose()
    assert pool.released == 1


def test_factory_error_reaches_the_caller_unchanged_and_nothing_is_cached(
    manager: WorkerPoolManager,
) -> None:
    error = RuntimeError("SOMETHING BROKE O NOEZ")

    def factory(max_size: int) -> WorkerPool:
        raise error

    with pytest.raises(RuntimeError) as caught:
        manager.get_pool_with_factory("key", 1, factory)
    assert caught.value is error
    assert "key" not in manager and len(manager) == 0
    pool, done = manager.get_pool("key")  # the key is usable afterwards
    done()
    assert isinstance(pool, engine_pool(manager))


def test_factory_returning_something_else_is_a_factory_error(manager: WorkerPoolManager) -> None:
    with pytest.raises(FactoryError, match="not a WorkerPool"):
        manager.get_pool_with_factory("key", 1, lambda size: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError):
        manager.get_pool_with_factory("key", 1, "not callable")  # type: ignore[arg-type]
    assert len(manager) == 0


def test_factory_runs_once_however_many_threads_race_for_a_key(
    manager: WorkerPoolManager,
) -> None:
    calls = []
    release = threading.Event()

    def slow_factory(max_size: int) -> WorkerPool:
        calls.append(max_size)
        release.wait(30)
        return BaseWorkerPool(max_size)

    racers = 16
    start = threading.Barrier(racers)
    got: list[WorkerPool] = []

    def take() -> None:
        start.wait()
        pool, done = manager.get_pool_with_factory("key", 1, slow_factory)
        got.append(pool)
        done()

    threads = [threading.Thread(target=take) for _ in range(racers)]
    for thread in threads:
        thread.start()
    assert poll(lambda: len(calls) == 1)
    release.set()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(got) == racers and all(pool is got[0] for pool in got)
    assert got[0].worker_count == 4  # 16 leases of 1, capped at 4


def test_threads_waiting_on_a_failing_factory_get_its_error(manager: WorkerPoolManager) -> None:
    calls = []
    release = threading.Event()

    def failing(max_size: int) -> WorkerPool:
        calls.append(1)
        release.wait(30)
        raise LookupError("no such tenant")

    errors: list[BaseException] = []

    def take() -> None:
        try:
            manager.get_pool_with_factory("key", 1, failing)
        except LookupError as error:
            errors.append(error)

    threads = [threading.Thread(target=take) for _ in range(5)]
    for thread in threads:
        thread.start()
    assert poll(lambda: len(calls) == 1)
    time.sleep(0.2)  # let the other four reach the wait (not needed for correctness)
    release.set()
    for thread in threads:
        thread.join()
    assert len(errors) == 5 and all(e.args == ("no such tenant",) for e in errors)
    # Waiters share the builder's error instead of each running the factory again.
    assert len({id(e) for e in errors}) == len(calls) < 5
    assert "key" not in manager


def test_a_slow_factory_never_blocks_another_key(manager: WorkerPoolManager) -> None:
    entered = threading.Event()
    release = threading.Event()

    def stuck(max_size: int) -> WorkerPool:
        entered.set()
        release.wait(30)
        return BaseWorkerPool(max_size)

    builder = threading.Thread(target=lambda: manager.get_pool_with_factory("slow", 1, stuck)[1]())
    builder.start()
    try:
        assert entered.wait(30)
        started = time.monotonic()
        pool, done = manager.get_pool("fast")
        done()
        assert time.monotonic() - started < 5  # it did not wait for the 30 s factory
        assert "fast" in manager and "slow" not in manager
    finally:
        release.set()
        builder.join()
    assert "slow" in manager


def test_initializer_gives_each_worker_its_own_state(manager: WorkerPoolManager) -> None:
    def factory(max_size: int) -> WorkerPool:
        return BaseWorkerPool(max_size, initializer=_set_model, initargs=("model-v2",))

    with manager.lease("a", 2, factory=factory) as pool:
        assert set(pool.map(_get_model, range(6))) == {"model-v2"}


_MODEL = None


def _set_model(name: str) -> None:
    global _MODEL
    _MODEL = name


def _get_model(_: int) -> str | None:
    return _MODEL


# -- broken pools heal -----------------------------------------------------------


def test_a_pool_never_stays_broken_in_the_map(manager: WorkerPoolManager) -> None:
    with manager.lease("a", 2) as pool:
        crashed = pool.submit(exit_process, 3)
        with pytest.raises(BrokenExecutor):
            crashed.result(timeout=60)
    with manager.lease("a") as again:
        assert again is pool
        assert again.submit(square, 7).result(timeout=60) == 49


# -- pools shut down by their user leave the map ------------------------------------


def test_pool_shut_down_by_its_user_leaves_the_map(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    pool, done = manager.get_pool("a", 2)
    with pool:  # the Executor idiom: shuts the pool down on the way out
        assert list(pool.map(square, [1, 2])) == [1, 4]
    done()
    with manager.lease("a") as fresh:
        assert fresh is not pool
        assert fresh.submit(square, 3).result(timeout=60) == 9
    assert len(manager) == 1
    manager.sweep()
    assert manager.stats()["retiring"] == []


def test_pool_shut_down_under_a_lease_is_disposed_once_released(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    pool, done = manager.get_pool("a")
    assert pool.submit(square, 2).result(timeout=60) == 4
    pool.shutdown(wait=False)
    with manager.lease("a") as fresh:
        assert fresh is not pool
        assert fresh.submit(square, 4).result(timeout=60) == 16
    manager.sweep()
    assert [s["state"] for s in manager.stats()["retiring"]] == [PoolState.RETIRING.value]
    done()
    manager.sweep()
    assert manager.stats()["retiring"] == []
    assert pool.worker_pids() == []


def test_custom_pool_without_is_shut_down_stays_in_the_map(manager: WorkerPoolManager) -> None:
    # A WorkerPool need not say whether it is shut down: the manager keeps it.
    class Silent(BaseWorkerPool):
        @property
        def is_shut_down(self) -> bool:
            raise AttributeError("is_shut_down")

    with manager.lease("a", factory=Silent) as pool:
        pass
    with manager.lease("a", factory=Silent) as again:
        assert again is pool


def _threads_start_in_exit_hooks() -> bool:
    """Whether this Python starts a thread from a ``threading`` exit hook (3.12
    refuses: "can't create new thread at interpreter shutdown")."""
    probe = textwrap.dedent(
        """
        import threading

        def start():
            try:
                threading.Thread(target=print).start()
            except RuntimeError:
                print("refused")

        threading._register_atexit(start)
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    return "refused" not in done.stdout


def test_pools_shut_down_at_exit_are_rebuilt_for_a_thread_still_serving() -> None:
    # The exit hook shuts every pool down while a non-daemon thread still
    # uses the manager: that thread's later leases get fresh pools.
    completed = subprocess.run(
        [sys.executable, "-c", _SERVING_AT_EXIT], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    if _threads_start_in_exit_hooks():
        assert completed.stdout.split() == ["old-key", "1", "new-key", "1"], completed.stderr
    else:
        # (3.12 refuses to start a thread once its exit hooks run: a fresh
        # pool's I/O thread cannot start, and its task fails, clearly, at once.)
        assert "WorkerStartError" in completed.stderr, completed.stderr
        assert "can't create new thread" in completed.stderr, completed.stderr


_SERVING_AT_EXIT = textwrap.dedent(
    """
    import threading

    # Exit hooks run last registered first: this one runs after the library's.
    hooks_ran = threading.Event()
    threading._register_atexit(hooks_ran.set)

    from pool_manager import WorkerPoolManager

    manager = WorkerPoolManager(2, 60, 3600)

    def serve():
        assert hooks_ran.wait(timeout=60)
        for key in ("old-key", "new-key"):
            with manager.lease(key) as pool:
                print(key, pool.submit(abs, -1).result(timeout=60), flush=True)
        manager.shutdown()

    with manager.lease("old-key") as pool:
        pool.submit(abs, -1).result(timeout=60)
    assert not pool.is_shut_down
    threading.Thread(target=serve).start()
    """
)


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 1, 1), ValueError),
        ((-3, 1, 1), ValueError),
        (("4", 1, 1), TypeError),
        ((2.5, 1, 1), TypeError),
        ((1, 0, 1), ValueError),
        ((1, -5, 1), ValueError),
        ((1, "600", 1), TypeError),
        ((1, None, 1), TypeError),
        ((1, 1, timedelta(0)), ValueError),
        ((1, 1, float("inf")), ValueError),
        ((1, 1, float("nan")), ValueError),
        ((1, True, 1), TypeError),
    ],
)
def test_bad_constructor_arguments_are_rejected(args: tuple, error: type) -> None:  # type: ignore[type-arg]
    with pytest.raises(error):
        WorkerPoolManager(*args)


def test_bad_send_size_is_rejected(manager: WorkerPoolManager) -> None:
    with pytest.raises(ValueError, match="send_size"):
        manager.get_pool("a", -1)
    with pytest.raises(TypeError, match="send_size"):
        manager.get_pool("a", 1.5)  # type: ignore[arg-type]
    assert len(manager) == 0


# -- stats -------------------------------------------------------------------------


def test_stats_describe_each_pool(manager: WorkerPoolManager, clock: FakeClock) -> None:
    pool, done = manager.get_pool("a", 2)
    assert pool.submit(square, 2).result() == 4
    clock.advance(5)
    stats = manager.stats()
    a = stats["pools"]["a"]
    assert a["state"] == "leased" and a["leases"] == 1
    assert a["workers"] == 1 and sorted(a["worker_pids"]) == sorted(pool.worker_pids())
    assert a["worker_count"] == 2 and a["max_size"] == 4
    assert a["unfinished_tasks"] == 0 and a["age"] == 5 and a["idle_for"] == 0
    assert stats["total_workers"] == 1 and stats["shut_down"] is False
    done()
    clock.advance(3)
    a = manager.stats()["pools"]["a"]
    assert a["state"] == "idle" and a["idle_for"] == 3


# -- shutdown ----------------------------------------------------------------------


def test_shutdown_disposes_every_pool_and_leaves_nothing(clock: FakeClock) -> None:
    manager = WorkerPoolManager(2, STALE, LIFETIME, clock=clock)
    leased, _ = manager.get_pool("leased", 2)
    futures = [leased.submit(square, i) for i in range(10)]
    with manager.lease("idle", 1) as idle:
        idle.submit(square, 1).result()
    pids = leased.worker_pids() + idle.worker_pids()
    assert pids
    manager.shutdown(wait=True)
    assert [f.result() for f in futures] == [i * i for i in range(10)]  # nothing lost
    assert leased.is_shut_down and idle.is_shut_down  # type: ignore[attr-defined]
    assert leased.worker_pids() == [] and idle.worker_pids() == []
    assert not any(t.name.startswith("pool_manager-supervisor") for t in threading.enumerate())
    with pytest.raises(ManagerShutDownError, match="shut down"):
        manager.get_pool("leased")
    with pytest.raises(RuntimeError):
        manager.get_pool("new")
    manager.shutdown()  # idempotent


def test_shutdown_with_cancel_futures_cancels_work_not_started(
    clock: FakeClock, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    manager = WorkerPoolManager(1, STALE, LIFETIME, clock=clock, max_pending=None)
    pool, _ = manager.get_pool("a", 1)
    running = pool.submit(wait_for_path, str(gate))
    queued = [pool.submit(square, i) for i in range(20)]
    poll(lambda: running.running())
    # The gate opens once the shutdown has begun, so the queue is still full then.
    opener = threading.Thread(target=lambda: poll(lambda: pool.is_shut_down) and gate.touch())
    opener.start()
    manager.shutdown(wait=True, cancel_futures=True)
    opener.join()
    assert running.result() == str(gate)
    assert all(f.done() for f in queued)
    assert all(f.cancelled() for f in queued)


@pytest.mark.timeout(60)
def test_shutdown_signals_every_pool_without_waiting_for_a_disposal_the_supervisor_began() -> None:
    # Real time: the supervisor itself expires the pool and blocks disposing it.
    disposing, gate = threading.Event(), threading.Event()
    calls: list[str] = []

    class SlowToDispose(BaseWorkerPool):
        def dispose(self, wait: bool = True) -> None:
            calls.append(threading.current_thread().name)
            if len(calls) == 1:  # the supervisor's disposal blocks; shutdown's does not
                disposing.set()
                gate.wait(30)
            super().dispose(wait)

    manager = WorkerPoolManager(1, 0.01, LIFETIME, memory_sample_interval=None)
    closing = threading.Thread(target=lambda: manager.shutdown(wait=False))
    try:
        manager.get_pool_with_factory("slow", 1, SlowToDispose)[1]()
        assert disposing.wait(30)
        assert calls[0].startswith("pool_manager-supervisor")
        closing.start()
        closing.join(10)
        # shutdown(wait=False) returned at once, and signalled the pool the
        # supervisor is still disposing, instead of joining the supervisor first.
        assert not closing.is_alive()
        assert len(calls) == 2
    finally:
        gate.set()
        if closing.ident is not None:
            closing.join(30)
        manager.shutdown(wait=True)
    assert not any(t.name.startswith("pool_manager-supervisor") for t in threading.enumerate())


def test_an_unreferenced_manager_can_be_collected_after_shutdown(clock: FakeClock) -> None:
    import weakref

    manager = WorkerPoolManager(1, STALE, LIFETIME, clock=clock)
    manager.get_pool("a")[1]()
    manager.shutdown()
    ref = weakref.ref(manager)
    del manager
    gc.collect()
    assert ref() is None


# -- logs ----------------------------------------------------------------------------


def test_lifecycle_is_logged_and_a_handler_may_call_back_into_the_manager(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    import logging

    seen: list[tuple[str, list[object]]] = []

    class CallsBack(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), manager.keys()))  # would deadlock under the lock

    logger = logging.getLogger("pool_manager")
    handler = CallsBack(logging.INFO)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        manager.get_pool("old")[1]()
        manager.get_pool("idle")[1]()
        clock.advance(STALE * 3)
        manager.get_pool("old")[1]()
        finished = threading.Event()

        def sweep() -> None:
            manager.sweep()
            finished.set()

        for _ in range(2):  # 'idle' expires; then 'old' is retired
            finished.clear()
            thread = threading.Thread(target=sweep)
            thread.start()
            assert finished.wait(30), "sweep deadlocked on a log handler"
            thread.join()
            clock.advance(LIFETIME)
        manager.get_pool("young")[1]()
        clock.advance(LIFETIME)
        manager.get_pool("young")[1]()  # retired inside get_pool
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    messages = [message for message, _ in seen if " expired " in message or " retired " in message]
    assert messages == [
        "pool for key 'idle' expired after 180.0s unused",
        "pool for key 'old' retired after 780.0s",
        "pool for key 'young' retired after 600.0s",
    ]


# -- the supervisor ------------------------------------------------------------------


def test_supervisor_sleeps_until_woken_and_wakes_when_a_lease_is_released(
    clock: FakeClock,
) -> None:
    with WorkerPoolManager(1, STALE, LIFETIME, clock=clock) as manager:
        sweeps = []
        real_sweep = manager.sweep

        def counting_sweep():  # type: ignore[no-untyped-def]
            sweeps.append(clock.now)
            return real_sweep()

        manager.sweep = counting_sweep  # type: ignore[method-assign]
        _, done = manager.get_pool("a")  # a new pool wakes the supervisor once
        assert poll(lambda: len(sweeps) == 1, timeout=30)
        time.sleep(0.3)  # the fake clock stands still: no deadline is due
        assert len(sweeps) == 1  # no polling
        done()  # releasing the last lease wakes the supervisor
        assert poll(lambda: len(sweeps) == 2, timeout=30)
        time.sleep(0.3)
        assert len(sweeps) == 2  # then it sleeps until the pool's deadline, STALE away
        assert "a" in manager


def test_pools_from_the_default_factory_apply_backpressure(manager: WorkerPoolManager) -> None:
    with manager.lease("a") as pool:
        assert isinstance(pool, engine_pool(manager)) and pool.max_pending == 4
    with (
        WorkerPoolManager(2, STALE, LIFETIME, max_pending=None) as unbounded,
        unbounded.lease("a") as pool,
    ):
        assert isinstance(pool, BaseWorkerPool) and pool.max_pending is None


def test_interleaved_use_and_expiry_leaves_nothing_behind(clock: FakeClock) -> None:
    # The Go package's TestInterleavedUseAndExpiryDoesNotLeak, with a fake clock:
    # 35 jobs over 3 keys, passing several stale periods and a max lifetime.
    stale, lifetime = 150.0, 300.0
    manager = WorkerPoolManager(2, stale, lifetime, clock=clock, worker_idle_timeout=None)
    results: list[int] = []
    seen_pools: list[object] = []  # strong references, so ids are not reused

    def job(i: int) -> None:
        with manager.lease(str(i % 3), 1) as pool:
            seen_pools.append(pool)
            results.append(pool.submit(square, i).result(timeout=60))

    for round_start in range(0, 35, 5):
        threads = [
            threading.Thread(target=job, args=(i,)) for i in range(round_start, round_start + 5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        clock.advance(50 if round_start % 10 else 160)  # some rounds leave keys stale
        manager.sweep()
    assert sorted(results) == [i * i for i in range(35)]
    # Pools were expired or retired and rebuilt along the way.
    assert len({id(pool) for pool in seen_pools}) > 3
    clock.advance(stale)
    manager.sweep()
    assert len(manager) == 0
    assert manager.stats()["total_workers"] == 0
    manager.shutdown()


def test_worker_limits_on_the_manager_reach_the_pools_it_builds(clock: FakeClock) -> None:
    from pool_manager import TaskTimeoutError

    with (
        WorkerPoolManager(
            1, STALE, LIFETIME, clock=clock, task_timeout=0.3, max_tasks_per_worker=2
        ) as manager,
        manager.lease("a") as pool,
    ):
        error = pool.submit(time.sleep, 30).exception(timeout=60)
        assert isinstance(error, TaskTimeoutError)
        pids = [pool.submit(getpid).result(timeout=60) for _ in range(4)]
        assert pids[0] == pids[1] != pids[2] == pids[3]
    with pytest.raises(ValueError, match="kill_worker_memory"):
        WorkerPoolManager(1, 1, 1, max_worker_memory="2GB", kill_worker_memory="1GB")


def test_stats_count_each_pools_tasks_and_the_managers_totals(
    clock: FakeClock, tmp_path: Path
) -> None:
    from .helpers import raise_value_error, touch_and_wait

    gate, started = tmp_path / "gate", tmp_path / "started"
    with (
        WorkerPoolManager(1, STALE, LIFETIME, clock=clock, max_pending=None) as manager,
        manager.lease("a", 1) as pool,
    ):
        assert [pool.submit(square, i).result(timeout=60) for i in range(3)] == [0, 1, 4]
        assert isinstance(pool.submit(raise_value_error, "x").exception(timeout=60), ValueError)
        running = pool.submit(touch_and_wait, str(started), str(gate))
        queued = [pool.submit(square, i) for i in range(8)]
        assert poll(started.exists, timeout=60)
        assert queued[-1].cancel()  # beyond loky's call queue: still cancellable
        stats = manager.stats()
        a = stats["pools"]["a"]
        assert a["key"] == "a"
        assert a["tasks"] == {
            "submitted": 13,
            "running": 1,
            "queued": 7,
            "completed": 3,
            "failed": 1,
            "cancelled": 1,
        }
        assert stats["pool_count"] == 1 and stats["total_leases"] == 1
        assert stats["total_unfinished_tasks"] == 8
        gate.touch()
        assert running.result(timeout=60)
        assert [f.result(timeout=60) for f in queued[:-1]] == [i * i for i in range(7)]
        tasks = manager.stats()["pools"]["a"]["tasks"]
        assert tasks["completed"] == 11 and tasks["running"] == tasks["queued"] == 0
        clock.advance(1)
        manager.sweep()
        stats = manager.stats()
        assert stats["last_sweep_at"] == clock.now
        assert stats["last_sweep_seconds"] is not None and stats["last_sweep_seconds"] >= 0


def test_a_pool_leased_past_its_lifetime_is_retired_by_the_supervisor_alone() -> None:
    # Real time: no get_pool or release after the build wakes the supervisor.
    with WorkerPoolManager(1, 600, 0.3, memory_sample_interval=None) as manager:
        pool, done = manager.get_pool("a")
        assert poll(lambda: "a" not in manager, timeout=30)
        assert manager.stats()["retiring"][0]["leases"] == 1
        assert not pool.is_shut_down  # type: ignore[attr-defined]
        done()
        assert poll(lambda: pool.is_shut_down, timeout=30)  # type: ignore[attr-defined]


# -- the supervisor never stops --------------------------------------------------


def test_durations_of_centuries_keep_the_supervisor_sweeping(clock: FakeClock) -> None:
    # Deadlines ~31,700 years away: beyond what Condition.wait takes
    # (threading.TIMEOUT_MAX, ~292 years). The supervisor waits in steps.
    with WorkerPoolManager(
        1, 1e12, timedelta(days=365 * 31_700), clock=clock, memory_sample_interval=None
    ) as manager:
        with manager.lease("a"):
            pass
        assert poll(lambda: manager.stats()["last_sweep_at"] == clock.now, timeout=30)
        for _ in range(2):
            # Each release wakes the supervisor from its wait of centuries.
            clock.advance(1)
            with manager.lease("a"):
                pass
            assert poll(lambda: manager.stats()["last_sweep_at"] == clock.now, timeout=30)
        assert manager.stale_pool_expiration == 1e12 and "a" in manager


def test_the_supervisor_survives_a_sweep_that_raises_and_tries_again() -> None:
    sweeps: list[float] = []

    def sweep() -> float | None:
        sweeps.append(time.monotonic())
        if len(sweeps) == 1:
            raise SystemExit(1)  # (not even that ends it)
        return None

    supervisor = Supervisor(sweep, time.monotonic, name="pool_manager-supervisor-test")
    supervisor.start()
    try:
        supervisor.wake()
        # No wake-up needed: a failed sweep is tried again a second later.
        assert poll(lambda: len(sweeps) >= 2, timeout=30)
        assert supervisor.alive
    finally:
        supervisor.stop()
    assert not supervisor.alive
