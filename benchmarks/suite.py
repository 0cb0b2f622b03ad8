"""The benchmark suite: the same as ``python -m pool_manager bench`` (see pool_manager/bench/)."""

import sys

from pool_manager.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
