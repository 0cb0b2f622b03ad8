"""A ``distributed.LocalCluster`` in a process of its own, for ``tests/test_dask.py``.

``python -m tests.dask_cluster [N_WORKERS]`` starts the cluster (loopback
only: 1 thread per worker process, no dashboard), prints its scheduler's
address on one line, and runs until its standard input closes, so that it
never outlives the test process that started it. Closing it stops the
nannies and their worker processes.

Out of the test process, the scheduler's own sockets and threads (it opens
connections to the workers as it goes) are not counted against the tests.
"""

from __future__ import annotations

import sys

from distributed import LocalCluster


def main() -> None:
    n_workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,  # real worker processes: one can die
        host="127.0.0.1",
        dashboard_address=None,  # no dashboard; its small HTTP server on loopback:
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
    ) as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
