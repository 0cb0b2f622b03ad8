"""Checked by ``mypy --strict`` (``make lint``), never run: the public API's types.

Each ``assert_type`` fails the lint if a signature loses its precision, and
each ``type: ignore[...]`` fails it (as unused, under ``--strict``) if a bad
call stops being an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from pool_manager import (
    BaseWorkerPool,
    Factory,
    ManagerStats,
    PoolStats,
    TaskCounts,
    WorkerPool,
    WorkerPoolManager,
    as_completed,
    shared_data,
)

if TYPE_CHECKING:
    from typing_extensions import assert_type


def add(x: int, y: int = 0) -> int:
    return x + y


def build(max_size: int) -> WorkerPool:
    return BaseWorkerPool(max_size)


async def check_async(pool: WorkerPool, manager: WorkerPoolManager) -> None:
    assert_type(await pool.run(add, 1, y=2), int)
    await pool.run(add, "one")  # type: ignore[arg-type]
    async with manager.lease_async("key", send_size=2) as leased:
        assert_type(leased, WorkerPool)
        assert_type(leased.map(add, [1], return_exceptions=True), Iterator[int | BaseException])


def check(pool: BaseWorkerPool, manager: WorkerPoolManager) -> None:
    assert_type(pool.submit(add, 1, 2), Future[int])
    assert_type(pool.submit(add, 1, y=2), Future[int])
    pool.submit(add, "one")  # type: ignore[arg-type]
    pool.submit(add, 1, z=2)  # type: ignore[call-arg]
    assert_type(pool.submit_with_timeout(5, add, 1), Future[int])
    assert_type(pool.map(add, [1, 2], [3, 4]), Iterator[int])
    assert_type(pool.map(add, range(3), progress=True), Iterator[int])
    assert_type(pool.map(add, range(3), return_exceptions=True), Iterator[int | BaseException])
    assert_type(pool.map(add, range(3), return_exceptions=False), Iterator[int])
    assert_type(pool.map(add, range(3), progress={"desc": "a", "leave": False}), Iterator[int])
    assert_type(pool.imap_unordered(add, range(3), chunksize=2), Iterator[int])
    assert_type(pool.imap(add, range(3)), Iterator[int])
    assert_type(
        pool.imap_unordered(add, range(3), return_exceptions=True), Iterator[int | BaseException]
    )
    pool.imap_unordered(add, ["one"])  # type: ignore[arg-type]
    assert_type(pool.starmap(add, [(1, 2)]), Iterator[int])
    assert_type(pool.starmap_unordered(add, [(1, 2)], progress="sums"), Iterator[int])
    assert_type(pool.starmap(add, [(1, 2)], return_exceptions=True), Iterator[int | BaseException])
    assert_type(pool.task_counts(), TaskCounts)
    for future in as_completed([pool.submit(add, 1)], progress="sums"):
        assert_type(future, Future[int])

    factory: Factory = build
    leased, done = manager.get_pool_with_factory("key", 1, factory)
    assert_type(leased, WorkerPool)
    done()
    with manager.lease("key") as other:
        assert_type(other, WorkerPool)
    stats = manager.stats()
    assert_type(stats, ManagerStats)
    assert_type(stats["pools"]["key"], PoolStats)


def shared_data_types() -> None:
    # Any object may be shared; what a task gets back is the caller's to know.
    assert_type(shared_data(), Any)
    BaseWorkerPool(2, shared_data={"table": [1, 2]})
    WorkerPoolManager(2, 60, 3600, shared_data=b"x")


def native_threads_types() -> None:
    # "auto", a count, or None (left alone); any other string is a type error.
    BaseWorkerPool(2, native_threads="auto")
    BaseWorkerPool(2, native_threads=1)
    WorkerPoolManager(2, 60, 3600, native_threads=None)
    BaseWorkerPool(2, native_threads="all")  # type: ignore[arg-type]
