"""Test doubles shared by the tests: a tqdm bar that records, a custom pool of threads.

(Not in ``helpers``: the workers import that module for its task functions,
and need none of these.)
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pool_manager import WorkerPool


class RecordingBar:
    """A stand-in for ``tqdm.auto.tqdm`` (the ``recorded`` fixture installs it):
    keeps its keyword arguments (``options``; ``total``, ``desc`` and ``unit``
    also as attributes), its count and whether it was closed."""

    made: list[RecordingBar] = []

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.total = options.get("total")
        self.desc = options.get("desc")
        self.unit = options.get("unit", "")
        self.n = 0
        self.closed = False
        RecordingBar.made.append(self)

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)

    def close(self) -> None:
        self.closed = True


class ThreadWorkerPool(WorkerPool):
    """A minimal `WorkerPool` of threads that defines only what `WorkerPool`
    asks of a custom pool: what the base gives one (``map`` and the other
    methods, ``run``), and how a manager treats one it did not build."""

    def __init__(self, max_size: int = 2) -> None:
        self._threads = ThreadPoolExecutor(2)

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._threads.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait, cancel_futures=cancel_futures)

    max_size = worker_count = 2

    def grant_workers(self, count: int) -> int:
        return 2

    unfinished_tasks = 0

    def worker_pids(self) -> list[int]:
        return []

    def add_idle_callback(self, callback: Any) -> None:
        pass

    def dispose(self, wait: bool = True) -> None:
        self.shutdown(wait)
