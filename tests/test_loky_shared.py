"""Shared data on the loky engine (``_loky_shared.py``): one object for every
loky worker of a pool, pickled once in the parent, its large buffers in one
named shared-memory segment the pool (or the manager, or the factory) holds,
mapped read-only by each worker and loaded once, before the initializer.

Each test's segments are looked for in ``/dev/shm`` (Linux), by the names
``_loky_shared`` gives them; ``conftest.py`` fails a test that leaves one.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

loky = pytest.importorskip("loky", reason="the loky extra is not installed")
np = pytest.importorskip("numpy")

from pool_manager import (  # noqa: E402
    WorkerPoolBrokenError,
    WorkerPoolManager,
    _loky_shared,
    shared_data,
)
from pool_manager._protocol import BUFFER_THRESHOLD  # noqa: E402
from pool_manager.loky import LokyPoolFactory, LokyWorkerPool  # noqa: E402

from .helpers import (  # noqa: E402
    LoadsBadly,
    initializer_saw,
    peak_growth,
    poll,
    remember_shared_sum,
    shared_buffer_info,
    shared_data_flags,
    shared_data_lookup_error,
    shared_dict_summary,
    shared_sum,
    shared_sum_and_pid,
    shared_value,
    square,
    write_to_shared_data,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(sys.platform != "linux", reason="looks for segments in /dev/shm"),
]

ROOT = Path(__file__).resolve().parent.parent
#: Enough float64 elements to pass the out-of-band threshold a few times over.
LARGE = 4 * BUFFER_THRESHOLD // 8


@pytest.fixture
def array() -> Any:
    return np.arange(LARGE, dtype=np.float64)


def segments(pid: int | None = None) -> set[str]:
    """The names of the segments of process ``pid`` (this one) in /dev/shm."""
    prefix = f"{_loky_shared.NAME_PREFIX}{os.getpid() if pid is None else pid}_"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


# -- tasks and the initializer read it ---------------------------------------------------


def test_tasks_and_the_initializer_read_the_shared_array(array: Any) -> None:
    with LokyWorkerPool(2, initializer=remember_shared_sum, shared_data=array) as pool:
        assert pool._shared is not None and segments() == {pool._shared.name}
        results = [pool.submit(shared_sum_and_pid, i).result(timeout=60) for i in range(6)]
        assert [total for total, _ in results] == [float(array.sum())] * 6
        assert pool.submit(initializer_saw).result(timeout=60) == float(array.sum())
    assert segments() == set()  # (unlinked once the pool is shut down)


def test_the_shared_array_is_a_read_only_view_of_the_segment(array: Any) -> None:
    with LokyWorkerPool(1, shared_data=array) as pool:
        writeable, owns_data, first = pool.submit(shared_data_flags).result(timeout=60)
        assert (writeable, owns_data) == (False, False)  # (a view of the mapping, no copy)
        # Loaded once per worker: every task gets the same object.
        assert pool.submit(shared_data_flags).result(timeout=60)[2] == first
        with pytest.raises(ValueError, match="read-only"):
            pool.submit(write_to_shared_data).result(timeout=60)
        assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())


def test_a_dict_of_arrays_shares_one_segment_with_aligned_buffers(array: Any) -> None:
    table = {"name": "prices", "a": array, "b": np.asfortranarray(np.ones((LARGE // 8, 8)))}
    with LokyWorkerPool(1, shared_data=table) as pool:
        assert pool._shared is not None
        layout = pool._shared.spec.layout
        assert len(layout) == 2 and all(offset % 64 == 0 for offset, _ in layout)
        assert len(segments()) == 1
        assert pool.submit(shared_dict_summary).result(timeout=60) == (
            "prices",
            float(array.sum()),
            float(LARGE),
        )


def test_a_pickle_buffer_and_large_bytes_load_as_the_fork_server_loads_them() -> None:
    data = bytes(range(256)) * (2 * BUFFER_THRESHOLD // 256)
    with LokyWorkerPool(1, shared_data=pickle.PickleBuffer(data)) as pool:
        # (A read-only memoryview of the segment.)
        assert pool.submit(shared_buffer_info).result(timeout=60) == (
            "memoryview",
            True,
            len(data),
            0,
        )
    with LokyWorkerPool(1, shared_data=data) as pool:
        assert len(segments()) == 1  # (out of band, as on the fork server) ...
        assert pool.submit(shared_value).result(timeout=60) == data  # ... loaded as bytes


def test_small_shared_data_travels_in_the_pickle() -> None:
    with LokyWorkerPool(1, shared_data={"answer": 42, "small": np.arange(10.0)}) as pool:
        assert pool._shared is not None and pool._shared.name is None
        assert segments() == set()
        value = pool.submit(shared_value).result(timeout=60)
        assert value["answer"] == 42 and value["small"].sum() == 45.0


def test_a_worker_of_a_loky_pool_without_shared_data_raises_lookup_error() -> None:
    with LokyWorkerPool(1) as pool:
        assert "has no shared data" in pool.submit(shared_data_lookup_error).result(timeout=60)
        with pytest.raises(LookupError):
            pool.submit(shared_data).result(timeout=60)


# -- memory: shared, not copied ------------------------------------------------------------


def test_a_64_mb_array_read_by_3_workers_is_mapped_not_copied() -> None:
    size = 64_000_000
    whole: list[int] = []
    with peak_growth(whole):
        array = np.random.default_rng(0).random(size // 8)
        expected = float(array.sum())
        with LokyWorkerPool(3, initializer=remember_shared_sum, shared_data=array) as pool:
            assert pool._shared is not None
            name = pool._shared.name
            futures = [pool.submit(shared_sum_and_pid, i) for i in range(12)]
            results = [f.result(timeout=60) for f in futures]
            ran = sorted(set(pool.worker_pids()))
            memory = {pid: psutil.Process(pid).memory_full_info() for pid in ran}
            mapped = {
                pid: [
                    m
                    for m in psutil.Process(pid).memory_maps(grouped=False)
                    if m.path == f"/dev/shm/{name}"
                ]
                for pid in ran
            }
    assert [total for total, _ in results] == [expected] * 12
    assert whole[0] < 2.5 * size  # (the array, the segment: no copy per worker)
    assert len(ran) == 3
    for pid in ran:
        # Each worker read the whole array (its initializer did) through the
        # segment's mapping, and holds no copy of its own.
        assert memory[pid].uss < 0.5 * size, (pid, memory[pid])
        assert sum(m.rss for m in mapped[pid]) >= 0.9 * size, (pid, mapped[pid])
    # ... and those pages are counted once among the workers, not once each.
    assert sum(m.pss for maps in mapped.values() for m in maps) < 1.1 * size


# -- failures ---------------------------------------------------------------------------


def test_unpicklable_shared_data_raises_type_error_as_the_pool_is_built() -> None:
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        LokyWorkerPool(1, shared_data=threading.Lock())
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        LokyPoolFactory(shared_data=threading.Lock())
    with pytest.raises(TypeError, match="shared_data must be picklable"):
        WorkerPoolManager(
            1, 60, 600, engine="loky", shared_data=threading.Lock(), handle_signals=False
        )
    assert segments() == set()


def test_shared_data_that_fails_to_load_in_the_worker_fails_the_tasks() -> None:
    with (
        LokyWorkerPool(1, initializer=remember_shared_sum, shared_data=LoadsBadly()) as pool,
        pytest.raises(
            WorkerPoolBrokenError, match="loading the pool's shared_data failed in 3 loky"
        ) as caught,
    ):
        pool.submit(square, 2).result(timeout=60)
    assert "this shared data cannot be loaded here" in str(caught.value)  # (its traceback)
    assert "Traceback" in str(caught.value)


def test_a_segment_that_is_not_the_pools_fails_to_load(array: Any) -> None:
    with LokyWorkerPool(1, shared_data=array) as pool:
        assert pool._shared is not None
        spec = pool._shared.spec
        pool._shared_spec = spec._replace(token=bytes(len(spec.token)))  # (not its token)
        with pytest.raises(WorkerPoolBrokenError, match="is not this pool's"):
            pool.submit(square, 2).result(timeout=60)


# -- lifetime -----------------------------------------------------------------------------


def test_workers_that_exit_leave_the_segment_to_the_next(array: Any) -> None:
    # (A worker's exit unlinks nothing: each of 6 workers maps the segment,
    # and exits after its one task; the next maps it again.)
    with LokyWorkerPool(2, max_tasks_per_worker=1, shared_data=array) as pool:
        assert pool._shared is not None
        name = pool._shared.name
        results = [pool.submit(shared_sum_and_pid).result(timeout=60) for _ in range(6)]
        assert [total for total, _ in results] == [float(array.sum())] * 6
        assert len({pid for _, pid in results}) == 6  # (a new worker each time)
        assert poll(lambda: not any(psutil.pid_exists(pid) for _, pid in results[:-1]))
        assert segments() == {name}
        assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
    assert segments() == set()


def test_the_segment_is_unlinked_when_a_pool_is_dropped_without_shutdown(array: Any) -> None:
    pool = LokyWorkerPool(1, shared_data=array)
    assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
    assert len(segments()) == 1
    pool.shutdown(wait=False)
    del pool
    gc.collect()
    assert poll(lambda: segments() == set(), 15.0, 0.02)


def test_a_pool_that_never_started_a_worker_unlinks_its_segment(array: Any) -> None:
    pool = LokyWorkerPool(1, shared_data=array)
    assert len(segments()) == 1
    pool.shutdown()
    assert segments() == set()


def test_a_manager_shares_one_segment_among_its_loky_pools(array: Any) -> None:
    with WorkerPoolManager(
        2,
        600,
        3600,
        engine="loky",
        shared_data=array,
        memory_sample_interval=None,
        handle_signals=False,
        # (With an idle timeout the loky watch's thread may outlive the test
        # by up to that timeout: it is not woken as a pool is disposed.)
        worker_idle_timeout=None,
    ) as manager:
        assert len(segments()) == 1  # (pickled once, at construction)
        pools = []
        for key in ("a", "b"):
            with manager.lease(key) as pool:
                assert isinstance(pool, LokyWorkerPool)
                assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
                pools.append(pool)
        assert len(manager) == 2 and pools[0] is not pools[1]
        assert pools[0]._shared is pools[1]._shared  # type: ignore[attr-defined]
        assert len(segments()) == 1
        del pools, pool
    assert segments() == set()  # (the manager is shut down and its pools are gone)


def test_a_factory_shares_one_segment_among_its_pools(array: Any) -> None:
    factory = LokyPoolFactory(shared_data=array)
    assert len(segments()) == 1
    with WorkerPoolManager(
        2, 600, 3600, memory_sample_interval=None, handle_signals=False
    ) as manager:
        for key in ("a", "b"):
            with manager.lease(key, factory=factory) as pool:
                assert isinstance(pool, LokyWorkerPool)
                assert pool.submit(shared_sum).result(timeout=60) == float(array.sum())
        assert len(segments()) == 1
        del pool
    assert len(segments()) == 1  # (the factory still holds it, for its next pools)
    del factory
    assert segments() == set()


PARENT = textwrap.dedent(
    """
    import json, time
    import numpy
    from pool_manager import shared_data
    from pool_manager.loky import LokyWorkerPool

    def total():
        return float(shared_data().sum())

    pool = LokyWorkerPool(2, shared_data=numpy.ones(1 << 20))
    assert pool.submit(total).result() == float(1 << 20)
    print(json.dumps([pool._shared.name, pool.worker_pids()]), flush=True)
    time.sleep(600)
    """
)


def test_a_killed_parents_segment_is_unlinked_by_the_resource_tracker(tmp_path: Path) -> None:
    import json

    with (tmp_path / "stderr").open("w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    descendants: list[int] = []
    name = None
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line, (tmp_path / "stderr").read_text()
        name, workers = json.loads(line)
        descendants = [p.pid for p in psutil.Process(parent.pid).children(recursive=True)]
        assert workers and name in segments(parent.pid)
    finally:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        parent.stdout.close()  # type: ignore[union-attr]
    # The workers' watchdogs end them; then the resource tracker, which the
    # parent registered the segment with, sees its last client go and unlinks it.
    unlinked = poll(lambda: not os.path.exists(f"/dev/shm/{name}"), timeout=30)
    poll(lambda: not any(psutil.pid_exists(pid) for pid in descendants), timeout=10)
    for pid in descendants:  # never leave them running, whatever happened
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                process.kill()
        except psutil.NoSuchProcess:
            pass
    if name is not None and not unlinked:
        os.unlink(f"/dev/shm/{name}")
    assert unlinked, f"{name} still in /dev/shm 30 s after its parent was killed"
    assert "leaked shared_memory" in (tmp_path / "stderr").read_text()
