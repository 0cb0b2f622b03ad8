"""The command line: the demo (``python -m pool_manager demo``) runs, computes
the right answers, shows a pool expiring and one retiring, and leaves nothing
behind; it is the only command (the benchmark suite is ``python -m
benchmarks.suite``, tests/test_benchmarks.py)."""

from __future__ import annotations

import pytest

from pool_manager.__main__ import build_parser, main
from pool_manager.demo import run_demo, settings_for, split_range


def sieve_count(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by the sieve of Eratosthenes (independent of the demo's code)."""
    if hi <= 2:
        return 0
    is_prime = bytearray([1]) * hi
    is_prime[0:2] = b"\x00\x00"
    for n in range(2, int(hi**0.5) + 1):
        if is_prime[n]:
            is_prime[n * n :: n] = bytes(len(range(n * n, hi, n)))
    return sum(is_prime[max(lo, 0) :])


def test_sieve_count_itself() -> None:
    assert sieve_count(0, 10) == 4
    assert sieve_count(0, 100_000) == 9592
    assert sieve_count(10, 20) == 4  # 11 13 17 19


def test_split_range_covers_the_range() -> None:
    parts = split_range(1000, 1011, 4)
    assert parts[0][0] == 1000 and parts[-1][1] == 1011
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert split_range(0, 2, 5) == [(0, 1), (1, 2)]


def test_quick_demo(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    tqdm = pytest.importorskip("tqdm", reason="the progress extra (tqdm) is not installed")
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # (tqdm's thread outlives its bars)
    assert run_demo(quick=True, pool_size=2) == 0
    captured = capsys.readouterr()
    out = captured.out

    ranges = settings_for(quick=True).tenant_ranges
    assert len(ranges) >= 3
    for tenant, (lo, hi) in ranges.items():
        assert f"{tenant}: {sieve_count(lo, hi)} primes in [{lo}, {hi})" in out, out
    # The same count again, drawn with a progress bar (on stderr) named after its key.
    lo, hi = next(iter(ranges.values()))
    assert f"tenant-progress: {sieve_count(lo, hi)} primes in [{lo}, {hi})" in out, out
    chunks = settings_for(quick=True).chunks
    assert "tenant-progress" in captured.err and f"{chunks}/{chunks}" in captured.err

    # The manager's own log lines, and what the demo saw happen.
    assert "pool for key 'dormant' expired" in out, out
    assert "pool for key 'busy' retired" in out, out
    assert "busy: lease" in out and "got a NEW pool #2" in out, out
    assert "dormant: no longer in the manager" in out, out
    assert "PROBLEM" not in out, out
    assert "Demo finished" in out, out


def test_cli_parses_demo_options() -> None:
    args = build_parser().parse_args(["demo", "--quick", "--pool-size", "3"])
    assert (args.command, args.quick, args.pool_size) == ("demo", True, 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--pool-size", "0"])


def test_cli_has_no_bench_command(capsys: pytest.CaptureFixture[str]) -> None:
    # The benchmark suite left the package: python -m benchmarks.suite, from a checkout.
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
