"""The workload pool_manager exists for: repeated batches per key.

Each batch takes its key's pool, submits small CPU tasks and waits for them;
batches come from several threads, over a handful of keys, first uses
included. Compared in the same run against:

* a new spawn-started ``ProcessPoolExecutor`` per batch (what code without a
  pool cache does), and
* one shared ``ProcessPoolExecutor`` for all keys (fast, but no per-key cap).

Prints a markdown table of medians with ratios to pool_manager, and writes
the figures as JSON. Absolute times drift on shared machines; read the ratios.

    python benchmarks/bench_keyed_batches.py [--batches 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from pool_manager import WorkerPoolManager


def burn(milliseconds: float) -> int:
    """About ``milliseconds`` of pure-Python CPU work."""
    end = time.perf_counter() + milliseconds / 1000
    count = 0
    while time.perf_counter() < end:
        count += 1
    return count


def run_batches(batch: Callable[[str], None], *, batches: int, keys: int, threads: int) -> float:
    names = [f"tenant-{i % keys}" for i in range(batches)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as callers:
        list(callers.map(batch, names))
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    tasks, task_ms, size = args.tasks, args.task_ms, args.pool_size
    results: dict[str, list[float]] = {
        "pool_manager": [],
        "shared executor": [],
        "executor per batch": [],
    }
    for _ in range(args.repeat):
        with WorkerPoolManager(size, 600, 3600) as manager:

            def keyed(key: str) -> None:
                with manager.lease(key, send_size=size) as pool:
                    for future in [pool.submit(burn, task_ms) for _ in range(tasks)]:
                        future.result()

            results["pool_manager"].append(
                run_batches(keyed, batches=args.batches, keys=args.keys, threads=args.threads)
            )

        with ProcessPoolExecutor(os.cpu_count() or 2) as shared:

            def one_pool(key: str) -> None:
                for future in [shared.submit(burn, task_ms) for _ in range(tasks)]:
                    future.result()

            results["shared executor"].append(
                run_batches(one_pool, batches=args.batches, keys=args.keys, threads=args.threads)
            )

        def fresh(key: str) -> None:
            spawn = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(size, mp_context=spawn) as executor:
                for future in [executor.submit(burn, task_ms) for _ in range(tasks)]:
                    future.result()

        results["executor per batch"].append(
            run_batches(fresh, batches=args.per_batch_batches, keys=args.keys, threads=args.threads)
            * args.batches
            / args.per_batch_batches
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--per-batch-batches",
        type=int,
        default=40,
        help="batches run for the slow executor-per-batch peer (scaled up to --batches)",
    )
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=20, help="tasks per batch")
    parser.add_argument("--task-ms", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/keyed_batches.json"))
    args = parser.parse_args()

    results = measure(args)
    ours = statistics.median(results["pool_manager"])
    print(
        f"{args.batches} batches x {args.tasks} tasks of {args.task_ms} ms, {args.keys} keys, "
        f"{args.threads} caller threads, pool_size={args.pool_size}; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}\n"
    )
    print("| runner | median s | min s | max s | time / pool_manager's |")
    print("|---|---|---|---|---|")
    for name, times in results.items():
        median = statistics.median(times)
        print(
            f"| {name} | {median:.3f} | {min(times):.3f} | {max(times):.3f} "
            f"| {median / ours:.2f}x |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"args": vars(args) | {"json": str(args.json)}, "seconds": results}, indent=2)
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
