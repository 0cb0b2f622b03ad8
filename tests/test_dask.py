"""The Dask backend: each key's pool on a real ``distributed.LocalCluster``.

One cluster (2 worker processes, 1 thread each, loopback only) serves the
module. It runs in a process of its own (``tests/dask_cluster.py``), so the
scheduler's sockets and threads are not this process's; the module's client
is connected, and has started the threads and the connection a client keeps
for good, before the first test's leak baseline is taken. The module checks
at its end that closing the cluster left no process behind. The test that
kills a worker starts a cluster of its own: Dask's nanny restarts a dead
worker, and the new process would outlive that test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future
from pathlib import Path

import psutil
import pytest

distributed = pytest.importorskip(
    "distributed",
    reason="the Dask extra is not installed (pip install 'pool-manager[dask]')",
)

from distributed import Client, KilledWorker  # noqa: E402

from pool_manager import (  # noqa: E402
    BaseWorkerPool,
    PoolShutDownError,
    PoolTerminatedError,
    WorkerLostError,
    WorkerPool,
    WorkerPoolManager,
)
from pool_manager._map import chunk_runner  # noqa: E402
from pool_manager._pool_tasks import _TaskFuture  # noqa: E402
from pool_manager._queued import QueuedPool, _QueuedFuture  # noqa: E402
from pool_manager.dask import (  # noqa: E402
    DaskPoolFactory,
    DaskWorkerPool,
    _DaskTaskFuture,
)

from .helpers import (  # noqa: E402
    FakeClock,
    add,
    exit_process,
    fail_at,
    most_at_once,
    poll,
    raise_value_error,
    record_interval,
    run_scripted,
    runs_per_call,
    square,
    wait_for_count,
    wait_for_path,
    wait_then_square,
)

STALE = 60.0
LIFETIME = 600.0
ROOT = Path(__file__).resolve().parents[1]


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@contextlib.contextmanager
def local_cluster(log: Path, n_workers: int = 2) -> Iterator[str]:
    """A ``LocalCluster`` (loopback only) in a process of its own; yields its scheduler's address.

    Out of this process, the scheduler's own sockets and threads (it opens
    connections to its workers as it goes) are not counted against the
    tests. Closing its stdin closes the cluster; no process is left.
    """
    before = _children()
    with open(log, "w") as errors:
        cluster = subprocess.Popen(
            [sys.executable, "-m", "tests.dask_cluster", str(n_workers)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert cluster.stdin is not None and cluster.stdout is not None
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), f"no cluster: see {log}"
        yield address
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        finally:
            cluster.kill()  # (if it is still there)
            cluster.stdout.close()
    left = poll(lambda: not (_children() - before), timeout=30)
    assert left, f"the cluster left processes behind: {sorted(_children() - before)}"


def connect(address: str) -> Client:
    # One pooled connection to the scheduler (Dask opens more as gathers
    # overlap, up to 5): opened by the first call, it is the client's for
    # good, so the tests' leak check sees no new socket.
    return Client(address, connection_limit=1, set_as_default=False)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    log = tmp_path_factory.mktemp("dask") / "cluster.log"
    with local_cluster(log) as address, connect(address) as client:
        # Everything a client keeps for good starts now, before any test
        # counts threads and descriptors: its event loop, its offload
        # thread, its pooled connection (a gather, a cancel).
        assert client.submit(square, 3, pure=False).result(timeout=60) == 9
        executor = client.get_executor(pure=False)
        cancelled = executor.submit(wait_for_path, "/nonexistent", 0.5)
        cancelled.cancel()
        assert executor.submit(square, 4).result(timeout=60) == 16
        executor.shutdown(wait=True)
        yield client


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(clock: FakeClock) -> Iterator[WorkerPoolManager]:
    with WorkerPoolManager(2, STALE, LIFETIME, clock=clock, memory_sample_interval=None) as manager:
        yield manager


# -- results through the manager ------------------------------------------------


def test_results_come_back_through_the_manager(manager: WorkerPoolManager, client: Client) -> None:
    factory = DaskPoolFactory(client)
    with manager.lease("a", 2, factory=factory) as pool:
        assert isinstance(pool, DaskWorkerPool) and pool.client is client
        assert pool.max_size == 2 and pool.worker_count == 2 and pool.max_pending == 2
        assert pool.submit(square, 7).result(timeout=60) == 49
        assert pool.submit(add, 2, y=3).result(timeout=60) == 5
        assert pool.submit(lambda x: x + 1, 41).result(timeout=60) == 42  # cloudpickled
        assert list(pool.map(square, range(50), chunksize=1)) == [i * i for i in range(50)]
        with pytest.raises(ValueError, match="boom"):
            pool.submit(raise_value_error, "boom").result(timeout=60)
        assert pool.worker_pids() == []  # no local process
    pool, done = manager.get_pool_with_factory("a", 1, factory)
    done()
    stats = manager.stats()["pools"]["a"]
    assert stats["workers"] == 0 and stats["unfinished_tasks"] == 0
    assert stats["tasks"]["completed"] == 53 and stats["tasks"]["failed"] == 1


def test_both_engines_admit_and_count_through_one_queued_base() -> None:
    # The admission code was once copied into the Dask pool, and the copies
    # drifted: neither engine may define again what QueuedPool holds.
    shared = [
        "max_size",
        "max_pending",
        "worker_count",
        "grant_workers",
        "unfinished_tasks",
        "unfinished_maps",
        "add_idle_callback",
        "task_counts",
        "is_shut_down",
        "set_shutdown_reason",
        "shutdown",
        "__repr__",
        "_capacity",
        "_map_window",
        "_admit",
        "_wait_for_room",
        "_enqueue",
        "_grant_at_least_one",
        "_count_finished",
        "_run_idle_callbacks",
        "_cancel",
        "_cancel_queued",
        "_close_admission",
        "_settle",
    ]
    for engine in (BaseWorkerPool, DaskWorkerPool):
        assert issubclass(engine, QueuedPool)
        below = engine.__mro__[: engine.__mro__.index(QueuedPool)]
        assert [(cls.__name__, name) for cls in below for name in shared if name in vars(cls)] == []
    for future_class in (_TaskFuture, _DaskTaskFuture):
        assert issubclass(future_class, _QueuedFuture) and "cancel" not in vars(future_class)


def test_an_expired_dask_pool_says_why_it_refuses_work(
    manager: WorkerPoolManager, clock: FakeClock, client: Client
) -> None:
    with manager.lease("tenant-a", factory=DaskPoolFactory(client)) as pool:
        assert pool.submit(square, 2).result(timeout=60) == 4
    clock.advance(STALE)
    assert manager.sweep().expired == ["tenant-a"]
    with pytest.raises(PoolShutDownError, match=r"key 'tenant-a' expired \(unused for 60 s"):
        pool.submit(square, 3)
    with pytest.raises(PoolShutDownError, match=r"manager\.get_pool\('tenant-a'\)"):
        list(pool.map(square, range(3)))


def test_a_manager_subclass_can_make_dask_its_default_factory(
    clock: FakeClock, client: Client
) -> None:
    factory = DaskPoolFactory(client)

    class ClusterManager(WorkerPoolManager):
        def default_factory(self, max_size: int) -> WorkerPool:
            return factory(max_size)

    with (
        ClusterManager(2, STALE, LIFETIME, clock=clock, memory_sample_interval=None) as manager,
        manager.lease("a") as pool,
    ):
        assert isinstance(pool, DaskWorkerPool)
        assert pool.submit(square, 5).result(timeout=60) == 25


def test_arguments_travel_as_with_client_submit(client: Client) -> None:
    pool = DaskWorkerPool(client, 1)
    try:
        # "key" and "workers" are Client.submit options; here they are fn's.
        future = pool.submit(dict, key="k", workers="w", pure=True)
        assert future.result(timeout=60) == {"key": "k", "workers": "w", "pure": True}
        # A Dask future as an argument: Dask passes its result.
        three = client.submit(square, 3, pure=False)
        assert pool.submit(add, three, 1).result(timeout=60) == 10
        # An argument Dask cannot pickle fails its own future; the pool goes on.
        unpicklable = pool.submit(square, threading.Lock())
        assert isinstance(unpicklable.exception(timeout=60), Exception)
        assert pool.submit(square, 4).result(timeout=60) == 16
    finally:
        pool.dispose()


def test_shared_data_is_refused_and_a_scattered_future_does_its_job(client: Client) -> None:
    with pytest.raises(TypeError, match=r"client\.scatter\(obj, broadcast=True\)"):
        DaskWorkerPool(client, 1, shared_data=[1, 2, 3])
    # The route its message gives: scattered once, resolved by Dask on the worker.
    pool = DaskWorkerPool(client, 1)
    try:
        shared = client.scatter(list(range(1000)), broadcast=True)
        futures = [pool.submit(add, shared, [i]) for i in range(3)]
        assert [f.result(timeout=60)[-1] for f in futures] == [0, 1, 2]
        assert all(len(f.result(timeout=60)) == 1001 for f in futures)
    finally:
        pool.dispose()


# -- map -------------------------------------------------------------------------


@pytest.mark.parametrize("iterables", [1, 2])
def test_auto_chunked_map_yields_every_result_before_the_failing_item(
    client: Client, iterables: int
) -> None:
    # As BaseWorkerPool's map and ProcessPoolExecutor's (one task per call):
    # the error costs no result of the items before it, in its chunk or another.
    pool = DaskWorkerPool(client, 2)
    try:
        for bad in (0, 1, 150, 299):
            results = (
                pool.map(fail_at, range(300), [bad] * 300)
                if iterables == 2
                else pool.map(functools.partial(fail_at, bad=bad), range(300))
            )
            got = []
            with pytest.raises(ValueError, match=f"bad item {bad}"):
                for result in results:
                    got.append(result)
            assert got == list(range(bad))
    finally:
        pool.dispose()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunksize", [None, 1, 4])
def test_map_with_return_exceptions_yields_every_calls_outcome_in_order(
    client: Client, tmp_path: Path, chunksize: int | None
) -> None:
    actions = ["ok"] * 12
    actions[0] = actions[5] = "raise"
    actions[9] = "unpicklable"
    step = functools.partial(run_scripted, str(tmp_path), tuple(actions))
    pool = DaskWorkerPool(client, 2)
    try:
        results = list(pool.map(step, range(12), chunksize=chunksize, return_exceptions=True))
    finally:
        pool.dispose()
    for x, result in enumerate(results):
        if actions[x] == "raise":
            assert isinstance(result, ValueError) and str(result) == f"call {x} raised"
        elif actions[x] == "unpicklable":
            # In a chunk, described rather than lost with the chunk's other
            # results (one call per task, as 12 items on 2 workers are cut
            # by default: Dask's own handling).
            assert isinstance(result, Exception)
            if chunksize == 4:
                assert isinstance(result, RuntimeError) and "could not be pickled" in str(result)
        else:
            assert result == x
    assert len(results) == 12 and runs_per_call(str(tmp_path)) == dict.fromkeys(range(12), 1)


def test_the_chunk_runner_that_goes_on_past_errors_needs_nothing_of_pool_manager() -> None:
    import cloudpickle

    blob = cloudpickle.dumps(chunk_runner(int, starred=False, catch=True))
    program = (
        "import sys, pickle; sys.modules['pool_manager'] = None; "
        "results = pickle.loads(sys.stdin.buffer.read())(['1', 'x', '3']); "
        "results = pickle.loads(pickle.dumps(results)); "  # (as they travel)
        "print(results[0], type(results[1]).__name__, results[2]); "
        "print(results[1].__cause__)"
    )
    ran = subprocess.run(
        [sys.executable, "-c", program], input=blob, capture_output=True, check=True, timeout=60
    )
    first, *cause = ran.stdout.decode().splitlines()
    assert first.split() == ["1", "ValueError", "3"]
    assert "Traceback (most recent call last)" in "\n".join(cause)  # (the worker's, with it)


def test_map_returns_results_in_order_for_every_kind_of_input(client: Client) -> None:
    pool = DaskWorkerPool(client, 2)
    try:
        assert list(pool.map(square, range(200))) == [i * i for i in range(200)]
        assert list(pool.map(square, (i for i in range(100)))) == [i * i for i in range(100)]
        assert list(pool.map(square, range(10), chunksize=1)) == [i * i for i in range(10)]
        assert list(pool.map(add, range(30), range(100), chunksize=7)) == [2 * i for i in range(30)]
        assert list(pool.map(square, [])) == []
        with pytest.raises(ValueError):
            pool.map(square, range(3), chunksize=0)
    finally:
        pool.dispose()


def test_the_ported_map_methods_work_on_a_dask_pool(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 2)
    try:
        # Completion order: call 0 waits for the gate, call 1's (a path that
        # exists) is open, and the gate opens once call 1's result is out.
        results = pool.starmap_unordered(
            wait_then_square, [(str(gate), 0), (str(tmp_path), 3)], chunksize=1
        )
        assert next(results) == 9
        gate.touch()
        assert list(results) == [0]
        assert list(pool.starmap(pow, [(2, 5), (3, 2)], chunksize=1)) == [32, 9]
        assert sorted(pool.imap_unordered(square, (i for i in range(50)))) == [
            i * i for i in range(50)
        ]
        assert list(pool.imap(square, range(5), chunksize=2)) == [0, 1, 4, 9, 16]
    finally:
        pool.dispose()


def test_an_unfinished_map_counts_until_it_ends(client: Client) -> None:
    # (What keeps a manager from disposing the pool under the map's consumer.)
    pool = DaskWorkerPool(client, 2)
    try:
        results = pool.map(square, range(200))
        assert pool.unfinished_maps == 1
        assert next(results) == 0
        results.close()
        assert pool.unfinished_maps == 0
        assert sum(pool.map(square, range(10))) == 285
        assert pool.unfinished_maps == 0
    finally:
        pool.dispose()


def test_map_draws_a_progress_bar_named_after_the_key(
    manager: WorkerPoolManager, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    tqdm = pytest.importorskip("tqdm", reason="the progress extra (tqdm) is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tqdm.tqdm, "monitor_interval", 0)  # (tqdm's thread outlives its bars)
        with manager.lease("ledger", 2, factory=DaskPoolFactory(client)) as pool:
            assert list(pool.map(square, range(12), progress=True)) == [i * i for i in range(12)]
    err = capsys.readouterr().err
    assert "ledger" in err and "12/12" in err


def test_map_reads_an_endless_input_a_bounded_window_ahead(client: Client) -> None:
    pool = DaskWorkerPool(client, 2, max_pending=2)
    read = 0

    def endless() -> Iterator[int]:
        nonlocal read
        while True:
            read += 1
            yield read

    try:
        results = pool.map(square, endless(), chunksize=1)
        first = [next(results) for _ in range(20)]
        assert first == [i * i for i in range(1, 21)]
        # The pool holds 2 running + 2 pending: map reads no further ahead.
        assert read <= 20 + 4
        results.close()  # cancels what is still queued
    finally:
        pool.dispose()
    assert pool.unfinished_tasks == 0


def test_map_times_out_and_cancels_what_is_still_queued(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1)
    try:
        results = pool.map(wait_then_square, [str(gate)] * 4, range(4), timeout=0.5, chunksize=1)
        with pytest.raises(TimeoutError):
            next(results)
        counts = pool.task_counts()
        assert counts["cancelled"] == 3 and counts["running"] == 1  # the first one ran on
        gate.touch()
    finally:
        pool.dispose()
    assert pool.task_counts()["completed"] == 1


# -- the per-key cap and backpressure ---------------------------------------------


def test_the_per_key_cap_holds_across_the_cluster(
    manager: WorkerPoolManager, client: Client, tmp_path: Path
) -> None:
    # The cluster has 2 worker threads; key "a" may use 1 of them.
    gate, runs = tmp_path / "gate", tmp_path / "runs"
    runs.mkdir()
    factory = DaskPoolFactory(client, max_pending=None)
    with WorkerPoolManager(1, STALE, LIFETIME, memory_sample_interval=None) as one_each:
        with one_each.lease("a", factory=factory) as pool:
            futures = [pool.submit(record_interval, str(runs), str(gate)) for _ in range(4)]
            assert poll(lambda: len(os.listdir(runs)) == 1, timeout=30)
            # Another key's task runs on the free thread meanwhile ...
            with one_each.lease("b", factory=factory) as other:
                assert other.submit(square, 6).result(timeout=60) == 36
            # ... while "a" keeps its other tasks in its own queue.
            assert len(os.listdir(runs)) == 1
            counts = pool.task_counts()
            assert counts["running"] == 1 and counts["queued"] == 3
            gate.touch()
            assert all(isinstance(f.result(timeout=60), int) for f in futures)
        assert most_at_once(str(runs)) == 1
    # Two tasks of a key capped at 2 do run at once (each waits for the other).
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    with manager.lease("c", 2, factory=factory) as pool:
        together = [pool.submit(wait_for_count, str(meeting), "task", 2) for _ in range(2)]
        assert all(isinstance(f.result(timeout=60), int) for f in together)


def test_granted_workers_raise_the_cap_up_to_pool_size(
    manager: WorkerPoolManager, client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    factory = DaskPoolFactory(client, max_pending=None)
    pool, done = manager.get_pool_with_factory("a", 0, factory)
    try:
        assert pool.worker_count == 0  # granted none yet: one task at a time
        futures = [pool.submit(wait_then_square, str(gate), i) for i in range(3)]
        assert poll(lambda: pool.task_counts()["running"] == 1, timeout=30)
        _, more = manager.get_pool_with_factory("a", 5, factory)  # capped at pool_size=2
        more()
        assert pool.worker_count == 2
        assert pool.task_counts()["running"] == 2  # the next queued task went at once
        gate.touch()
        assert [f.result(timeout=60) for f in futures] == [0, 1, 4]
    finally:
        done()


def test_submit_blocks_while_the_pool_is_full(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = DaskPoolFactory(client, max_pending=1)(1)  # 1 on the cluster + 1 queued
    try:
        first = pool.submit(wait_for_path, str(gate))
        second = pool.submit(square, 2)
        third: list[Future[int]] = []
        submitter = threading.Thread(target=lambda: third.append(pool.submit(square, 3)))
        submitter.start()
        assert poll(lambda: pool._blocked_submits == 1, timeout=30)
        assert not third and pool.unfinished_tasks == 2
        gate.touch()
        submitter.join(timeout=60)
        assert third and third[0].result(timeout=60) == 9
        assert first.result(timeout=60) == str(gate) and second.result(timeout=60) == 4
    finally:
        pool.dispose()


def test_a_done_callback_can_submit_to_a_full_pool(client: Client, tmp_path: Path) -> None:
    # Done callbacks run on the client's event-loop thread: a submit there is
    # admitted beyond max_pending rather than block the loop that delivers
    # the answers.
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1, max_pending=0)
    try:
        first = pool.submit(wait_then_square, str(gate), 2)
        follow_ups: list[Future[int]] = []

        def chain(_: Future[int]) -> None:
            for x in range(3):
                follow_ups.append(pool.submit(square, x))

        first.add_done_callback(chain)
        gate.touch()
        assert poll(lambda: len(follow_ups) == 3, timeout=30)
        assert [f.result(timeout=60) for f in follow_ups] == [0, 1, 4]
    finally:
        gate.touch()
        pool.dispose()


@pytest.mark.timeout(60)
def test_map_timeout_counts_while_the_pool_is_full(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1, max_pending=0)
    try:
        blocker = pool.submit(wait_for_path, str(gate))
        with pytest.raises(TimeoutError):
            pool.map(square, range(3), timeout=0.5, chunksize=1)
        assert pool.task_counts()["submitted"] == 1
        gate.touch()
        assert blocker.result(timeout=60) == str(gate)
    finally:
        gate.touch()
        pool.dispose()


def test_a_blocked_submit_raises_when_the_pool_is_disposed(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1, max_pending=0)
    first = pool.submit(wait_for_path, str(gate))
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            pool.submit(square, 1)
        except PoolShutDownError as error:
            errors.append(error)

    submitter = threading.Thread(target=blocked)
    submitter.start()
    assert poll(lambda: pool._blocked_submits == 1, timeout=30)
    pool.dispose(wait=False)
    submitter.join(timeout=60)
    assert len(errors) == 1
    gate.touch()
    pool.dispose(wait=True)
    assert first.result(timeout=0) == str(gate)


# -- cancel, shutdown, expiry ---------------------------------------------------


def test_a_queued_task_can_be_cancelled_and_a_sent_one_cannot(
    client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1)
    try:
        running = pool.submit(wait_for_path, str(gate))
        queued = pool.submit(square, 4)
        assert pool.task_counts()["queued"] == 1
        assert queued.cancel() and queued.cancelled()
        with pytest.raises(CancelledError):
            queued.result(timeout=0)
        assert not running.cancel()  # on the cluster: running, as in ProcessPoolExecutor
        assert pool.unfinished_tasks == 1
        gate.touch()
        assert running.result(timeout=60) == str(gate)
        counts = pool.task_counts()
        assert counts["cancelled"] == 1 and counts["completed"] == 1
    finally:
        pool.dispose()


def test_shutdown_with_cancel_futures_drops_the_queue_and_lets_the_running_task_finish(
    client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1)
    running = pool.submit(wait_for_path, str(gate))
    queued = [pool.submit(square, i) for i in range(3)]
    closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True})
    closer.start()
    assert poll(lambda: all(f.cancelled() for f in queued), timeout=30)
    with pytest.raises(PoolShutDownError):
        pool.submit(square, 1)
    gate.touch()
    closer.join(timeout=60)
    assert not closer.is_alive() and running.result(timeout=0) == str(gate)


def test_expiry_disposes_the_keys_executor_and_leaves_the_client_open(
    manager: WorkerPoolManager, clock: FakeClock, client: Client
) -> None:
    factory = DaskPoolFactory(client)
    with manager.lease("a", factory=factory) as pool:
        assert pool.submit(square, 3).result(timeout=60) == 9
    assert isinstance(pool, DaskWorkerPool)
    clock.advance(STALE)
    assert manager.sweep().expired == ["a"]
    assert pool.is_shut_down and "a" not in manager
    with pytest.raises(PoolShutDownError):
        pool.submit(square, 1)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool._executor.submit(square, 1)  # the key's ClientExecutor is shut down
    assert client.status == "running"
    assert client.submit(square, 4, pure=False).result(timeout=60) == 16
    with manager.lease("a", factory=factory) as fresh:  # the next use builds a new pool
        assert fresh is not pool and fresh.submit(square, 5).result(timeout=60) == 25


def test_disposing_from_a_done_callback_does_not_wait_for_itself(
    client: Client, tmp_path: Path
) -> None:
    # Done callbacks run on the client's event-loop thread, which delivers
    # the answers a waiting dispose would wait for.
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1)
    disposed: list[str] = []

    def dispose_now(_: Future[int]) -> None:
        pool.dispose()
        disposed.append(threading.current_thread().name)

    first = pool.submit(wait_then_square, str(gate), 2)
    first.add_done_callback(dispose_now)
    second = pool.submit(square, 3)  # queued: still sent after the dispose
    gate.touch()
    assert second.result(timeout=30) == 9 and first.result(timeout=0) == 4
    assert poll(lambda: disposed, timeout=30) and disposed != [threading.current_thread().name]
    assert pool.is_shut_down
    pool.dispose()  # from this thread: closes the key's executor


def test_terminate_fails_the_running_task_and_cancels_the_queue(
    client: Client, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    pool = DaskWorkerPool(client, 1)
    running = pool.submit(wait_for_path, str(gate))
    queued = pool.submit(square, 2)
    assert poll(lambda: pool.task_counts()["running"] == 1, timeout=30)
    pool.terminate()
    assert queued.cancelled()
    with pytest.raises(PoolTerminatedError):
        running.result(timeout=0)
    gate.touch()  # the cluster's worker thread, which Dask cannot interrupt, ends too
    assert client.submit(square, 3, pure=False).result(timeout=60) == 9


def test_closing_the_client_fails_the_tasks_left_and_disposal_does_not_hang(
    client: Client, tmp_path: Path
) -> None:
    other = Client(client.scheduler.address, set_as_default=False)
    pool = DaskWorkerPool(other, 1)
    gate = tmp_path / "gate"
    running = pool.submit(wait_for_path, str(gate))
    queued = [pool.submit(square, i) for i in range(50)]
    assert poll(lambda: pool.task_counts()["running"] == 1, timeout=30)
    other.close()
    with pytest.raises(CancelledError, match="cancelled on the Dask cluster"):
        running.result(timeout=30)
    for future in queued:
        with pytest.raises(CancelledError, match="client is clos"):
            future.result(timeout=30)
    assert pool.unfinished_tasks == 0
    pool.dispose()  # (nothing left to release: it returns at once)
    gate.touch()  # the worker thread, which Dask cannot interrupt, is free again
    assert client.submit(square, 2, pure=False).result(timeout=60) == 4


def test_a_program_that_exits_with_dask_pools_lets_their_accepted_work_finish(
    client: Client, tmp_path: Path
) -> None:
    # pool_manager is imported before distributed, so Dask's exit hook (which
    # closes the default client) is registered after the manager's and would
    # run first; pool_manager.dask's own hook runs before both.
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    runs.mkdir()
    gate.touch()
    program = f"""
from pool_manager import WorkerPoolManager
from distributed import Client
from pool_manager.dask import DaskPoolFactory
from tests.helpers import record_interval

client = Client({client.scheduler.address!r})
manager = WorkerPoolManager(1, 600, 3600)
pool, done = manager.get_pool_with_factory("a", 1, DaskPoolFactory(client, max_pending=None))
for _ in range(10):
    pool.submit(record_interval, {str(runs)!r}, {str(gate)!r})
"""
    subprocess.run([sys.executable, "-c", program], cwd=ROOT, check=True, timeout=60)
    assert len([name for name in os.listdir(runs) if name.startswith("ran-")]) == 10


# -- a worker lost on the cluster -----------------------------------------------


def test_a_task_that_kills_its_worker_fails_alone_after_dask_retries_it(tmp_path: Path) -> None:
    # Dask reruns a task whose worker died on another worker, up to
    # distributed.scheduler.allowed-failures (3) times: this task kills 4
    # workers (the nannies restart them), then fails. Every other task,
    # including those on the workers that died, completes.
    with local_cluster(tmp_path / "cluster.log") as address, Client(address) as client:
        pool = DaskWorkerPool(client, 2)
        try:
            poison = pool.submit(exit_process, 3)
            others = [pool.submit(square, i) for i in range(20)]
            with pytest.raises(WorkerLostError) as lost:
                poison.result(timeout=60)
            assert isinstance(lost.value.__cause__, KilledWorker)
            assert "4 Dask workers died" in str(lost.value)
            assert [f.result(timeout=60) for f in others] == [i * i for i in range(20)]
            assert pool.submit(square, 9).result(timeout=60) == 81  # the pool carries on
            counts = pool.task_counts()
            assert counts["failed"] == 1 and counts["completed"] == 21
        finally:
            pool.dispose()


# -- packaging -------------------------------------------------------------------


def test_without_distributed_the_import_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "pool_manager.dask")
    with pytest.raises(ImportError, match=r"pool-manager\[dask\]"):
        importlib.import_module("pool_manager.dask")


def test_the_core_package_never_imports_distributed() -> None:
    code = (
        "import sys, pool_manager, pool_manager.manager, pool_manager.pool; "
        "from pool_manager import WorkerPoolManager, BaseWorkerPool; "
        "assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_arguments_are_refused(client: Client) -> None:
    with pytest.raises(TypeError, match="distributed.Client"):
        DaskPoolFactory(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DaskPoolFactory(client, max_pending=-1)
    with pytest.raises(ValueError, match="needs workers"):
        DaskPoolFactory(client, allow_other_workers=True)
    with pytest.raises(ValueError):
        DaskWorkerPool(client, 0)
    pool = DaskWorkerPool(client, 1)
    try:
        with pytest.raises(TypeError, match="callable"):
            pool.submit(42)  # type: ignore[arg-type]
    finally:
        pool.dispose()
