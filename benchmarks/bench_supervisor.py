"""The supervisor's own cost: CPU time with many idle pools being sampled.

Builds N pools with one live, idle worker each, lets the supervisor sample
their memory every ``--interval`` seconds for ``--seconds``, and reports the
supervisor thread's CPU time (from the kernel's per-thread counters) as a
share of one core and per sample.

    python benchmarks/bench_supervisor.py [--pools 50] [--interval 1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import psutil

from pool_manager import WorkerPoolManager


def thread_cpu_seconds(native_id: int) -> float:
    for thread in psutil.Process().threads():
        if thread.id == native_id:
            return float(thread.user_time + thread.system_time)
    raise LookupError(native_id)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    with WorkerPoolManager(
        1, 3600, 7200, memory_sample_interval=args.interval, worker_idle_timeout=None
    ) as manager:
        for i in range(args.pools):
            with manager.lease(f"key-{i}") as pool:
                pool.submit(abs, -i).result()
        (supervisor,) = [
            t for t in threading.enumerate() if t.name.startswith("pool_manager-supervisor")
        ]
        assert supervisor.native_id is not None
        manager.sweep()  # first sample now, so the window holds whole intervals
        start_cpu = thread_cpu_seconds(supervisor.native_id)
        start = time.monotonic()
        time.sleep(args.seconds)
        cpu = thread_cpu_seconds(supervisor.native_id) - start_cpu
        wall = time.monotonic() - start
        workers = manager.stats()["total_workers"]
    samples = wall / args.interval
    print(
        f"{args.pools} idle pools, {workers} idle workers, a sample every {args.interval:g}s "
        f"for {wall:.1f}s:\n"
        f"supervisor CPU {cpu * 1000:.1f} ms = {cpu / wall:.2%} of one core, "
        f"{cpu / samples * 1000:.2f} ms per sample of {workers} workers "
        f"({cpu / samples / max(workers, 1) * 1e6:.0f} µs per worker)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
