"""Thousands of keys: the cost of a cached get_pool, of a sweep, and of idle pools.

For 100, 1,000 and 5,000 keys: builds a pool per key (leased and released
once; a few of them run a task, then go idle and release their executor),
then reports

* a cached key's ``get_pool`` + ``done()``, median over many calls;
* a sweep with nothing due, and one that expires every key (fake clock);
* the parent's RSS, threads and file descriptors with every key idle.

    python benchmarks/bench_many_keys.py [--keys 100 1000 5000]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import threading
import time

import psutil

from pool_manager import WorkerPoolManager


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def footprint() -> tuple[float, int, int]:
    gc.collect()
    process = psutil.Process()
    return (
        process.memory_info().rss / 1e6,
        threading.active_count(),
        len(os.listdir("/proc/self/fd")),
    )


def run(keys: int, busy: int) -> dict[str, float]:
    clock = Clock()
    with WorkerPoolManager(
        1,
        600,
        3600,
        clock=clock,
        worker_idle_timeout=0.2,
        memory_sample_interval=5,
    ) as manager:
        rss0, threads0, fds0 = footprint()
        for i in range(keys):
            pool, done = manager.get_pool(f"tenant-{i}")
            if i < busy:
                pool.submit(abs, -i).result()
            done()
        deadline = time.monotonic() + 60
        while manager.stats()["total_workers"] and time.monotonic() < deadline:
            time.sleep(0.05)  # the busy pools' workers reach their idle timeout
        clock.now += 5
        manager.sweep()  # a memory sample: executors of idle pools are released
        rss, threads, fds = footprint()

        hits = []
        for i in range(20_000):
            key = f"tenant-{i % keys}"
            started = time.perf_counter()
            _, done = manager.get_pool(key)
            done()
            hits.append(time.perf_counter() - started)

        started = time.perf_counter()
        manager.sweep()
        idle_sweep = time.perf_counter() - started
        clock.now += 601
        started = time.perf_counter()
        result = manager.sweep()
        expiring_sweep = time.perf_counter() - started
        assert len(result.expired) == keys, len(result.expired)
    return {
        "get_pool_hit_us": statistics.median(hits) * 1e6,
        "sweep_nothing_due_ms": idle_sweep * 1e3,
        "sweep_expire_all_ms": expiring_sweep * 1e3,
        "rss_mb": rss - rss0,
        "threads": threads - threads0,
        "fds": fds - fds0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--busy", type=int, default=20, help="keys that run a task first")
    args = parser.parse_args()
    print(
        "| keys | get_pool hit (µs, median) | sweep, nothing due (ms) | sweep expiring all (ms) "
        "| parent RSS added (MB) | threads added | fds added |"
    )
    print("|---|---|---|---|---|---|---|")
    for keys in args.keys:
        r = run(keys, min(args.busy, keys))
        print(
            f"| {keys} | {r['get_pool_hit_us']:.1f} | {r['sweep_nothing_due_ms']:.2f} "
            f"| {r['sweep_expire_all_ms']:.1f} | {r['rss_mb']:.1f} | {r['threads']} "
            f"| {r['fds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
