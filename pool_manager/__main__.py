"""The command line: ``python -m pool_manager <command>``.

Commands:

* ``demo``: run `pool_manager.demo.run_demo` (what ``make demo`` runs).
* ``bench``: run the benchmark suite, `pool_manager.bench` (what ``make
  bench`` runs); its options are the suite's own (``bench --help``).

Each command is a subparser plus a handler in `_COMMANDS`.
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


def _run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` command: the suite parses its own options."""
    from .bench import main as bench_main

    return bench_main(args.suite_args)


#: command name -> handler; the handler returns the exit status.
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _run_demo,
    "bench": _run_bench,
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
    bench = commands.add_parser(
        "bench",
        add_help=False,  # --help goes to the suite, which lists its own options
        help="run the benchmark suite against the peers installed (bench --help for options)",
        description="Run the benchmark suite (pool_manager.bench).",
    )
    bench.add_argument("suite_args", nargs=argparse.REMAINDER, metavar="SUITE OPTIONS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; its exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":
        # Everything after "bench" is the suite's (argparse leaves options
        # that come first, --help say, out of the REMAINDER).
        args.suite_args = [*unknown, *args.suite_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
