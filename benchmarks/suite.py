"""Benchmark suite: pool_manager against its peers, every measure, one run.

Runs each measure for pool_manager and for each peer (ProcessPoolExecutor,
loky, pebble, mpire, multiprocessing.Pool, joblib for large data, and the raw
limit of two processes and a pipe) in rounds: every sample is a fresh process running
``benchmarks.suite_measures`` for one (measure, library), and the libraries
take turns within each round so that a machine that slows down mid-run slows
all of them alike. Reports the median, min and max of each, pool_manager's ratio
to each peer, and whether each goal of the project's issues 5 and 14 is met.

    python -m benchmarks.suite [--quick] [--only MEASURE,...] [--libs LIB,...]
                               [--repeat N] [--out DIR]

from the repository's root (``make bench`` runs it there, with the peers
installed). Writes ``suite.md`` and ``suite.json`` to ``--out`` (default:
``benchmarks/results``; ``suite-quick.*`` with ``--quick``). The project's
benchmarks/README.md says what each measure is and how it is taken.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.suite_tasks import calibrate, is_tracker

HERE = Path(__file__).resolve().parent
#: The repository's root: the samples run there, as ``python -m benchmarks.suite_measures``.
ROOT = HERE.parent

LIBRARIES: dict[str, str] = {
    "pool_manager": "pool_manager",
    "ppe": "ProcessPoolExecutor (fork)",
    "ppe_spawn": "ProcessPoolExecutor (spawn)",
    "loky": "loky",
    "pebble": "pebble",
    "mpire": "mpire",
    "mp_pool": "multiprocessing.Pool",
    "raw": "raw limit",
    "joblib": "joblib",
    # pool_manager used another way (a measure's second way of doing the same
    # work): a column of its own, not a peer.
    "pool_manager_shared": "pool_manager (shared_data)",
    "pool_manager_shared_array": "pool_manager (shared_array)",
    "pool_manager_shared_both": "pool_manager (shared_data = a shared_array)",
    "pool_manager_loky": "pool_manager (loky engine)",
    "pool_manager_native_none": "pool_manager (native_threads=None)",
}
#: pool_manager's variants: columns beside it, left out of the ratios to peers.
VARIANTS = [
    "pool_manager_shared",
    "pool_manager_shared_array",
    "pool_manager_shared_both",
    "pool_manager_loky",
    "pool_manager_native_none",
]
PEERS = [name for name in LIBRARIES if name != "pool_manager" and name not in VARIANTS]
#: pool_manager's engines: the fork server's `BaseWorkerPool`, and the loky engine's
#: `LokyWorkerPool` (a variant), in every measure of a pool or a manager.
ENGINES = ["pool_manager", "pool_manager_loky"]
POOLS = [*ENGINES, "ppe", "loky", "pebble", "mpire", "mp_pool"]
#: The large-data measures' libraries (issue 14).
BIG_DATA = ["pool_manager", "ppe", "ppe_spawn", "loky", "joblib"]
DISTRIBUTIONS = [
    "pool-manager",
    "loky",
    "cloudpickle",
    "psutil",
    "pebble",
    "mpire",
    "joblib",
    "numpy",
]


@dataclass
class Measure:
    """One row of the table: what runs, for whom, how often, and how it reads."""

    name: str  # for --only
    label: str
    script: str  # the measure's name in benchmarks.suite_measures
    unit: str
    higher_is_better: bool
    libraries: list[str]
    params: dict[str, Any]
    quick_params: dict[str, Any] = field(default_factory=dict)
    repeat: int = 5
    quick_repeat: int = 2
    timeout: float = 120.0
    source: str = ""  # a row read off another measure's samples (not run itself) ...
    key: str = "value"  # ... under this key
    # The most copies of its data (``mb`` MB) a library may hold at once, from the
    # parameters: the suite makes ``mb`` smaller where the machine's memory is short.
    copies: Callable[[dict[str, Any]], int] | None = None

    def title(self, params: dict[str, Any]) -> str:
        """The row's label, with the sizes actually run."""
        return self.label.format(**params)


MEASURES: list[Measure] = [
    Measure(
        "round_trip",
        "warm round trip of a no-op, median of {calls:,} (µs)",
        "round_trip",
        "µs",
        False,
        [*POOLS, "raw"],
        {"calls": 1000},
        {"calls": 300},
    ),
    Measure(
        "submit_many",
        "{tasks:,} no-op submits then wait (tasks/s)",
        "submit_many",
        "/s",
        True,
        POOLS,
        {"tasks": 20_000},
        {"tasks": 4_000},
        repeat=3,
    ),
    Measure(
        "map_chunk1",
        "map, {items:,} items, chunksize 1 (items/s)",
        "map",
        "/s",
        True,
        POOLS,
        {"items": 10_000, "chunksize": 1},
        {"items": 3_000, "chunksize": 1},
        repeat=3,
    ),
    Measure(
        "map_chunk_n8",
        "map, {items:,} items, chunksize n/8 = {chunksize:,} (items/s)",
        "map",
        "/s",
        True,
        POOLS,
        {"items": 200_000, "chunksize": 25_000},
        {"items": 50_000, "chunksize": 6_250},
    ),
    Measure(
        "map_auto",
        "map, {items:,} items, automatic chunk size (items/s)",
        "map",
        "/s",
        True,
        POOLS,
        {"items": 200_000, "chunksize": None},
        {"items": 50_000, "chunksize": None},
    ),
    Measure(
        "cold_start",
        "cold start: construct → first result (ms)",
        "cold_start",
        "ms",
        False,
        [*ENGINES, "ppe", "ppe_spawn", "loky", "pebble", "mpire", "mp_pool"],
        {},
    ),
    Measure(
        "cold_new_key",
        "new key in a running WorkerPoolManager → first result (ms)",
        "cold_new_key",
        "ms",
        False,
        ENGINES,
        {},
    ),
    Measure(
        "cached_key",
        "cached key: get_pool + first result + release, median of {calls} (µs)",
        "cached_key",
        "µs",
        False,
        ENGINES,
        {"calls": 500},
        {"calls": 200},
    ),
    Measure(
        "echo_10mb",
        "10 MB argument echoed back (MB/s)",
        "echo",
        "MB/s",
        True,
        [*POOLS, "raw"],
        {"bytes": 10_000_000, "echoes": 5},
        {"bytes": 10_000_000, "echoes": 3},
        repeat=3,
    ),
    Measure(
        "efficiency",
        "{tasks} × 50 ms CPU tasks, parallel efficiency (%)",
        "efficiency",
        "%",
        True,
        [*POOLS, "raw"],
        {"tasks": 40},
        repeat=3,
    ),
    Measure(
        "efficiency_cpu",
        "{tasks} × 50 ms CPU tasks: their CPU time / (workers × wall) (%)",
        "efficiency",
        "%",
        True,
        [*POOLS, "raw"],
        {"tasks": 40},
        source="efficiency",
        key="cpu_value",
    ),
    Measure(
        "idle_uss",
        "idle worker USS (MB)",
        "idle_uss",
        "MB",
        False,
        POOLS,
        {"settle": 1.0},
        {"settle": 0.5},
        repeat=3,
        quick_repeat=1,
    ),
    Measure(
        "keyed_batches",
        "keyed batches: {batches} × {tasks} × 1 ms tasks, {keys} keys, {threads} threads (s) "
        "[fork: one shared executor; spawn: one per batch]",
        "keyed_batches",
        "s",
        False,
        ["pool_manager", "ppe", "ppe_spawn"],
        {"batches": 200, "per_batch_batches": 40, "keys": 10, "tasks": 20, "threads": 4},
        {"batches": 60, "per_batch_batches": 12, "keys": 10, "tasks": 20, "threads": 4},
        repeat=7,  # (a round varies by ±10% on a shared VM; the goal is a ratio near 1)
        quick_repeat=1,
        timeout=300.0,
    ),
    Measure(
        # Issue 13's many-core shape: many keys with a small cap each, more
        # caller threads; run it with --workers all on a many-core machine.
        "keyed_batches_many",
        "keyed batches, many keys: {batches} × {tasks} × 1 ms tasks, {keys} keys of "
        "pool_size {pool_size}, {threads} threads (s) [fork: one shared executor]",
        "keyed_batches_many",
        "s",
        False,
        ["pool_manager", "ppe"],
        {"batches": 800, "keys": 64, "pool_size": 4, "tasks": 20, "threads": 32},
        {"batches": 100, "keys": 64, "pool_size": 4, "tasks": 20, "threads": 32},
        repeat=3,
        quick_repeat=1,
        timeout=300.0,
    ),
    # Issue 14: data the way batch jobs pass it. Each measure's samples give
    # two rows: the wall time, and (``memory_mb``) the memory it took.
    Measure(
        "big_array_8",
        "{mb:g} MB numpy array as the argument of {tasks} tasks: wall (s)",
        "big_array",
        "s",
        False,
        [*BIG_DATA, "pool_manager_shared_array"],
        {"mb": 80, "tasks": 8},
        {"mb": 20, "tasks": 8},
        repeat=3,
        quick_repeat=1,
        timeout=300.0,
        copies=lambda p: p["tasks"] + 2 * p["workers"] + 1,
    ),
    Measure(
        "big_array_8_memory",
        "{mb:g} MB array, {tasks} tasks: the parent's peak RSS growth (MB)",
        "big_array",
        "MB",
        False,
        [*BIG_DATA, "pool_manager_shared_array"],
        {},
        source="big_array_8",
        key="memory_mb",
    ),
    Measure(
        "big_array_40",
        "{mb:g} MB numpy array read by {tasks} tasks: wall (s)",
        "big_array",
        "s",
        False,
        [*BIG_DATA, *VARIANTS],
        {"mb": 400, "tasks": 40, "whole_job": True},
        {"mb": 100, "tasks": 40, "whole_job": True},
        repeat=1,  # (16 GB through the pipes for each library that copies: minutes)
        quick_repeat=1,
        timeout=600.0,
        copies=lambda p: p["tasks"] + 2 * p["workers"] + 1,
    ),
    Measure(
        "big_array_40_memory",
        "{mb:g} MB array, {tasks} tasks: peak memory of the whole job (MB)",
        "big_array",
        "MB",
        False,
        [*BIG_DATA, *VARIANTS],
        {},
        source="big_array_40",
        key="memory_mb",
    ),
    Measure(
        "big_global",
        "{mb:g} MB global of the main script read by its function, {tasks} tasks, "
        "chunksize 1: wall (s)",
        "big_global",
        "s",
        False,
        [*BIG_DATA, "mp_pool"],
        {"mb": 100, "tasks": 20, "chunksize": 1},
        {"mb": 20, "tasks": 20, "chunksize": 1},
        repeat=3,
        quick_repeat=1,
        timeout=300.0,
        copies=lambda p: p["tasks"] + 3 * p["workers"] + 1,
    ),
    Measure(
        # Native thread pools (native_threads): numpy's BLAS in every worker at once.
        "blas_matmul",
        "numpy matmul, {size}×{size} float64, {tasks_per_worker} tasks of {products} "
        "products per worker, all workers busy: wall (s)",
        "blas_matmul",
        "s",
        False,
        ["pool_manager", "pool_manager_native_none", "pool_manager_loky", "ppe", "loky"],
        {"size": 600, "products": 4, "tasks_per_worker": 8},
        {"size": 600, "products": 2, "tasks_per_worker": 4},
        repeat=5,
        quick_repeat=1,
    ),
    Measure(
        "big_global_memory",
        "{mb:g} MB main-script global, {tasks} tasks: the parent's peak RSS growth (MB)",
        "big_global",
        "MB",
        False,
        [*BIG_DATA, "mp_pool"],
        {},
        source="big_global",
        key="memory_mb",
    ),
]
BY_NAME = {measure.name: measure for measure in MEASURES}

#: A measure's data may take this share of the memory available when it is planned ...
MEMORY_SHARE = 0.6
#: ... and a sample is stopped if the machine's available memory falls below this.
MEMORY_FLOOR = max(1 << 30, psutil.virtual_memory().total // 10)


def fit_to_memory(measure: Measure, params: dict[str, Any], available: int) -> dict[str, Any]:
    """``params`` with ``mb`` made smaller (10 MB steps) if its copies would not fit.

    A library that copies the data into each task at submit holds a copy per
    task in the parent (pool_manager today: 40 × 400 MB = 16 GB), so the
    worst case, not the typical one, decides.
    """
    if measure.copies is None:
        return params
    fits = MEMORY_SHARE * available / 1e6 / measure.copies(params)
    if params["mb"] <= fits:
        return params
    return params | {"mb": max(10, int(fits // 10) * 10), "planned_mb": params["mb"]}


# -- running samples in their own processes ---------------------------------


def become_subreaper() -> bool:
    """Adopt orphans of our children (Linux), so that leftovers can be found and killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(36, 1, 0, 0, 0) == 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def kill_leftovers(grace: float) -> list[str]:
    """Wait up to ``grace`` s for our remaining descendants to exit; kill the rest."""
    deadline = time.monotonic() + grace
    while True:
        for child in psutil.Process().children():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, os.WNOHANG)  # reap adopted zombies
        alive = [
            child
            for child in psutil.Process().children(recursive=True)
            if _status(child) not in (psutil.STATUS_ZOMBIE, None)
        ]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    killed = []
    for child in alive:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{child.pid} {' '.join(child.cmdline())[:80]}")
            child.kill()
    for child in psutil.Process().children():
        with contextlib.suppress(ChildProcessError, psutil.Error):
            child.wait(timeout=5)
    return killed


def _status(process: psutil.Process) -> str | None:
    try:
        return str(process.status())
    except psutil.Error:
        return None


def stop_tree(pid: int) -> None:
    """SIGKILL a child of ours, then every process of ours but resource trackers.

    The child dies first, so it starts no more; its descendants are then ours
    (see `become_subreaper`). A tracker left alive sees its clients go and
    removes the semaphores and shared memory they leaked; `kill_leftovers`
    ends it if it lingers.
    """
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).kill()
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not is_tracker(process.cmdline()):
                process.kill()


@contextlib.contextmanager
def process_group(command: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A child in a session of its own; stopped with its group if still running at the end."""
    child = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            stop_tree(child.pid)
        child.wait()
        # Whatever of its own outlives a child that exited by itself is found
        # (we adopt orphans: see become_subreaper) and killed by kill_leftovers
        # after a grace period, in which a tracker may still clean up.


def watch(child: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Wait for a sample: (its stderr, why it was stopped or ""), within ``timeout``.

    A sample is stopped (by `process_group`, on the way out) when it runs
    past its time, or when the machine's available memory falls below
    `MEMORY_FLOOR`: the large-data measures copy gigabytes, and a shared
    machine must not run out.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return child.communicate(timeout=0.1)[1], ""
        except subprocess.TimeoutExpired:
            available = psutil.virtual_memory().available
            if available < MEMORY_FLOOR:
                return "", (
                    f"stopped: the machine's available memory fell to "
                    f"{available / 2**30:.1f} GiB (the guard's floor: "
                    f"{MEMORY_FLOOR / 2**30:.1f} GiB)"
                )
            if time.monotonic() > deadline:
                return "", f"timed out after {timeout:g}s"


def run_sample(measure: Measure, library: str, params: dict[str, Any]) -> dict[str, Any]:
    """One sample in a fresh process: the child's JSON result, or an ``error``.

    The child runs from the repository's root with ``-m``, so the root is
    first on its ``sys.path``: it imports ``benchmarks.suite_tasks`` and this
    checkout's pool_manager, and so do the workers of every library it
    starts (they inherit or are passed its ``sys.path``).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".json", prefix="suite-") as result:
        command = [
            sys.executable,
            "-m",
            "benchmarks.suite_measures",
            measure.script,
            library,
            "--params",
            json.dumps(params),
            "--result",
            result.name,
        ]
        started = time.perf_counter()
        try:
            with process_group(command, ROOT) as child:
                stderr, stopped = watch(child, measure.timeout)
        finally:
            leftovers = kill_leftovers(grace=3.0)
        took = time.perf_counter() - started
        if stopped:
            return {"error": stopped, "leftovers": leftovers}
        if child.returncode != 0:
            tail = " | ".join(stderr.strip().splitlines()[-3:])
            return {"error": f"exit {child.returncode}: {tail}", "leftovers": leftovers}
        try:
            sample: dict[str, Any] = json.loads(Path(result.name).read_text())
        except (OSError, ValueError) as exc:
            return {"error": f"no result: {exc}", "leftovers": leftovers}
    sample["process_seconds"] = took
    if leftovers:
        sample["leftovers"] = leftovers
    return sample


# -- the machine --------------------------------------------------------------


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, machine's busy CPU seconds, this suite's own CPU seconds) now.

    Busy counts steal time too: a virtual CPU the host gave to someone else.
    The suite's own time includes every process it started and reaped.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return time.perf_counter(), busy, own


def other_work(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """Share of the machine's CPU time that other processes used between two snapshots."""
    wall = after[0] - before[0]
    foreign = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, foreign / (wall * (os.cpu_count() or 1))) if wall > 0 else 0.0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    found = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def pool_manager_source() -> str:
    """Where the samples import pool_manager from, and that checkout's commit.

    The samples run from the repository's root (`run_sample`), so they import
    the pool_manager beside ``benchmarks/``.
    """
    package = ROOT / "pool_manager"
    if not (package / "__init__.py").is_file():
        return f"pool_manager not found in {ROOT}"
    try:
        git = ["git", "-C", str(package.parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", str(package)],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(package)
    return f"{package} at {commit}" + (" with uncommitted changes" if dirty else "")


def pin_cpus(count: int) -> list[int]:
    """Restrict this process and its children to ``count`` CPUs, if there are more."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) > count:
        os.sched_setaffinity(0, set(usable[:count]))
    return sorted(os.sched_getaffinity(0))


def machine(cpus: list[int]) -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "cpus_used": cpus,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "versions": versions(),
        "pool_manager": pool_manager_source(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- summaries -------------------------------------------------------------------


def summarize(samples: list[dict[str, Any]], key: str = "value") -> dict[str, Any]:
    values = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
    notes = sorted({s["note"] for s in samples if s.get("note")})
    errors = [s["error"] for s in samples if s.get("error")]
    summary: dict[str, Any] = {"samples": values, "notes": notes, "errors": errors}
    if values:
        summary |= {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    extras = [{k: v for k, v in s.items() if k not in ("value", "note", "error")} for s in samples]
    summary["details"] = extras
    return summary


def fmt(value: float, unit: str) -> str:
    if unit == "/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M"
        if value >= 1e3:
            return f"{value / 1e3:.1f}k"
        return f"{value:.0f}"
    if unit in ("µs", "MB/s"):
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if unit == "ms":
        return f"{value:.0f}" if value >= 100 else f"{value:.1f}"
    if unit in ("%", "MB"):
        return f"{value:.1f}"
    if unit == "s" and value < 0.1:
        return f"{value:.4f}"  # a fork-started pool's big_global: milliseconds
    return f"{value:.2f}"


def cell(summary: dict[str, Any] | None, unit: str) -> str:
    if summary is None:
        return "—"
    if "median" in summary:
        text = (
            f"{fmt(summary['median'], unit)} "
            f"({fmt(summary['min'], unit)}–{fmt(summary['max'], unit)})"
        )
        if summary["errors"]:
            text += f" [{len(summary['errors'])} failed]"
        return text
    if summary["notes"]:
        return "; ".join(summary["notes"])
    if summary["errors"]:
        return "failed: " + str(summary["errors"][0])[:60].replace("|", "/")
    return "—"


def median_of(results: dict[str, Any], measure: str, library: str) -> float | None:
    summary = results.get(measure, {}).get(library)
    return None if summary is None else summary.get("median")


def ratio_text(value: float) -> str:
    """A ratio as the tables show it: two decimals, two digits when it is tiny."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def ratio(ours: float | None, theirs: float | None, higher_is_better: bool) -> float | None:
    """pool_manager relative to a peer: > 1 means pool_manager is better."""
    if ours is None or theirs is None or ours == 0 or theirs == 0:
        return None
    return ours / theirs if higher_is_better else theirs / ours


# Rows of the ratio table: (label, or None for the measure's own; our measure; theirs).
RATIO_ROWS: list[tuple[str | None, str, str]] = [
    *((None, m.name, m.name) for m in MEASURES if m.name not in ("cold_new_key", "cached_key")),
    (
        "new key in a running manager → first result, vs the peer's cold start",
        "cold_new_key",
        "cold_start",
    ),
    (
        "cached key get_pool + first result, vs the peer's warm round trip",
        "cached_key",
        "round_trip",
    ),
]


def ratio_table(
    results: dict[str, Any], titles: dict[str, str]
) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for label, ours_name, theirs_name in RATIO_ROWS:
        higher = BY_NAME[ours_name].higher_is_better
        ours = median_of(results, ours_name, "pool_manager")
        row = {peer: ratio(ours, median_of(results, theirs_name, peer), higher) for peer in PEERS}
        if any(value is not None for value in row.values()):
            table[label or titles[ours_name]] = row
    return table


@dataclass
class Check:
    """One condition of a goal: ``value`` against ``target``."""

    text: str
    value: float | None
    target: float | None  # None: shown for reference, not part of the goal
    at_least: bool  # met when value >= target (else when value < target)
    detail: str
    lacking: bool = False  # no value because pool_manager lacks the feature: not met

    def status(self) -> str:
        if self.target is None:
            return "for reference"
        if self.value is None:
            return "not met" if self.lacking else "not measured"
        met = self.value >= self.target if self.at_least else self.value < self.target
        return "met" if met else "not met"


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of issues 5 and 14, each with its checks, from the medians of ``results``."""

    def shown(value: float | None, unit: str) -> str:
        return "n/a" if value is None else f"{fmt(value, unit)} {unit}".replace(" /s", "/s")

    def versus(
        text: str,
        measure: str,
        peer: str,
        target: float | None,
        their_measure: str = "",
        ours_as: str = "pool_manager",
    ) -> Check:
        """pool_manager's ratio to ``peer`` (> 1: better) must reach ``target``
        (``ours_as``: pool_manager's column, or a variant's)."""
        spec = BY_NAME[measure]
        ours = median_of(results, measure, ours_as)
        theirs = median_of(results, their_measure or measure, peer)
        value = ratio(ours, theirs, spec.higher_is_better)
        notes = (results.get(measure, {}).get(ours_as) or {}).get("notes", [])
        if ours is None:
            detail = "; ".join(notes) or "not measured"
        else:
            detail = (
                f"{'n/a' if value is None else f'{value:.2f}x'}: "
                f"{shown(ours, spec.unit)} vs {LIBRARIES[peer]} {shown(theirs, spec.unit)}"
            )
        return Check(text, value, target, True, detail, lacking=ours is None and bool(notes))

    def alone(text: str, measure: str, target: float, at_least: bool) -> Check:
        value = median_of(results, measure, "pool_manager")
        unit = BY_NAME[measure].unit
        detail = (
            f"{shown(value, unit)} (target {'>=' if at_least else '<'} {fmt(target, unit)})"
            if value is not None
            else "not measured"
        )
        return Check(text, value, target, at_least, detail)

    def per_array(
        text: str, measure: str, target: float | None, ours_as: str = "pool_manager"
    ) -> Check:
        """pool_manager's memory (the measure's ``memory_mb`` row) over the data's size
        (``target`` None: for reference)."""
        memory = median_of(results, f"{measure}_memory", ours_as)
        details = (results.get(measure, {}).get(ours_as) or {}).get("details", [])
        size = next((d["array_mb"] for d in details if "array_mb" in d), None)
        if memory is None or not size:
            return Check(text, None, target, False, "not measured")
        value = memory / size
        wanted = "" if target is None else f" (target < {target:g}x)"
        detail = f"{value:.2f}x: {memory:.0f} MB for a {size:g} MB array{wanted}"
        return Check(text, value, target, False, detail)

    table: list[tuple[str, list[Check]]] = [
        (
            "1. keyed batches: >= 7x a spawn-started ProcessPoolExecutor per batch, "
            "and no slower than one shared ProcessPoolExecutor",
            [
                versus(">= 7x per-batch spawn executors", "keyed_batches", "ppe_spawn", 7.0),
                versus(">= 1x one shared executor", "keyed_batches", "ppe", 1.0),
            ],
        ),
        (
            "2. submit throughput >= multiprocessing.Pool.apply_async; "
            "map with chunksize=1 >= 5x ProcessPoolExecutor",
            [
                versus("submit >= 1x multiprocessing.Pool", "submit_many", "mp_pool", 1.0),
                versus("map chunksize 1 >= 5x ProcessPoolExecutor", "map_chunk1", "ppe", 5.0),
            ],
        ),
        (
            "3. map over 200,000 items with an automatic chunk size "
            ">= multiprocessing.Pool.map with its own chunking",
            [versus(">= 1x multiprocessing.Pool", "map_auto", "mp_pool", 1.0)],
        ),
        (
            "4. warm no-op round trip no slower than loky's; "
            "a cached key's get_pool + first result under 1 ms",
            [
                versus("round trip >= 1x loky", "round_trip", "loky", 1.0),
                alone("cached key < 1 ms", "cached_key", 1000.0, at_least=False),
            ],
        ),
        (
            "5. a new key's first result in half of loky's cold start or less",
            [
                versus(
                    "new key >= 2x loky's cold start", "cold_new_key", "loky", 2.0, "cold_start"
                ),
                versus("BaseWorkerPool cold start vs loky's", "cold_start", "loky", None),
            ],
        ),
        (
            "6. parallel efficiency >= 97% on 40 × 50 ms tasks",
            [
                alone("efficiency >= 97%", "efficiency", 97.0, at_least=True),
                Check(
                    "by the tasks' own CPU time",
                    median_of(results, "efficiency_cpu", "pool_manager"),
                    None,
                    True,
                    shown(median_of(results, "efficiency_cpu", "pool_manager"), "%"),
                ),
                Check(
                    "the raw limit on this machine",
                    median_of(results, "efficiency", "raw"),
                    None,
                    True,
                    shown(median_of(results, "efficiency", "raw"), "%"),
                ),
            ],
        ),
        (
            "7. 10 MB argument echoed back within 5% of loky's speed or faster",
            [versus(">= 0.95x loky", "echo_10mb", "loky", 0.95)],
        ),
        (
            "8. many keys (issue 13, with --workers all on a many-core machine): "
            "no slower than one shared ProcessPoolExecutor of as many workers",
            [versus(">= 1x one shared executor", "keyed_batches_many", "ppe", 1.0)],
        ),
        (
            "9. a large numpy array (80 MB) as the argument of 8 tasks (issue 14): "
            "the parent's peak growth under 2x the array",
            [
                per_array("parent growth < 2x the array", "big_array_8", 2.0),
                versus("wall time vs joblib", "big_array_8", "joblib", None),
                per_array(
                    "with shared_array: parent growth / the array",
                    "big_array_8",
                    None,
                    ours_as="pool_manager_shared_array",
                ),
            ],
        ),
        (
            "10. a large numpy array (400 MB, or what the memory allows) read by 40 tasks "
            "(issue 14): no slower than joblib, and the whole job's peak under 1.5x the array "
            "(the README's way for data every task reads: a shared_array as the pool's "
            "shared_data; the other ways for reference)",
            [
                versus(
                    "shared_data = a shared_array: wall time >= 1x joblib",
                    "big_array_40",
                    "joblib",
                    1.0,
                    ours_as="pool_manager_shared_both",
                ),
                per_array(
                    "shared_data = a shared_array: whole job's peak < 1.5x the array",
                    "big_array_40",
                    1.5,
                    ours_as="pool_manager_shared_both",
                ),
                versus("as an argument: wall time vs joblib", "big_array_40", "joblib", None),
                per_array("as an argument: whole job's peak / the array", "big_array_40", None),
                versus(
                    "with shared_data: wall time vs joblib",
                    "big_array_40",
                    "joblib",
                    None,
                    ours_as="pool_manager_shared",
                ),
                per_array(
                    "with shared_data: whole job's peak / the array",
                    "big_array_40",
                    None,
                    ours_as="pool_manager_shared",
                ),
                versus(
                    "with shared_array: wall time vs joblib",
                    "big_array_40",
                    "joblib",
                    None,
                    ours_as="pool_manager_shared_array",
                ),
                per_array(
                    "with shared_array: whole job's peak / the array",
                    "big_array_40",
                    None,
                    ours_as="pool_manager_shared_array",
                ),
            ],
        ),
        (
            "11. 10 MB argument echoed back at 3x loky's speed or faster (issue 14)",
            [versus(">= 3x loky", "echo_10mb", "loky", 3.0)],
        ),
    ]
    out = []
    for title, checks in table:
        statuses = [check.status() for check in checks]
        counted = [s for s in statuses if s != "for reference"]
        if "not met" in counted:
            status = "not met"
        elif "not measured" in counted:
            status = "not measured"
        else:
            status = "met"
        out.append(
            {
                "goal": title,
                "status": status,
                "checks": [
                    {
                        "check": check.text,
                        "status": status_,
                        "value": check.value,
                        "target": check.target,
                        "detail": check.detail,
                    }
                    for check, status_ in zip(checks, statuses)
                ],
            }
        )
    return out


# -- the report ------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    info, settings, results = report["machine"], report["settings"], report["results"]
    libraries = [lib for lib in LIBRARIES if lib in settings["libraries"]]
    peers = [lib for lib in libraries if lib in PEERS]
    versions_line = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "# pool_manager benchmark suite" + (" (quick smoke run)" if settings["quick"] else ""),
        "",
        f"- run: {info['date']}, {report['wall_seconds']:.0f} s wall; `{settings['command']}`",
        f"- machine: {info['cpu_model']}, nproc {info['nproc']}, CPUs used "
        f"{info['cpus_used']}, {info['memory_gb']} GB; {info['platform']}; load average "
        f"{info['load_average_at_start']} at start, {report['load_average_at_end']} at end",
        f"- versions: {versions_line}; pool_manager from {info['pool_manager']}",
        f"- every pool has {settings['workers']} workers; each sample is a fresh process; "
        "cells are median (min–max) over the samples; libraries take turns in each round",
        "",
        "| measure | " + " | ".join(LIBRARIES[lib] for lib in libraries) + " |",
        "|---" * (len(libraries) + 1) + "|",
    ]
    for name, measure in results.items():
        spec = BY_NAME[name]
        cells = [cell(measure.get(lib), spec.unit) for lib in libraries]
        lines.append(f"| {report['titles'][name]} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## pool_manager relative to each peer",
        "",
        "Medians' ratio, > 1 means pool_manager is better (faster, higher throughput, "
        "less memory).",
        "",
        "| measure | " + " | ".join(LIBRARIES[lib] for lib in peers) + " |",
        "|---" * (len(peers) + 1) + "|",
    ]
    for label, row in report["ratios"].items():
        cells = ["—" if row.get(p) is None else ratio_text(row[p]) for p in peers]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += ["", "## Goals (issues 5 and 14)", ""]
    for goal in report["goals"]:
        checks = "; ".join(
            f"{c['check']}: {c['detail']}"
            + ("" if c["status"] in (goal["status"], "for reference") else f" ({c['status']})")
            for c in goal["checks"]
        )
        lines.append(f"- **{goal['status']}**: {goal['goal']}. {checks}")

    lines += ["", "## Notes", ""]
    if settings.get("not_installed"):
        lines.append(
            "- not installed, so not measured: "
            + ", ".join(LIBRARIES[lib] for lib in settings["not_installed"])
            + " (`make bench` installs every peer, from benchmarks/requirements.txt)."
        )
    calibration = settings.get("calibration")
    if calibration:
        singles = [
            d["single_task_s"] * 1e3
            for lib in results.get("efficiency", {}).values()
            for d in lib["details"]
            if "single_task_s" in d
        ]
        spread = (
            f"; in the samples' own processes one task took {min(singles):.1f}–"
            f"{max(singles):.1f} ms (mean of ten, before and after the parallel run; "
            "each sample's efficiency uses its own)"
            if singles
            else ""
        )
        lines.append(
            f"- CPU burn: {calibration['iterations_50ms']:,} loop turns took "
            f"{calibration['measured_50ms_s'] * 1e3:.1f} ms here when calibrated{spread}; "
            f"the keyed batches' 1 ms task is {calibration['iterations_1ms']:,} turns."
        )
    keyed = results.get("keyed_batches", {})
    pm = keyed.get("pool_manager", {}).get("details", [])
    budget = {d.get("max_total_workers") for d in pm if "max_total_workers" in d}
    if keyed:
        kp = settings["plan"]["keyed_batches"]["params"]
        lines.append(
            "- keyed batches: pool_manager = one WorkerPoolManager(pool_size="
            f"{settings['workers']}) (max_total_workers {', '.join(map(str, budget)) or '?'}), "
            "each batch leasing its key's pool (first uses included); ProcessPoolExecutor "
            f"(fork) = one shared executor of {settings['workers']} workers for all keys; "
            "ProcessPoolExecutor (spawn) = a new executor per batch, timed on "
            f"{kp['per_batch_batches']} batches and scaled to {kp['batches']} (its workers "
            "import only the suite's small measure module, not an application)."
        )
    matmul = results.get("blas_matmul", {})
    if matmul:
        seen = {
            LIBRARIES[lib]: sorted(
                {n for d in summary["details"] for w in d.get("blas_threads", []) for n in w}
            )
            for lib, summary in matmul.items()
        }
        ours = median_of(results, "blas_matmul", "pool_manager")
        unlimited = median_of(results, "blas_matmul", "pool_manager_native_none")
        versus = ratio(ours, unlimited, higher_is_better=False)
        lines.append(
            "- numpy matmul: each worker's BLAS threads (threadpoolctl, in the workers): "
            + ", ".join(f"{name} {counts or '?'}" for name, counts in seen.items())
            + (
                f"; pool_manager with `native_threads=None` took {ratio_text(versus)} the "
                'time it took with the default (`"auto"`)'
                if versus is not None
                else ""
            )
            + "."
        )
    shares = report["other_work_share"]
    if shares:
        lines.append(
            "- other processes' share of the machine's CPU time during each measure "
            "(a shared machine; more than a few % means the figures are noisier): "
            + ", ".join(f"{name} {share:.0%}" for name, share in shares.items())
            + "."
        )
    for name, planned in settings["plan"].items():
        if "planned_mb" in planned["params"]:
            lines.append(
                f"- {name}: {planned['params']['mb']} MB, not {planned['params']['planned_mb']} "
                f"MB: its worst case had to fit in {MEMORY_SHARE:.0%} of the memory available "
                f"when it was planned ({settings['memory_available_gb']} GB)."
            )
    for name, rounds in report["rounds_cut_by_budget"].items():
        lines.append(
            f"- {name}: {rounds} round(s) only: the run had used its time budget "
            f"({settings['budget_seconds']:g} s)."
        )
    for name, measure in results.items():
        for lib, summary in measure.items():
            for error in summary["errors"]:
                lines.append(f"- {name} / {LIBRARIES[lib]}: failed sample: {error}")
            left = [x for d in summary["details"] for x in d.get("leftovers", [])]
            if left:
                lines.append(
                    f"- {name} / {LIBRARIES[lib]}: {len(left)} process(es) outlived the "
                    f"sample and were killed: {'; '.join(left[:3])}"
                )
    if lines[-1] == "":
        lines.append("- none")
    return "\n".join(lines) + "\n"


#: The peers that are packages of their own (the rest are the standard library), and
#: the variants that need one (pool_manager's loky engine: the loky extra).
PEER_MODULES = {
    "loky": "loky",
    "pebble": "pebble",
    "mpire": "mpire",
    "joblib": "joblib",
    "pool_manager_loky": "loky",
}


def _installed(library: str) -> bool:
    module = PEER_MODULES.get(library)
    return module is None or importlib.util.find_spec(module) is not None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="MEASURE",
        help=f"run these measures only (comma-separated, repeatable): {', '.join(BY_NAME)}",
    )
    parser.add_argument(
        "--libs",
        action="append",
        default=[],
        metavar="LIB",
        help=f"these libraries only (comma-separated, repeatable): {', '.join(LIBRARIES)}",
    )
    parser.add_argument("--repeat", type=int, metavar="N", help="samples per measure and library")
    parser.add_argument(
        "--workers",
        default="2",
        metavar="N",
        help="workers per pool (default 2); 'all': the CPUs this process may use",
    )
    parser.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help="seconds after which no measure starts another round (each still gets one); "
        "default 900, or 90 with --quick",
    )
    parser.add_argument(
        "--data-mb",
        type=float,
        metavar="MB",
        help="the large-data measures' data size in MB (big_array_8, big_array_40, "
        "big_global), instead of theirs",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results",
        metavar="DIR",
        help="directory for suite.md and suite.json (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.workers == "all":
        args.workers = len(os.sched_getaffinity(0))
    elif args.workers.isdigit() and int(args.workers) > 0:
        args.workers = int(args.workers)
    else:
        parser.error(f"--workers takes a positive number or 'all', not {args.workers!r}")
    args.only = [x for item in args.only for x in item.split(",") if x] or list(BY_NAME)
    args.libs = [x for item in args.libs for x in item.split(",") if x] or list(LIBRARIES)
    for name in args.only:
        if name not in BY_NAME:
            parser.error(f"unknown measure {name!r}; known: {', '.join(BY_NAME)}")
    for name in args.libs:
        if name not in LIBRARIES:
            parser.error(f"unknown library {name!r}; known: {', '.join(LIBRARIES)}")
    # A peer that is not installed is left out, and the report says so.
    args.missing = [lib for lib in args.libs if not _installed(lib)]
    args.libs = [lib for lib in args.libs if lib not in args.missing]
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.data_mb is not None and args.data_mb <= 0:
        parser.error("--data-mb must be > 0")
    if args.budget is None:
        args.budget = 90.0 if args.quick else 900.0
    return args


Plan = list[tuple[Measure, list[str], int, dict[str, Any]]]  # libraries, rounds, parameters


def plan_params(plan: Plan, name: str) -> dict[str, Any]:
    """The parameters the plan runs measure ``name`` with."""
    return next(params for measure, _, _, params in plan if measure.name == name)


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    started = time.perf_counter()
    cpus = pin_cpus(args.workers)
    if len(cpus) < args.workers:
        print(f"note: {args.workers} workers on {len(cpus)} CPUs", file=sys.stderr)
    become_subreaper()
    info = machine(cpus)
    wanted = {BY_NAME[name].source or name for name in args.only}
    measures = [m for m in MEASURES if m.name in wanted and not m.source]
    derived = [m for m in MEASURES if m.source in wanted]
    settings: dict[str, Any] = {
        "command": " ".join(
            ["python -m benchmarks.suite", *(sys.argv[1:] if argv is None else argv)]
        ),
        "quick": args.quick,
        "workers": args.workers,
        "budget_seconds": args.budget,
        "libraries": [lib for lib in LIBRARIES if lib in args.libs],
        "not_installed": args.missing,
        "measures": [m.name for m in measures],
    }
    extra: dict[str, Any] = {"workers": args.workers}
    if any(m.name in ("efficiency", "keyed_batches", "keyed_batches_many") for m in measures):
        iterations, measured = calibrate(0.05)
        extra |= {
            "iterations": iterations,
            "iterations_1ms": max(1, round(iterations / 50)),
            "calibrated_s": measured,
        }
        settings["calibration"] = {
            "iterations_50ms": iterations,
            "measured_50ms_s": measured,
            "iterations_1ms": extra["iterations_1ms"],
        }
    print(
        f"{info['cpu_model']}, nproc {info['nproc']}, CPUs {cpus}; "
        f"{', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
        flush=True,
    )

    plan: Plan = []
    settings["memory_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    for measure in measures:
        libraries = [lib for lib in measure.libraries if lib in args.libs]
        repeat = args.repeat or (measure.quick_repeat if args.quick else measure.repeat)
        params = extra | ((args.quick and measure.quick_params) or measure.params)
        if args.data_mb is not None and "mb" in params:
            params |= {"mb": args.data_mb}
        params = fit_to_memory(measure, params, psutil.virtual_memory().available)
        plan.append((measure, libraries, repeat, params))
    total = sum(len(libraries) * repeat for _, libraries, repeat, _ in plan)
    titles = {measure.name: measure.title(params) for measure, _, _, params in plan}
    titles |= {m.name: m.title(plan_params(plan, m.source)) for m in derived}
    settings["plan"] = {
        m.name: {"libraries": libs, "repeat": r, "params": p} for m, libs, r, p in plan
    }

    results: dict[str, Any] = {}
    cut: dict[str, int] = {}  # measure -> rounds run, when the time budget cut it short
    contention: dict[str, float] = {}  # measure -> share of CPU other processes used
    done = 0
    try:
        for measure, libraries, repeat, params in plan:
            samples: dict[str, list[dict[str, Any]]] = {lib: [] for lib in libraries}
            before = cpu_snapshot()
            for round_ in range(repeat):
                if round_ and time.perf_counter() - started > args.budget:
                    cut[measure.name] = round_
                    break
                shift = round_ % max(1, len(libraries))
                for lib in libraries[shift:] + libraries[:shift]:
                    done += 1
                    if samples[lib] and samples[lib][0].get("note"):
                        continue  # not applicable: one sample said so
                    sample = run_sample(measure, lib, params)
                    samples[lib].append(sample)
                    value = sample.get("value")
                    shown = (
                        f"{fmt(value, measure.unit)} {measure.unit}"
                        if isinstance(value, (int, float))
                        else sample.get("note") or sample.get("error")
                    )
                    print(
                        f"[{done:3}/{total} {time.perf_counter() - started:5.0f}s] "
                        f"{measure.name:13} {lib:12} round {round_ + 1}: {shown}",
                        flush=True,
                    )
            results[measure.name] = {lib: summarize(samples[lib]) for lib in libraries}
            for row in derived:
                if row.source == measure.name:
                    results[row.name] = {lib: summarize(samples[lib], row.key) for lib in libraries}
            contention[measure.name] = other_work(before, cpu_snapshot())
    except (KeyboardInterrupt, SystemExit):
        print("interrupted: no report written", file=sys.stderr)
        raise
    finally:
        kill_leftovers(grace=1.0)

    report = {
        "machine": info,
        "settings": settings,
        "results": results,
        "titles": titles,
        "rounds_cut_by_budget": cut,
        "other_work_share": contention,
        "ratios": ratio_table(results, titles),
        "goals": goals(results),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "suite-quick" if args.quick else "suite"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (args.out / f"{stem}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {args.out / stem}.md and .json in {report['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
