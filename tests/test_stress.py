"""Many keys, many threads, every cap setting, real workers: nothing hangs, nothing is lost.

Each case runs batches from many caller threads over more keys than the caps
hold, so pools hand workers and places to each other all the time. A hang
fails the case (every wait has a deadline, and the case has a hard timeout).
``make stress`` runs it bigger and repeated (``POOL_MANAGER_STRESS`` scales
the work; ``POOL_MANAGER_STRESS_ROUNDS`` repeats each case).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pool_manager import WorkerPoolManager

from .helpers import square

SCALE = float(os.environ.get("POOL_MANAGER_STRESS", "1"))
ROUNDS = int(os.environ.get("POOL_MANAGER_STRESS_ROUNDS", "1"))

_UNSET: Any = object()

#: (max_total_workers, max_busy_workers, max_pending); _UNSET: the default.
CAPS = {
    "defaults": (_UNSET, _UNSET, _UNSET),
    "no caps": (None, None, _UNSET),
    "tight budget": (5, None, _UNSET),
    "tight places": (None, 2, _UNSET),
    "both tight": (4, 1, _UNSET),
    "both tight, no backpressure": (4, 2, None),
    "budget below the keys": (3, 2, 1),
    # Many pools, each granted its whole pool_size, more than the budget
    # holds: workers are shed and handed over all the time (the shape of the
    # reported many-keys hang).
    "many keys, full grants": (64, None, _UNSET),
    "many keys, full grants, defaults": (_UNSET, _UNSET, _UNSET),
}

#: (keys, pool_size, caller threads, tasks per batch, every batch takes pool_size)
SHAPES = {
    "many keys, full grants": (64, 4, 32, 20, True),
    "many keys, full grants, defaults": (64, 4, 32, 20, True),
}


def _options(caps: tuple[Any, Any, Any]) -> dict[str, Any]:
    names = ("max_total_workers", "max_busy_workers", "max_pending")
    return {name: value for name, value in zip(names, caps) if value is not _UNSET}


def _round(
    manager: WorkerPoolManager, shape: tuple[int, int, int, int, bool], batches: int = 0
) -> None:
    keys, pool_size, threads, tasks, full = shape
    batches = int((batches or (300 if full else 80)) * SCALE)
    totals: list[int] = []
    lock = threading.Lock()

    def batch(i: int) -> None:
        # Some batches take their key's whole pool_size, some one worker.
        send_size = pool_size if full else 1 + i % pool_size
        with manager.lease(f"k{i % keys}", send_size=send_size) as pool:
            futures = [pool.submit(square, n) for n in range(tasks)]
            results = [future.result(timeout=60) for future in futures]
        with lock:
            totals.append(sum(results))

    with ThreadPoolExecutor(threads) as callers:
        for done in callers.map(batch, range(batches), timeout=120 * SCALE):
            assert done is None
    expected = sum(n * n for n in range(tasks))
    assert totals == [expected] * batches
    stats = manager.stats()
    assert stats["total_unfinished_tasks"] == 0
    budget = stats["budget"]
    assert budget["waiting"] == 0 and budget["busy_waiting"] == 0
    limit = manager.max_total_workers
    assert limit is None or budget["in_use"] <= limit


@pytest.mark.timeout(int(90 * max(1.0, SCALE) * ROUNDS))
@pytest.mark.parametrize("caps", list(CAPS), ids=list(CAPS))
def test_many_keys_many_threads_every_batch_completes(caps: str) -> None:
    shape = SHAPES.get(caps, (16, 3, 12, 12, False))
    for _ in range(ROUNDS * (2 if shape[-1] else 1)):
        manager = WorkerPoolManager(
            shape[1], 600, 3600, memory_sample_interval=None, **_options(CAPS[caps])
        )
        finished = False
        try:
            _round(manager, shape)
            finished = True
        finally:
            if finished:
                manager.shutdown(wait=True)
            else:  # a hang or a failure: end the workers, so the callers return
                manager.terminate()


#: The loky engine's cases: a slot starts in about 0.1 s of CPU (an
#: interpreter), so fewer batches, over keys that still outnumber the caps.
LOKY_CAPS = ["no caps", "tight budget", "tight places", "both tight", "budget below the keys"]


@pytest.mark.timeout(int(120 * max(1.0, SCALE) * ROUNDS))
@pytest.mark.parametrize("caps", LOKY_CAPS, ids=LOKY_CAPS)
def test_loky_engine_many_keys_many_threads_every_batch_completes(caps: str) -> None:
    pytest.importorskip("loky", reason="the loky extra is not installed")
    for _ in range(ROUNDS):
        manager = WorkerPoolManager(
            2, 600, 3600, memory_sample_interval=None, engine="loky", **_options(CAPS[caps])
        )
        finished = False
        try:
            _round(manager, (6, 2, 6, 6, False), batches=16)
            finished = True
        finally:
            if finished:
                manager.shutdown(wait=True)
            else:
                manager.terminate()
