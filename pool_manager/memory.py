"""Where memory is measured: worker samples and the machine's available memory.

The supervisor calls `sample_workers` at ``memory_sample_interval`` and keeps
the result for `WorkerPoolManager.stats`; the limits themselves are enforced
inside each worker (see ``_worker.py``), so that a standalone pool has them
too and a runaway task is caught within 50 ms, not at the next sample.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

import psutil

__all__ = ["WorkerMemory", "available_memory", "sample_workers"]


class WorkerMemory(TypedDict):
    """One worker process's memory, in bytes."""

    rss: int  #: resident set size
    uss: int | None  #: unique set size (what ending the worker frees), where the OS gives it


def sample_workers(pids: Iterable[int], *, unique: bool = True) -> dict[int, WorkerMemory]:
    """Measure each live process in ``pids``; the ones that are gone are left out.

    ``unique`` also reads USS (``/proc/<pid>/smaps_rollup`` on Linux: about
    ten times the cost of RSS alone, still well under a millisecond).
    """
    samples: dict[int, WorkerMemory] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if unique:
                try:
                    full = process.memory_full_info()
                    samples[pid] = WorkerMemory(rss=full.rss, uss=full.uss)
                    continue
                except psutil.AccessDenied:
                    pass
            samples[pid] = WorkerMemory(rss=process.memory_info().rss, uss=None)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return samples


def available_memory() -> int:
    """Bytes the machine can give to new work without swapping (``MemAvailable``)."""
    return int(psutil.virtual_memory().available)
