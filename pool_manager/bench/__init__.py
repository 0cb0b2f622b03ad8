"""The benchmark suite: ``python -m pool_manager bench`` (``make bench``).

pool_manager against ProcessPoolExecutor, loky, pebble, mpire and
multiprocessing.Pool, every measure in one run; the peers it finds
installed are measured (``make bench`` installs them all, from the
project's ``benchmarks/requirements.txt``). ``suite.py`` runs the rounds,
``suite_measures.py`` one sample in a fresh process, and ``suite_tasks.py``
holds the tasks.

The three are scripts that import each other by plain name: the suite puts
this directory on the samples' ``PYTHONPATH``, so that the tasks live in a
small module of their own that every library's workers import by name (a
spawn-started worker of a peer imports that module and nothing of this
package).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    """Run the suite with ``argv`` (its own options; ``--help`` lists them)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import suite  # type: ignore[import-not-found]  # (beside this file: see above)

    status: int = suite.main(argv)
    return status
