"""Peak memory of a sample, for the large-data measures of the suite.

Two figures, both read from Linux's ``/proc``:

- `ParentPeak`: how far this process's resident memory rose above where it
  was when the block began. The kernel's own high-water mark (``VmHWM``) is
  reset as the block begins (writing ``5`` to ``/proc/self/clear_refs``,
  Linux 4.0+), so the peak is exact even when it lasted less than a sampling
  interval (a pickle's copy is made while the GIL is held, and no sampling
  thread runs then). A thread also samples the resident size every 5 ms, as
  a cross-check and as the fallback where the reset is refused.
- `JobPeak`: the memory of the whole job, this process and every process
  under it (the pool's workers, its fork server or trackers). At the start,
  the sum of their proportional set sizes (PSS: a page shared by three
  processes counts a third in each, from ``smaps_rollup``), less their
  shared-memory part; then, sampled by a thread every 25 ms, the growth of
  the tree's anonymous resident memory (``RssAnon``, a counter: cheap), plus
  the files in ``/dev/shm`` that any process of the tree has mapped or held
  open so far (joblib's memory-mapped arrays), each counted once and whole
  while it exists, mapped or not, plus the memfd segments a process of the
  tree holds open or maps at the sample (pool_manager's out-of-band buffers
  and shared data: anonymous files, gone once nobody holds them), each
  counted once (by inode) and whole. Reading PSS at every sample was tried
  first: ``smaps_rollup`` walks a process's page tables, a tenth of a second
  or more for a parent holding gigabytes, and it slowed the pool it
  measured. The machine's ``Shmem`` (``/proc/meminfo``) was tried for the
  shared part: it counts every program's, and another program's 500 MB
  showed up in a sample. What this misses: a page a fork shared until
  written (a copy-on-write break), shared anonymous memory (``MAP_SHARED |
  MAP_ANONYMOUS``: none of the libraries passes data so), and a peak
  shorter than the interval.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1e6


def resident_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``: cheap to read)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def high_water_bytes() -> int:
    """The kernel's high-water mark of this process's resident set (``VmHWM``)."""
    found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) * 1024 if found else 0


def reset_high_water() -> bool:
    """Set ``VmHWM`` to the resident size now; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return high_water_bytes() <= resident_bytes() + 64 * PAGE


class _Sampler:
    """A daemon thread calling ``sample`` every ``interval`` seconds until stopped."""

    def __init__(self, sample: Callable[[], None], interval: float) -> None:
        self._sample = sample
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)  # after the sample: a slow read spaces them out


class ParentPeak:
    """``with ParentPeak() as peak: ...``; then ``peak.growth`` (bytes), ``peak.method``."""

    interval = 0.005

    def __init__(self) -> None:
        self.baseline = 0
        self.sampled_peak = 0
        self.exact = False
        self.growth = 0
        self.sampled_growth = 0
        self._sampler = _Sampler(self._sample, self.interval)

    def _sample(self) -> None:
        self.sampled_peak = max(self.sampled_peak, resident_bytes())

    def __enter__(self) -> ParentPeak:
        self.baseline = self.sampled_peak = resident_bytes()
        self.exact = reset_high_water()
        self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._sampler.stop()
        self._sample()
        self.sampled_growth = max(0, self.sampled_peak - self.baseline)
        high_water = high_water_bytes() if self.exact else 0
        self.growth = max(0, high_water - self.baseline) if self.exact else self.sampled_growth

    @property
    def method(self) -> str:
        if self.exact:
            return "VmHWM reset at the baseline (exact peak)"
        return f"RSS sampled every {self.interval * 1e3:g} ms"

    def details(self) -> dict[str, object]:
        return {
            "parent_baseline_mb": self.baseline / MB,
            "parent_growth_mb": self.growth / MB,
            "parent_sampled_growth_mb": self.sampled_growth / MB,
            "parent_method": self.method,
        }


def _pss(pid: int) -> int:
    """A process's PSS in bytes, less its shared-memory part; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    fields = dict(re.findall(r"^(Pss|Pss_Shmem):\s+(\d+) kB", text, re.M))
    return (int(fields.get("Pss", 0)) - int(fields.get("Pss_Shmem", 0))) * 1024


def _anonymous(pid: int) -> int:
    """A process's resident anonymous memory (``RssAnon``: a counter, cheap to read)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^RssAnon:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) * 1024 if found else 0


def _tree(pid: int) -> list[int]:
    """``pid`` and every process under it, from each thread's ``children`` list."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        found.append(parent)
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:
            with suppress(OSError):
                queue += map(
                    int, Path(f"/proc/{parent}/task/{thread}/children").read_text().split()
                )
    return found


SHARED_MEMORY = "/dev/shm/"


def _shared_files(pid: int) -> set[str]:
    """The files in ``/dev/shm`` a process maps or holds open (joblib's arrays, say)."""
    found = set()
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[5:]
            if path and path[0].startswith(SHARED_MEMORY) and not path[0].endswith("(deleted)"):
                found.add(path[0])
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(SHARED_MEMORY) and not target.endswith("(deleted)"):
                    found.add(target)
    return found


def _memfds(pid: int) -> dict[int, int]:
    """The memfd segments a process holds open or maps: inode → bytes (allocated,
    from an open descriptor; else the mapping's size)."""
    found: dict[int, int] = {}
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/memfd:"):
                start, end = (int(address, 16) for address in fields[0].split("-"))
                inode = int(fields[4])
                found[inode] = max(found.get(inode, 0), end - start)
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                    info = os.stat(f"/proc/{pid}/fd/{fd}")
                    found[info.st_ino] = info.st_blocks * 512
    return found


def _allocated(path: str) -> int:
    """The memory a tmpfs file holds now (its allocated blocks); 0 once it is removed."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class JobPeak:
    """``with JobPeak() as peak: ...``; then ``peak.peak`` (bytes) and its parts at the peak."""

    interval = 0.025

    def __init__(self) -> None:
        self.baseline = 0  # the job's memory when the block began
        self.peak = 0
        self.at_peak: dict[str, float] = {}
        self.samples = 0
        self._anonymous_start: dict[int, int] = {}
        self._shared: set[str] = set()  # /dev/shm files the job mapped or opened so far
        self._sampler = _Sampler(self._sample, self.interval)

    def _sample(self) -> None:
        pids = _tree(os.getpid())
        anonymous = sum(_anonymous(pid) - self._anonymous_start.get(pid, 0) for pid in pids)
        # A process gone since the start gave its memory back.
        anonymous -= sum(size for pid, size in self._anonymous_start.items() if pid not in pids)
        segments: dict[int, int] = {}
        for pid in pids:
            self._shared |= _shared_files(pid)
            segments |= _memfds(pid)
        shmem = sum(_allocated(path) for path in self._shared)
        memfd = sum(segments.values())
        total = self.baseline + anonymous + shmem + memfd
        self.samples += 1
        if total > self.peak:
            self.peak = total
            self.at_peak = {
                "processes": len(pids),
                "anonymous_growth_mb": anonymous / MB,
                "shared_files_mb": shmem / MB,
                "memfd_mb": memfd / MB,
            }

    def __enter__(self) -> JobPeak:
        pids = _tree(os.getpid())
        self._anonymous_start = {pid: _anonymous(pid) for pid in pids}
        # (less shared memory: the samples count the /dev/shm files whole)
        self.baseline = self.peak = sum(_pss(pid) for pid in pids)
        self._sampler.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._sampler.stop()
        self._sample()

    def details(self) -> dict[str, object]:
        return {
            "job_baseline_mb": self.baseline / MB,
            "job_peak_mb": self.peak / MB,
            "job_at_peak": self.at_peak,
            "job_samples": self.samples,
            "job_method": "PSS of the process tree at the start (less shared memory), + the "
            "growth of its anonymous RSS, + the /dev/shm files it mapped or opened, "
            "+ the memfd segments it holds or maps, "
            f"every {self.interval * 1e3:g} ms",
        }
