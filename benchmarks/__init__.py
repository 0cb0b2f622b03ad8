"""The benchmarks: ``python -m benchmarks.suite`` (``make bench``), and older scripts.

The suite measures pool_manager against ProcessPoolExecutor, loky, pebble,
mpire, multiprocessing.Pool and (large data) joblib, every measure in one run;
the peers it finds installed are measured (``make bench`` installs them all,
from ``benchmarks/requirements.txt``). ``suite.py`` runs the rounds,
``suite_measures.py`` one sample in a fresh process, ``suite_tasks.py``
holds the tasks, ``suite_memory.py`` measures the large-data samples' peak
memory, and ``suite_main_script.py`` is the batch job's script that the
``big_global`` measure runs as ``__main__``.

This directory is a package, run from the repository's root: ``python -m``
puts that directory first on ``sys.path``, every sample runs there as
``python -m benchmarks.suite_measures``, and every library's workers get the
path of the process that started them (forked, or passed to a spawn-started
or fork-server worker), so they import the tasks as
``benchmarks.suite_tasks``: a small module of their own (a spawn-started
worker of a peer imports that module and nothing of pool_manager).

The older scripts (``bench_*.py``) stand alone: ``python
benchmarks/bench_supervisor.py`` and so on.
"""
