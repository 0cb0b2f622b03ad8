"""Errors that say what to do: a pool its manager ended says which key's pool
it was, why it went, and what to do instead; a worker's failed initializer
is logged once; a remote traceback names the script's file and line.

Expiry, retirement and memory pressure are driven by a fake clock and
``manager.sweep()``; the tracebacks, by scripts run in an interpreter of
their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pool_manager import (
    BaseWorkerPool,
    PoolShutDownError,
    WorkerPool,
    WorkerPoolBrokenError,
    WorkerPoolManager,
    memory,
)

from .doubles import ThreadWorkerPool
from .helpers import (
    FakeClock,
    poll,
    raise_value_error,
    raise_while_exists,
    square,
    wait_then_square,
)

STALE = 600.0
LIFETIME = 3600.0
PLAIN = "cannot schedule new futures after shutdown"
ROOT = Path(__file__).resolve().parent.parent  # (scripts import this checkout)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["fork_server", "loky"])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    return str(request.param)


@pytest.fixture
def manager(clock: FakeClock, engine: str) -> Iterator[WorkerPoolManager]:
    with WorkerPoolManager(
        2, STALE, LIFETIME, clock=clock, memory_sample_interval=None, engine=engine
    ) as manager:
        yield manager


def new_pool(engine: str, max_size: int, **options: Any) -> WorkerPool:
    """A standalone pool on ``engine``."""
    if engine == "loky":
        from pool_manager.loky import LokyWorkerPool

        return LokyWorkerPool(max_size, **options)
    return BaseWorkerPool(max_size, **options)


def refusals(pool: WorkerPool) -> list[BaseException]:
    """What each way of handing the pool work raises: submit, map, run."""
    calls: list[Callable[[], object]] = [
        lambda: pool.submit(square, 3),
        lambda: pool.submit(square, threading.Lock()),  # (cannot be pickled)
        lambda: list(pool.map(square, [1, 2])),
        lambda: asyncio.run(pool.run(square, 3)),
    ]
    if isinstance(pool, BaseWorkerPool):
        calls.append(lambda: pool.submit_with_timeout(5, square, 3))
    raised = []
    for call in calls:
        with pytest.raises(PoolShutDownError) as caught:
            call()
        raised.append(caught.value)
    return raised


def assert_says(pool: WorkerPool, *parts: str) -> str:
    """Every entry point raises a `PoolShutDownError` (a ``RuntimeError``) whose
    message has each of ``parts``; returns the message."""
    messages = set()
    for error in refusals(pool):
        assert isinstance(error, RuntimeError)
        messages.add(str(error))
    (message,) = messages
    for part in parts:
        assert part in message, (part, message)
    return message


@pytest.mark.timeout(120)
def test_an_expired_pool_names_its_key_the_reason_and_the_remedy(
    manager: WorkerPoolManager, clock: FakeClock
) -> None:
    with manager.lease("tenant-a") as pool:
        assert pool.submit(square, 2).result(timeout=60) == 4
    clock.advance(STALE)
    assert manager.sweep().expired == ["tenant-a"]
    assert pool.is_shut_down
    message = assert_says(
        pool,
        "the pool of key 'tenant-a' expired (unused for 600 s, stale_pool_expiration)",
        "disposed by its manager",
        "take a new lease (manager.get_pool('tenant-a')) rather than keeping the pool",
    )
    assert PLAIN not in message


@pytest.mark.timeout(120)
def test_a_retired_pool_says_it_was_retired(manager: WorkerPoolManager, clock: FakeClock) -> None:
    pool, done = manager.get_pool(("tenant", 7))
    clock.advance(LIFETIME)
    assert manager.sweep().retired == [("tenant", 7)]
    # Retired but leased: it still takes work until its lease is released.
    assert pool.submit(square, 5).result(timeout=60) == 25
    done()
    manager.sweep()
    assert pool.is_shut_down
    assert_says(
        pool,
        "the pool of key ('tenant', 7) was retired (older than max_pool_lifetime, 3600 s)",
        "manager.get_pool(('tenant', 7))",
    )


@pytest.mark.timeout(120)
def test_a_pool_disposed_for_memory_says_so(
    engine: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "available_memory", lambda: 100_000_000)
    with WorkerPoolManager(
        1,
        STALE,
        LIFETIME,
        clock=clock,
        engine=engine,
        memory_sample_interval=5,
        min_available_memory="1GB",
    ) as manager:
        with manager.lease("big") as pool:
            assert pool.submit(square, 2).result(timeout=60) == 4
        clock.advance(5)  # the next sample is due
        manager.sweep()
        # (The supervisor may be the one that sampled.)
        assert poll(lambda: pool.is_shut_down and "big" not in manager, timeout=60)
        assert_says(
            pool,
            "the pool of key 'big' was disposed by its manager to free memory",
            "100 MB available, below min_available_memory=1000 MB",
            "manager.get_pool('big')",
        )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["shutdown", "terminate", "shutdown_within"])
def test_a_pool_whose_manager_ended_says_to_use_a_new_manager(engine: str, how: str) -> None:
    manager = WorkerPoolManager(2, STALE, LIFETIME, memory_sample_interval=None, engine=engine)
    try:
        leased, _ = manager.get_pool("leased")  # (shut down with its manager all the same)
        with manager.lease("idle") as idle:
            assert idle.submit(square, 2).result(timeout=60) == 4
    finally:
        if how == "shutdown_within":
            manager.shutdown_within(5)
        else:
            getattr(manager, how)()
    word = "terminated" if how == "terminate" else "shut down"
    for key, pool in (("leased", leased), ("idle", idle)):
        assert_says(
            pool,
            f"the pool of key {key!r} was disposed because its manager was {word}",
            "create a new WorkerPoolManager",
        )


@pytest.mark.timeout(120)
def test_a_pool_shut_down_by_its_user_keeps_the_plain_message(
    engine: str, clock: FakeClock
) -> None:
    events: list[tuple[str, object]] = []
    with WorkerPoolManager(
        2,
        STALE,
        LIFETIME,
        clock=clock,
        memory_sample_interval=None,
        engine=engine,
        on_event=lambda event: events.append((event.kind, event.key)),
    ) as manager:
        with manager.lease("mine") as pool:
            pool.shutdown()
        assert {str(error) for error in refusals(pool)} == {PLAIN}
        # A fresh pool takes its key; the manager disposes of the old one (and
        # tells it why): it still says what its user's shutdown said.
        with manager.lease("mine") as fresh:
            assert fresh is not pool
        manager.sweep()
        assert poll(lambda: ("pool_disposed", "mine") in events, timeout=60)
        assert {str(error) for error in refusals(pool)} == {PLAIN}
        clock.advance(STALE)
        manager.sweep()
        assert "the pool of key 'mine' expired" in str(refusals(fresh)[0])


def test_a_standalone_pool_keeps_the_plain_message(engine: str) -> None:
    with new_pool(engine, 1) as pool:
        pass
    assert {str(error) for error in refusals(pool)} == {PLAIN}


@pytest.mark.timeout(120)
def test_a_blocked_submit_hears_why_its_pool_ended(
    engine: str, tmp_path: Any, clock: FakeClock
) -> None:
    gate = tmp_path / "gate"
    manager = WorkerPoolManager(
        1, STALE, LIFETIME, max_pending=0, clock=clock, memory_sample_interval=None, engine=engine
    )
    try:
        pool, done = manager.get_pool("full")
        running = pool.submit(wait_then_square, str(gate), 3)
        blocked: list[BaseException] = []

        def submit() -> None:
            try:
                pool.submit(square, 2)
            except BaseException as error:
                blocked.append(error)

        thread = threading.Thread(target=submit)
        thread.start()
        assert poll(lambda: pool._blocked_submits == 1, timeout=30)  # type: ignore[attr-defined]
        # (The gate opens only once the blocked submit has been refused: a
        # task finishing first would make room for it.)
        manager.shutdown(wait=False)
        thread.join(60)
        gate.touch()  # (the shutdown lets the running task finish)
        done()
        assert running.result(timeout=60) == 9
    finally:
        gate.touch()
        manager.shutdown()
    (error,) = blocked
    assert isinstance(error, PoolShutDownError)
    assert re.search(r"key 'full' was disposed because its manager was shut down", str(error))


def test_a_custom_pool_without_the_hook_is_disposed_as_before(clock: FakeClock) -> None:
    with WorkerPoolManager(2, STALE, LIFETIME, clock=clock, memory_sample_interval=None) as manager:
        with manager.lease("custom", factory=ThreadWorkerPool) as pool:
            assert pool.submit(square, 3).result(timeout=60) == 9
        clock.advance(STALE)
        assert manager.sweep().expired == ["custom"]
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        pool.submit(square, 3)


# -- a failing initializer: its traceback logged once -----------------------------


def logged_failures(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pool_manager" and text in r.getMessage()]


@pytest.mark.timeout(120)
def test_a_failing_initializer_is_logged_once_and_not_by_each_worker(
    engine: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.ERROR, logger="pool_manager")
    with new_pool(engine, 2, initializer=raise_value_error, initargs=("no model here",)) as pool:
        pool.name = "tenant-a"
        errors = []
        for _ in range(2):  # (two rounds: each tries MAX_ATTEMPTS workers)
            futures = [pool.submit(square, i) for i in range(3)]
            for future in futures:
                with pytest.raises(WorkerPoolBrokenError) as caught:
                    future.result(timeout=60)
                errors.append(str(caught.value))
        # (Logged off the thread that fails the tasks: poll for it.)
        assert poll(lambda: logged_failures(caplog, "no model here"), timeout=30)
    # (Several workers failed, each of which once printed the traceback.)
    counts = [re.search(r"failed in (\d+) (loky )?worker processes in a row", e) for e in errors]
    assert all(count is not None and int(count[1]) >= 3 for count in counts)
    (record,) = logged_failures(caplog, "no model here")
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    assert message.startswith("the pool 'tenant-a': in a worker process, the pool's initializer")
    # The same traceback the tasks' error holds.
    traceback = message[message.index("Traceback (most recent call last):") :]
    assert traceback.endswith("ValueError: no model here")
    assert all(traceback in error for error in errors)
    assert "no model here" not in capfd.readouterr().err  # (the workers print nothing)


@pytest.mark.timeout(120)
def test_an_initializer_failing_again_after_a_worker_got_ready_is_logged_again(
    engine: str, caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="pool_manager")
    switch = tmp_path / "broken"
    switch.touch()
    options: dict[str, Any] = {"initializer": raise_while_exists, "initargs": (str(switch),)}
    # (A worker per task: each task starts one, and runs its initializer.)
    with new_pool(engine, 1, max_tasks_per_worker=1, **options) as pool:
        with pytest.raises(WorkerPoolBrokenError):
            pool.submit(square, 1).result(timeout=60)
        with pytest.raises(WorkerPoolBrokenError):
            pool.submit(square, 2).result(timeout=60)  # (the same run of failures)
        assert poll(lambda: logged_failures(caplog, "no model while"), timeout=30)
        switch.unlink()
        assert pool.submit(square, 3).result(timeout=60) == 9  # a worker got ready
        switch.touch()
        with pytest.raises(WorkerPoolBrokenError):
            pool.submit(square, 4).result(timeout=60)
        assert poll(lambda: len(logged_failures(caplog, "no model while")) == 2, timeout=30)
    assert len(logged_failures(caplog, "no model while")) == 2


# -- remote tracebacks name the script's file and line ----------------------------

SCRIPT = """\
import sys
from pool_manager import BaseWorkerPool
from pool_manager.loky import LokyWorkerPool

COUNT = []


def bad(x):
    return 1 / x  # the failing line


def count(_):
    COUNT.append(1)
    return len(COUNT)


def nested():
    def inner(x):
        return 1 / x  # the nested failing line
    return inner


def init_fails():
    raise ValueError("no model for this worker")


if __name__ == "__main__":
    engine = sys.argv[1]

    def make(**options):
        if engine == "fork_server":
            return BaseWorkerPool(1, **options)
        return LokyWorkerPool(1, context=engine, **options)

    with make() as pool:
        for name, fn in (("function", bad), ("lambda", lambda x: 1 / x), ("nested", nested())):
            try:
                pool.submit(fn, 0).result(timeout=60)
            except ZeroDivisionError as error:
                print(f"== {name}\\n{error.__cause__}")
        try:
            list(pool.map(bad, [1, 0], chunksize=2))
        except ZeroDivisionError as error:
            print(f"== map\\n{error.__cause__}")
        print("== counts", [pool.submit(count, 0).result(timeout=60) for _ in range(3)])
    with make(initializer=init_fails) as pool:
        try:
            pool.submit(count, 0).result(timeout=60)
        except Exception as error:
            print(f"== initializer\\n{error}")
"""


def run_python(args: list[str], cwd: Path) -> str:
    done = subprocess.run(
        ["timeout", "150", sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=160,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def sections(output: str) -> dict[str, str]:
    """The script's output by its ``== name`` headers."""
    found = {}
    for part in output.split("== ")[1:]:
        name, _, text = part.partition("\n")
        found[name.split()[0]] = part if name.startswith("counts") else text
    return found


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["fork_server", "loky", "loky_init_main"])
def test_a_remote_traceback_names_the_scripts_file_line_and_source(
    engine: str, tmp_path: Path
) -> None:
    if engine != "fork_server":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    lines = SCRIPT.splitlines()

    def at(text: str) -> str:
        return f'File "{script}", line {lines.index(text) + 1}'

    output = run_python([str(script), engine], tmp_path)
    assert "<dynamic-code>" not in output
    found = sections(output)
    for name in ("function", "map"):
        assert f"{at('    return 1 / x  # the failing line')}, in bad" in found[name]
        assert "return 1 / x  # the failing line" in found[name]  # (its source line)
    lambda_line = next(line for line in lines if "lambda x: 1 / x" in line)
    assert f"{at(lambda_line)}, in <lambda>" in found["lambda"]
    nested_line = "        return 1 / x  # the nested failing line"
    assert f"{at(nested_line)}, in inner" in found["nested"]
    assert "return 1 / x  # the nested failing line" in found["nested"]
    raise_line = '    raise ValueError("no model for this worker")'
    assert f"{at(raise_line)}, in init_fails" in found["initializer"]
    # The script's functions go by reference where the workers imported the
    # script: the module's state lives on between a worker's tasks (by value,
    # each task has its own copy of the globals).
    by_reference = engine != "loky"  # ("loky" starts workers that import no main module)
    counts = found["counts"].split(" ", 1)[1].strip()
    assert counts == ("[1, 2, 3]" if by_reference else "[1, 1, 1]")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["fork_server", "loky"])
def test_code_from_python_c_keeps_its_pseudo_file_name(engine: str, tmp_path: Path) -> None:
    if engine == "loky":
        pytest.importorskip("loky", reason="the loky extra is not installed")
    program = textwrap.dedent(
        f"""\
        from pool_manager import BaseWorkerPool
        from pool_manager.loky import LokyWorkerPool
        pool = (BaseWorkerPool if {engine!r} == "fork_server" else LokyWorkerPool)(1)
        with pool:
            try:
                pool.submit(lambda x: 1 / x, 0).result(timeout=60)
            except ZeroDivisionError as error:
                print(error.__cause__)
        """
    )
    output = run_python(["-c", program], tmp_path)
    assert 'File "<string>", line 6, in <lambda>' in output
    assert "<dynamic-code>" not in output
