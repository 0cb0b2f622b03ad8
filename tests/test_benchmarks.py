"""The benchmark suite, ``python -m benchmarks.suite`` from the repository's root
(what ``make bench`` runs): its options, and one small run through it.

Each runs in a process of its own: the suite pins its CPUs and reaps its samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # a spawn-started ProcessPoolExecutor's by the path it is passed, the loky
    # engine's (pool_manager_loky, a variant) by loky's fork+exec, which passes it.
    done = suite(
        "--quick",
        "--repeat",
        "1",
        "--only",
        "round_trip,cold_start,cold_new_key,idle_uss",
        "--libs",
        "pool_manager,pool_manager_loky,mp_pool,ppe_spawn",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "suite-quick.json").read_text())
    results = report["results"]
    round_trip, cold_start = results["round_trip"], results["cold_start"]
    assert round_trip["pool_manager"]["median"] > 0 and round_trip["mp_pool"]["median"] > 0
    for library in ("pool_manager", "mp_pool", "ppe_spawn"):
        assert cold_start[library]["median"] > 0, cold_start[library]
    assert results["cold_new_key"]["pool_manager"]["median"] > 0
    assert "mp_pool" not in results["cold_new_key"]  # (a manager's measure)
    table = (tmp_path / "suite-quick.md").read_text()
    assert "warm round trip" in table and "python -m benchmarks.suite --quick" in table
    assert str(ROOT / "pool_manager") in report["machine"]["pool_manager"]
    # The loky engine: a column of its own in every measure here (the loky extra),
    # left out of the ratios to peers.
    if report["settings"]["not_installed"] == ["pool_manager_loky"]:
        return  # (loky is not installed: the report says so)
    for measure in ("round_trip", "cold_start", "cold_new_key", "idle_uss"):
        assert results[measure]["pool_manager_loky"]["median"] > 0, measure
    assert results["cold_new_key"]["pool_manager_loky"]["details"][0]["engine"] == "loky"
    # Its idle workers are its two loky workers, not loky's resource tracker.
    assert results["idle_uss"]["pool_manager_loky"]["details"][0]["workers_seen"] == 2
    assert "pool_manager (loky engine)" in table
    assert all("pool_manager_loky" not in row for row in report["ratios"].values())


def test_the_large_data_measures_report_time_and_memory(tmp_path: Path) -> None:
    # Tiny data (--data-mb): what is checked is that each measure runs, for a pool
    # that copies the data (pool_manager) and one that forks (ProcessPoolExecutor),
    # and that big_global really maps a function of a script run as __main__.
    done = suite(
        "--quick",
        "--repeat",
        "1",
        "--data-mb",
        "2",
        "--only",
        "big_array_8,big_array_40,big_global",
        "--libs",
        "pool_manager,ppe,pool_manager_shared,pool_manager_shared_array,pool_manager_shared_both",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "suite-quick.json").read_text())
    for measure in ("big_array_8", "big_array_40", "big_global"):
        for library in ("pool_manager", "ppe"):
            time_row = report["results"][measure][library]
            memory_row = report["results"][f"{measure}_memory"][library]
            assert time_row["median"] > 0 and memory_row["median"] >= 0, (measure, library)
    # pool_manager with shared_data: big_array_40 only, and not among the peers.
    assert report["results"]["big_array_40"]["pool_manager_shared"]["median"] > 0
    assert report["results"]["big_array_40_memory"]["pool_manager_shared"]["median"] > 0
    assert "pool_manager_shared" not in report["results"]["big_array_8"]
    assert all("pool_manager_shared" not in row for row in report["ratios"].values())
    # pool_manager with shared_array: both array measures, and not among the peers.
    for measure in ("big_array_8", "big_array_40"):
        time_row = report["results"][measure]["pool_manager_shared_array"]
        memory_row = report["results"][f"{measure}_memory"]["pool_manager_shared_array"]
        assert time_row["median"] > 0 and memory_row["median"] >= 0, measure
    assert all("pool_manager_shared_array" not in row for row in report["ratios"].values())
    # shared_data = a shared_array: big_array_40 only (goal 10's way).
    assert report["results"]["big_array_40"]["pool_manager_shared_both"]["median"] > 0
    assert report["results"]["big_array_40_memory"]["pool_manager_shared_both"]["median"] > 0
    assert "pool_manager_shared_both" not in report["results"]["big_array_8"]
    job = report["results"]["big_array_40"]["pool_manager"]["details"][0]
    assert job["array_mb"] == 2 and job["job_peak_mb"] >= job["job_baseline_mb"] > 0
    goals = {goal["goal"].split(".")[0]: goal for goal in report["goals"]}
    assert goals["9"]["checks"][0]["value"] > 0  # the parent's growth over the array's size
    assert goals["10"]["checks"][1]["value"] > 0  # the whole job's peak over the array's size
    assert goals["10"]["checks"][3]["value"] > 0  # the same, the array as an argument
    shared_array_peak = goals["10"]["checks"][-1]
    assert "shared_array" in shared_array_peak["check"] and shared_array_peak["value"] > 0


def test_the_matmul_measure_reports_each_workers_blas_threads(tmp_path: Path) -> None:
    # Two workers on the (at most) two CPUs the suite pins: "auto" gives each
    # worker one BLAS thread; native_threads=None leaves numpy's, one per CPU.
    pytest.importorskip("numpy")
    pytest.importorskip("threadpoolctl")
    done = suite(
        "--quick",
        "--only",
        "blas_matmul",
        "--libs",
        "pool_manager,pool_manager_native_none,ppe",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "suite-quick.json").read_text())
    results = report["results"]["blas_matmul"]
    for library in ("pool_manager", "pool_manager_native_none", "ppe"):
        assert results[library]["median"] > 0, library

    def threads(library: str) -> list[list[int]]:
        return list(results[library]["details"][0]["blas_threads"])

    assert threads("pool_manager") == [[1], [1]]
    if len(report["machine"]["cpus_used"]) > 1:
        assert min(min(threads("pool_manager_native_none"))) > 1
    assert "pool_manager_native_none" not in report["ratios"][report["titles"]["blas_matmul"]]
    assert "BLAS threads" in (tmp_path / "suite-quick.md").read_text()


def test_the_whole_jobs_memory_counts_memfd_segments() -> None:
    from benchmarks.suite_memory import _memfds

    fd = os.memfd_create("suite-test")
    try:
        os.write(fd, b"x" * (1 << 20))
        inode = os.fstat(fd).st_ino
        assert _memfds(os.getpid())[inode] >= 1 << 20
    finally:
        os.close(fd)
    assert inode not in _memfds(os.getpid())
