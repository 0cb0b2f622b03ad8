"""The benchmark suite, ``python -m benchmarks.suite`` from the repository's root
(what ``make bench`` runs): its options, and one small run through it.

Each runs in a process of its own: the suite pins its CPUs and reaps its samples.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def suite(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "benchmarks.suite", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_the_suites_options() -> None:
    done = suite("--help")
    assert done.returncode == 0, done.stderr
    assert "usage: python -m benchmarks.suite" in done.stdout
    assert "--only MEASURE" in done.stdout and "keyed_batches" in done.stdout


def test_a_run_writes_its_report(tmp_path: Path) -> None:
    # The tasks reach every library's workers by name (benchmarks.suite_tasks):
    # pool_manager's through its fork server, multiprocessing.Pool's by fork,
    # a spawn-started ProcessPoolExecutor's by the path it is passed.
    done = suite(
        "--quick",
        "--repeat",
        "1",
        "--only",
        "round_trip,cold_start",
        "--libs",
        "pool_manager,mp_pool,ppe_spawn",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "suite-quick.json").read_text())
    round_trip, cold_start = report["results"]["round_trip"], report["results"]["cold_start"]
    assert round_trip["pool_manager"]["median"] > 0 and round_trip["mp_pool"]["median"] > 0
    for library in ("pool_manager", "mp_pool", "ppe_spawn"):
        assert cold_start[library]["median"] > 0, cold_start[library]
    table = (tmp_path / "suite-quick.md").read_text()
    assert "warm round trip" in table and "python -m benchmarks.suite --quick" in table
    assert str(ROOT / "pool_manager") in report["machine"]["pool_manager"]
