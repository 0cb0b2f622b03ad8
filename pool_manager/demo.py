"""``python -m pool_manager demo``: the library at work, in a few seconds.

Part 1 runs a real CPU-bound batch (counting primes by trial division) for
several tenants at once, from one thread per tenant, through ONE
`WorkerPoolManager`: each tenant leases its own pool and maps its chunks
over it. It prints each tenant's result, the time taken and a table of
``manager.stats()``.

Part 2 shows, in real time, the two ways a pool leaves the map: a second
manager with short durations keeps one tenant busy past
``max_pool_lifetime`` (its pool is *retired* and the next lease gets a
fresh one), and leaves another idle past ``stale_pool_expiration`` (the
supervisor *expires* it and stops its workers). The manager's own INFO log
lines are shown as they happen.

Both managers are context managers, so every worker process is stopped
(``shutdown(wait=True)``) before `run_demo` returns.

The task functions are module-level so that workers import them by reference.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO

import psutil

from .manager import ManagerStats, PoolStats, WorkerPoolManager
from .pool import WorkerPool
from .progress import PROGRESS_EXTRA

__all__ = [
    "Settings",
    "count_primes",
    "count_primes_reporting_pid",
    "format_stats",
    "run_demo",
    "settings_for",
    "split_range",
    "wait_until",
]

# -- the work (runs in worker processes) -----------------------------------


def count_primes(lo: int, hi: int) -> int:
    """The number of primes ``p`` with ``lo <= p < hi``, by trial division.

    Deliberately plain Python, so that it keeps a CPU busy.
    """
    count = 0
    for n in range(max(lo, 2), hi):
        if n < 4:
            count += 1
            continue
        if n % 2 == 0:
            continue
        divisor = 3
        while divisor * divisor <= n:
            if n % divisor == 0:
                break
            divisor += 2
        else:
            count += 1
    return count


def count_primes_reporting_pid(lo: int, hi: int) -> tuple[int, int]:
    """`count_primes` over ``[lo, hi)``, with the pid of the worker that counted."""
    return count_primes(lo, hi), os.getpid()


# -- settings --------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How big the batch is and how fast the lifecycle part runs."""

    #: each tenant's half-open range of numbers to search for primes
    tenant_ranges: dict[str, tuple[int, int]]
    #: tasks per tenant (the range is split into this many chunks)
    chunks: int
    #: part 2: seconds an unused pool is kept
    stale_pool_expiration: float
    #: part 2: seconds after which a pool is retired
    max_pool_lifetime: float
    #: part 2: the busy tenant's pause between two leases
    busy_pause: float


def settings_for(quick: bool) -> Settings:
    """The demo's settings: full size, or ``quick`` (a fraction of it, for tests)."""
    if quick:
        return Settings(
            tenant_ranges={
                "acme": (0, 40_000),
                "globex": (100_000, 130_000),
                "initech": (1_000_000, 1_020_000),
            },
            chunks=4,
            stale_pool_expiration=0.5,
            max_pool_lifetime=1.5,
            busy_pause=0.05,
        )
    return Settings(
        tenant_ranges={
            "acme": (0, 400_000),
            "globex": (1_000_000, 1_300_000),
            "initech": (5_000_000, 5_150_000),
        },
        chunks=8,
        stale_pool_expiration=1.0,
        max_pool_lifetime=2.5,
        busy_pause=0.1,
    )


def split_range(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[lo, hi)`` into ``parts`` contiguous, nearly equal half-open ranges."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    bounds = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


# -- output helpers --------------------------------------------------------


class _Console:
    """Whole lines to one stream, from any thread, optionally time-stamped."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self.start = time.monotonic()

    def say(self, text: str = "") -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()

    def event(self, text: str) -> None:
        """A line stamped with the seconds since `restart_clock`."""
        self.say(f"  [{time.monotonic() - self.start:5.2f}s] {text}")

    def restart_clock(self) -> None:
        self.start = time.monotonic()


class _ElapsedFormatter(logging.Formatter):
    """Formats a log record stamped like `_Console.event`, marked as a log line."""

    def __init__(self, console: _Console) -> None:
        super().__init__()
        self._console = console

    def format(self, record: logging.LogRecord) -> str:
        # record.created is wall-clock time; map it onto the console's monotonic clock.
        elapsed = time.monotonic() - (time.time() - record.created) - self._console.start
        return f"  [{elapsed:5.2f}s] log {record.levelname} {record.name}: {record.getMessage()}"


def _show_library_logs(console: _Console, out: TextIO) -> Callable[[], None]:
    """Send the ``pool_manager`` logger's INFO records to ``out``; returns the undo."""
    library_logger = logging.getLogger("pool_manager")
    handler = logging.StreamHandler(out)
    handler.setLevel(logging.INFO)
    handler.setFormatter(_ElapsedFormatter(console))
    old_level = library_logger.level
    library_logger.addHandler(handler)
    library_logger.setLevel(logging.INFO)

    def undo() -> None:
        library_logger.removeHandler(handler)
        library_logger.setLevel(old_level)
        handler.close()

    return undo


def format_stats(stats: ManagerStats) -> list[str]:
    """``manager.stats()`` as a small table, one line per pool (retiring ones too)."""
    rows: list[tuple[str, ...]] = [("key", "state", "alive", "granted", "leases", "age")]
    pools: list[tuple[str, PoolStats]] = [(str(key), pool) for key, pool in stats["pools"].items()]
    pools += [("(retired)", pool) for pool in stats["retiring"]]
    for name, pool in pools:
        rows.append(
            (
                name,
                str(pool["state"]),
                str(pool["workers"]),
                f"{pool['worker_count']}/{pool['max_size']}",
                str(pool["leases"]),
                f"{pool['age']:.2f}s",
            )
        )
    if len(rows) == 1:
        rows.append(("(no pools)", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths))
        ]
        lines.append("    " + "  ".join(cells).rstrip())
    lines.append(f"    total worker processes alive: {stats['total_workers']}")
    return lines


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True


def _all_exited(pids: Iterable[int]) -> bool:
    return not any(psutil.pid_exists(pid) for pid in pids)


# -- part 1: a batch for several tenants -----------------------------------


@dataclass
class _TenantResult:
    tenant: str
    lo: int
    hi: int
    primes: int
    tasks: int
    seconds: float
    pids: set[int]


def _run_tenant_batch(
    manager: WorkerPoolManager, tenant: str, lo: int, hi: int, chunks: int
) -> _TenantResult:
    """Lease ``tenant``'s pool and count the primes in ``[lo, hi)`` in ``chunks`` tasks."""
    ranges = split_range(lo, hi, chunks)
    started = time.monotonic()
    with manager.lease(tenant, send_size=manager.pool_size) as pool:
        results = list(
            pool.map(count_primes_reporting_pid, [r[0] for r in ranges], [r[1] for r in ranges])
        )
    return _TenantResult(
        tenant=tenant,
        lo=lo,
        hi=hi,
        primes=sum(count for count, _ in results),
        tasks=len(ranges),
        seconds=time.monotonic() - started,
        pids={pid for _, pid in results},
    )


def _progress_step(console: _Console, manager: WorkerPoolManager, settings: Settings) -> None:
    """One more tenant's batch, with a progress bar (on stderr) when tqdm is installed."""
    lo, hi = next(iter(settings.tenant_ranges.values()))
    ranges = split_range(lo, hi, settings.chunks)
    try:
        import tqdm  # noqa: F401  (only to know whether the bar can be drawn)
    except ImportError:
        console.say(
            f"  (pip install '{PROGRESS_EXTRA}' to see pool.map(..., progress=True) draw a bar)"
        )
        return
    console.say("  tenant-progress: the same count with pool.map(..., progress=True):")
    with manager.lease("tenant-progress", send_size=manager.pool_size) as pool:
        counted = pool.map(count_primes, *zip(*ranges), progress=True)
        console.say(f"  tenant-progress: {sum(counted)} primes in [{lo}, {hi})")


def _part_one(console: _Console, settings: Settings, pool_size: int, seen_pids: set[int]) -> None:
    tenants = settings.tenant_ranges
    console.say(
        f"Part 1: {len(tenants)} tenants count primes at once, one thread each, "
        f"through one manager (pool_size={pool_size})"
    )
    with WorkerPoolManager(
        pool_size, stale_pool_expiration=60.0, max_pool_lifetime=600.0
    ) as manager:
        started = time.monotonic()
        with ThreadPoolExecutor(len(tenants), thread_name_prefix="demo-tenant") as threads:
            futures = [
                threads.submit(_run_tenant_batch, manager, tenant, lo, hi, settings.chunks)
                for tenant, (lo, hi) in tenants.items()
            ]
            results = [future.result() for future in futures]
        elapsed = time.monotonic() - started
        for result in results:
            seen_pids.update(result.pids)
            console.say(
                f"  {result.tenant}: {result.primes} primes in [{result.lo}, {result.hi})"
                f"  ({result.tasks} tasks, {result.seconds:.2f}s,"
                f" worker pids {sorted(result.pids)})"
            )
        console.say(f"  all tenants done in {elapsed:.2f}s (worker start-up included)")
        _progress_step(console, manager, settings)
        console.say("  manager.stats():")
        for line in format_stats(manager.stats()):
            console.say(line)
    console.say("  manager shut down: its pools and their workers are gone")


# -- part 2: expiry and retirement -----------------------------------------


@dataclass
class _Generation:
    """One pool the busy tenant was handed, in the order they appeared."""

    number: int
    pool: WorkerPool
    first_lease: int
    leases: int = 0
    pids: set[int] = field(default_factory=set)


def _keep_busy(
    manager: WorkerPoolManager,
    key: Hashable,
    console: _Console,
    *,
    pause: float,
    timeout: float,
) -> list[_Generation]:
    """Lease ``key``'s pool over and over until a second pool has served 3 leases."""
    generations: list[_Generation] = []
    deadline = time.monotonic() + timeout
    lease_number = 0
    while time.monotonic() < deadline:
        lease_number += 1
        with manager.lease(key, send_size=1) as pool:
            _, pid = pool.submit(count_primes_reporting_pid, 0, 20_000).result()
        if not generations or pool is not generations[-1].pool:
            generations.append(_Generation(len(generations) + 1, pool, lease_number))
            if len(generations) == 1:
                console.event(f"{key}: lease {lease_number} built pool #1 (id {id(pool):#x})")
            else:
                console.event(
                    f"{key}: lease {lease_number} got a NEW pool #{len(generations)} "
                    f"(id {id(pool):#x}): pool #{len(generations) - 1} was retired"
                )
        current = generations[-1]
        current.leases += 1
        current.pids.add(pid)
        if len(generations) >= 2 and current.leases >= 3:
            break
        time.sleep(pause)
    return generations


def _part_two(console: _Console, settings: Settings, pool_size: int, seen_pids: set[int]) -> bool:
    stale = settings.stale_pool_expiration
    lifetime = settings.max_pool_lifetime
    console.say(
        f"Part 2: a manager with stale_pool_expiration={stale}s and max_pool_lifetime={lifetime}s;"
    )
    console.say(
        "  'busy' leases its pool every "
        f"{settings.busy_pause}s, 'dormant' runs one task and then sits idle"
    )
    ok = True
    console.restart_clock()
    with (
        WorkerPoolManager(
            pool_size, stale_pool_expiration=stale, max_pool_lifetime=lifetime
        ) as manager,
        ThreadPoolExecutor(1, thread_name_prefix="demo-busy") as threads,
    ):
        busy = threads.submit(
            _keep_busy,
            manager,
            "busy",
            console,
            pause=settings.busy_pause,
            timeout=lifetime + 20.0,
        )

        with manager.lease("dormant", send_size=1) as pool:
            _, dormant_pid = pool.submit(count_primes_reporting_pid, 0, 20_000).result()
        seen_pids.add(dormant_pid)
        console.event(f"dormant: ran its one task (worker pid {dormant_pid}), lease released")

        if wait_until(lambda: "dormant" not in manager, timeout=stale + 10.0):
            console.event("dormant: no longer in the manager (expired: unused too long)")
            if wait_until(lambda: _all_exited([dormant_pid]), timeout=10.0):
                console.event(f"dormant: its worker process {dormant_pid} has exited")
            else:
                console.event(f"dormant: PROBLEM: worker {dormant_pid} is still running")
                ok = False
        else:
            console.event("dormant: PROBLEM: its pool never expired")
            ok = False

        generations = busy.result()
        for generation in generations:
            seen_pids.update(generation.pids)
        if len(generations) < 2:
            console.event("busy: PROBLEM: its pool was never retired and rebuilt")
            return False
        old = generations[0]
        console.say("  manager.stats() once the busy tenant has its new pool:")
        for line in format_stats(manager.stats()):
            console.say(line)
        if wait_until(
            lambda: not manager.stats()["retiring"] and _all_exited(old.pids), timeout=10.0
        ):
            console.event(
                f"busy: retired pool #1 finished its work and was disposed; "
                f"its worker(s) {sorted(old.pids)} have exited"
            )
        else:
            console.event("busy: PROBLEM: the retired pool was not disposed")
            ok = False
        for generation in generations:
            console.say(
                f"  busy: pool #{generation.number} (id {id(generation.pool):#x}) served leases "
                f"{generation.first_lease}-{generation.first_lease + generation.leases - 1}, "
                f"worker pid(s) {sorted(generation.pids)}"
            )
        console.say(f"  keys still in the manager: {manager.keys()}")
        console.event("leaving the `with` block: manager.shutdown(wait=True)")
    console.event("manager shut down")
    return ok


# -- the whole demo --------------------------------------------------------


def run_demo(*, quick: bool = False, pool_size: int = 2, out: TextIO | None = None) -> int:
    """Run both parts of the demo, printing to ``out`` (default: ``sys.stdout``).

    Args:
        quick: a smaller batch and shorter durations (about 3 seconds in all).
        pool_size: the most worker processes each tenant's pool may use.
        out: where to print; read when called, so that a captured stdout works.

    Returns:
        0 if everything happened as described, 1 otherwise (the output says what).
    """
    stream = out if out is not None else sys.stdout
    console = _Console(stream)
    undo_logging = _show_library_logs(console, stream)
    seen_pids: set[int] = set()
    started = time.monotonic()
    try:
        _part_one(console, settings_for(quick), pool_size, seen_pids)
        console.say()
        ok = _part_two(console, settings_for(quick), pool_size, seen_pids)
    finally:
        undo_logging()
    console.say()
    if _all_exited(seen_pids):
        console.say(f"All {len(seen_pids)} worker processes this demo started have exited.")
    else:
        left = sorted(pid for pid in seen_pids if psutil.pid_exists(pid))
        console.say(f"PROBLEM: worker processes still running: {left}")
        ok = False
    console.say(f"Demo {'finished' if ok else 'FAILED'} in {time.monotonic() - started:.2f}s.")
    return 0 if ok else 1
