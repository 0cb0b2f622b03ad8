"""A batch job's script, run as ``__main__`` by the suite's ``big_global`` measure.

Its top builds a large module-level global, as a batch job loads its data
at the top of its script, and ``read_global``, a function of this script,
reads it in each task: a pool that starts its workers by forking this
process, and sends the function by reference (``__main__.read_global``),
finds the global already there; one that sends ``__main__``'s functions by
value (cloudpickle's rule) sends the global with every task; a
spawn-started worker imports this script (as ``__mp_main__``) and builds
the global again.

    SUITE_GLOBAL_BYTES=N python benchmarks/suite_main_script.py LIBRARY \\
        --params JSON --result FILE

`suite_measures.big_global` runs it, with the sample's interpreter, for one
(library, sample). The global's size is in the environment, so that a
worker that imports this script builds the same global. Writes
``{"value": seconds, "memory_mb": the parent's peak growth, ...}`` to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run by its path, this script's own folder comes first

# The job's data, built at import (a worker importing this script builds it too):
# the bytes are written, so every page is resident.
DATA = bytes(range(256)) * (int(os.environ.get("SUITE_GLOBAL_BYTES", "0")) // 256)


def read_global(index: int) -> int:
    """A task of the job: a cheap read of the global (its length and one byte)."""
    return len(DATA) + (DATA[index * 4099 % len(DATA)] if DATA else 0)


def main() -> int:
    from benchmarks.suite_measures import NotApplicable, running, warm
    from benchmarks.suite_memory import ParentPeak

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("library")
    parser.add_argument("--params", type=json.loads, default={})
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    p: dict[str, Any] = args.params
    tasks = p["tasks"]
    expected = [read_global(i) for i in range(tasks)]
    try:
        with running(args.library, p["workers"]) as pool:
            warm(pool, p["workers"])
            with ParentPeak() as parent:
                started = time.perf_counter()
                results = pool.map(read_global, range(tasks), p["chunksize"])
                elapsed = time.perf_counter() - started
    except NotApplicable as why:
        args.result.write_text(json.dumps({"value": None, "note": str(why)}))
        return 0
    if results != expected:
        raise AssertionError(f"the tasks returned {results[:3]}..., wanted {expected[:3]}...")
    result = {
        "value": elapsed,
        "memory_mb": parent.growth / 1e6,
        "global_mb": len(DATA) / 1e6,
        "tasks": tasks,
        **parent.details(),
    }
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
