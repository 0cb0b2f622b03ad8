"""Where memory is measured: worker samples and the machine's available memory.

The supervisor calls `sample_workers` at ``memory_sample_interval`` and keeps
the result for `WorkerPoolManager.stats`. The limits are each pool's own, so
that a standalone pool has them too: ``max_worker_memory`` in the worker
after each task, ``kill_worker_memory`` by the process's I/O loop with
`resident_memory` every 50 ms (from outside: a task growing inside one C call
that holds the GIL is caught too).

Cost, measured: RSS from ``/proc/<pid>/statm`` takes ~10 µs a worker; USS
needs ``/proc/<pid>/smaps_rollup``, ~170 µs (the kernel walks the page
tables), so the supervisor reads it only every few samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TypedDict

import psutil

__all__ = ["WorkerMemory", "available_memory", "resident_memory", "sample_workers"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_PROC = os.path.isdir("/proc/self")


class WorkerMemory(TypedDict):
    """One worker process's memory, in bytes."""

    rss: int  #: resident set size
    uss: int | None  #: unique set size (what ending the worker frees), if measured


def _rss(pid: int) -> int:
    if _PROC:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    return int(psutil.Process(pid).memory_info().rss)


def resident_memory(pid: int) -> int | None:
    """Process ``pid``'s resident set size in bytes; None if it is gone."""
    try:
        return _rss(pid)
    except (OSError, ValueError, IndexError, psutil.Error):
        return None


def _uss(pid: int) -> int | None:
    if _PROC:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
                data = rollup.read()
        except PermissionError:
            return None
        kilobytes = 0
        for line in data.split(b"\n"):
            if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                kilobytes += int(line.split()[1])
        return kilobytes * 1024
    try:
        return int(psutil.Process(pid).memory_full_info().uss)
    except psutil.AccessDenied:
        return None


def sample_workers(
    pids: Iterable[int],
    *,
    unique: bool = True,
    previous: Mapping[int, WorkerMemory] | None = None,
) -> dict[int, WorkerMemory]:
    """Measure each live process in ``pids``; the ones that are gone are left out.

    With ``unique`` false, USS is read only for workers not in ``previous``;
    the others keep the value they had there.
    """
    samples: dict[int, WorkerMemory] = {}
    for pid in pids:
        try:
            rss = _rss(pid)
            if unique or not previous or pid not in previous:
                uss = _uss(pid)  # every time asked, and the first time a worker is seen
            else:
                uss = previous[pid]["uss"]
        except (OSError, ValueError, IndexError, psutil.Error):
            continue  # the process is gone (or went while being read)
        samples[pid] = WorkerMemory(rss=rss, uss=uss)
    return samples


def available_memory() -> int:
    """Bytes the machine can give to new work without swapping (``MemAvailable``)."""
    return int(psutil.virtual_memory().available)
