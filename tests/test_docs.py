"""The documentation's examples run: every ``docs/*.md`` guide's doctests, and
the README's Python programs.

Guides: each ``>>>`` example of each file in ``docs/`` runs as a doctest
(``ELLIPSIS | NORMALIZE_WHITESPACE``), with real worker processes, one test per
file, so a guide added later is picked up without touching this file. A
guide whose examples need an optional package names it on a line of its own,
``<!-- requires: tqdm -->``, and is skipped where it is not installed; one
marked ``<!-- run: in a process of its own -->`` runs in a fresh interpreter
(``python -m doctest``). The
examples shut down what they start; if one fails half-way, the managers and
pools it left in its namespace are terminated here, so that a failure is
reported as itself and not as a leak.

README: every ```` ```python ```` block is a complete program and runs in a
fresh interpreter, unless the line before its opening fence is
``<!-- not run: why -->`` (for a fragment, or code that needs an extra).
"""

from __future__ import annotations

import doctest
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pool_manager import WorkerPool, WorkerPoolManager

ROOT = Path(__file__).resolve().parent.parent
GUIDES = sorted((ROOT / "docs").glob("*.md"))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

_REQUIRES = re.compile(r"^<!--\s*requires:\s*(.+?)\s*-->\s*$", re.MULTILINE)
#: A guide whose examples start threads that live as long as their process
#: (Dask's) runs in an interpreter of its own.
_OWN_PROCESS = "<!-- run: in a process of its own -->"
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NOT_RUN = re.compile(r"<!--\s*not run\b.*-->\s*$")


def _clean_up(globs: dict[str, Any]) -> None:
    """Stop whatever an example that failed half-way left running."""
    for value in list(globs.values()):
        if isinstance(value, (WorkerPoolManager, WorkerPool)):
            value.terminate()
    globs.clear()


@pytest.mark.parametrize("path", GUIDES, ids=[path.name for path in GUIDES])
def test_guide_examples_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = path.read_text(encoding="utf-8")
    for requirement in _REQUIRES.findall(text):
        for module in requirement.replace(",", " ").split():
            pytest.importorskip(module)
    if _OWN_PROCESS in text:
        flags = ["-o", "ELLIPSIS", "-o", "NORMALIZE_WHITESPACE"]
        done = subprocess.run(
            [sys.executable, "-m", "doctest", *flags, str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return
    if "tqdm" in sys.modules:
        # tqdm's monitor thread outlives the bars (it is tqdm's, for the
        # process): the leak check would count it, so it is not started.
        monkeypatch.setattr(sys.modules["tqdm"].tqdm, "monitor_interval", 0)
    globs = {"__name__": "__main__"}
    test = doctest.DocTestParser().get_doctest(text, globs, path.name, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    try:
        runner.run(test, out=report.write, clear_globs=False)
    finally:
        _clean_up(test.globs)  # (the test's own copy of globs)
    assert runner.failures == 0, report.getvalue()
    if path.name != "README.md":  # the index has no examples
        assert runner.tries > 0, f"{path.name} has no examples"


def _readme_programs() -> list[tuple[int, str]]:
    """(line number, code) of each README python block that is a program to run."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    programs = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if _NOT_RUN.search(before):
            continue
        programs.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return programs


README_PROGRAMS = _readme_programs()


def test_the_readme_has_programs_to_run() -> None:
    assert README_PROGRAMS


@pytest.mark.parametrize(
    "code", [code for _, code in README_PROGRAMS], ids=[f"line{n}" for n, _ in README_PROGRAMS]
)
def test_readme_program_runs(code: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
