"""The command line: ``python -m pool_manager <command>``.

Commands:

* ``demo``: run `pool_manager.demo.run_demo` (what ``make demo`` runs).

Each command is a subparser plus a handler in `_COMMANDS`. (The benchmark
suite is not part of the package: it is ``python -m benchmarks.suite`` in a
checkout of the project, what ``make bench`` runs.)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    """The ``demo`` command."""
    from .demo import run_demo  # imported here so that --help stays fast

    return run_demo(quick=args.quick, pool_size=args.pool_size)


#: command name -> handler; the handler returns the exit status.
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _run_demo,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m pool_manager",
        description="Keyed, lazily built, self-expiring process pools (pool_manager).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="run a multi-tenant CPU-bound batch, then show pools expiring and retiring",
        description=(
            "Count primes for several tenants at once through one WorkerPoolManager, "
            "print the results and the manager's stats, then show (in real time, a few "
            "seconds) an idle pool expiring and a busy pool being retired and rebuilt. "
            "Every worker process is stopped before it exits; the exit status is 0 "
            "if everything happened as described."
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smaller batch and shorter durations (about 3 s in all instead of about 6 s)",
    )
    demo.add_argument(
        "--pool-size",
        type=_positive_int,
        default=2,
        metavar="N",
        help="the most worker processes per tenant's pool (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
