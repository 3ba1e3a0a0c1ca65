"""Every snippet of the README runs as written, against the network its own ``din up --detach`` starts.

The snippets (fenced ``sh`` and ``python`` blocks) run in README order, except that the one starting the network
runs first, as a reader would; each must exit 0 and print no DIN error. They run from a folder laid out like the
checkout (``.venv``, ``.din`` and ``ops`` linked to this one's), with ``DIN_DIR`` pointing at this test's own
folder (so its runs, ``stack.json``, kept data and the model repository it adds to are its own, not the
checkout's ``.din``) and the default ports, as written. A block may be left out only with an HTML comment right
above it saying why (``<!-- not run by tests/integration/test_readme.py: ... -->``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from din.stack.brokers import REPO_ROOT
from din.stack.launcher import DIN_DIR_ENV

README = REPO_ROOT / "README.md"
NOT_RUN = "not run by tests/integration/test_readme.py:"
BLOCK = re.compile(r"(?:<!--(?P<note>[^>]*)-->\n)?^```(?P<lang>sh|python)\n(?P<code>.*?)^```$", re.S | re.M)
STARTS_THE_NETWORK = ".venv/bin/din up --detach"
ERROR_MARKS = ('"error":', "din: error", "Traceback (most recent call last)")
SNIPPET_TIMEOUT_S = 300


@dataclass(frozen=True)
class Snippet:
    """One fenced block of the README: its language, code, line and why it is not run (if it is not)."""

    lang: str
    code: str
    line: int
    not_run: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang})"


def readme_snippets(text: str) -> list[Snippet]:
    """The ``sh`` and ``python`` blocks of ``text``, in order."""
    found = []
    for match in BLOCK.finditer(text):
        note = (match.group("note") or "").strip()
        found.append(Snippet(match.group("lang"), match.group("code"), text.count("\n", 0, match.start("lang")) + 1,
                             note.removeprefix(NOT_RUN).strip() if note.startswith(NOT_RUN) else None))
    return found


def run_order(snippets: list[Snippet]) -> list[Snippet]:
    """The blocks to run: the one starting the network first, then the others in README order."""
    runnable = [s for s in snippets if s.not_run is None]
    starters = [s for s in runnable if STARTS_THE_NETWORK in s.code]
    return starters + [s for s in runnable if s not in starters]


def test_every_block_is_run_or_says_why_not():
    snippets = readme_snippets(README.read_text())
    assert len(snippets) >= 8
    assert [s.not_run for s in snippets if s.not_run is not None] == [
        "the main job (CI runs the test suite, which is the second)"]
    assert sum(STARTS_THE_NETWORK in s.code for s in run_order(snippets)) == 1
    assert run_order(snippets)[0].code.lstrip().startswith(STARTS_THE_NETWORK)


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A folder laid out like the checkout, its ``.din`` state elsewhere (``DIN_DIR``)."""
    where = tmp_path / "checkout"
    where.mkdir()
    for name in (".venv", ".din", "ops"):
        (where / name).symlink_to(REPO_ROOT / name)
    return where


@pytest.mark.integration
def test_every_readme_snippet_runs_as_written(checkout, tmp_path, zoo_dir):
    din_dir = tmp_path / "din"
    shutil.copytree(zoo_dir, din_dir / "models")
    env = {**os.environ, DIN_DIR_ENV: str(din_dir)}
    env.pop("NATS_URL", None)
    env.pop("NATS_CREDS", None)

    def run(snippet: Snippet) -> subprocess.CompletedProcess:
        if snippet.lang == "python":
            script = tmp_path / f"readme_{snippet.line}.py"
            script.write_text(snippet.code)
            argv = [str(REPO_ROOT / ".venv" / "bin" / "python"), str(script)]
        else:
            argv = ["bash", "-e", "-o", "pipefail", "-c", snippet.code]
        return subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=SNIPPET_TIMEOUT_S)

    try:
        for snippet in run_order(readme_snippets(README.read_text())):
            done = run(snippet)
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{snippet} exited {done.returncode}:\n{snippet.code}\n{output[-3000:]}"
            marks = [mark for mark in ERROR_MARKS if mark in output]
            assert not marks, f"{snippet} printed {marks}:\n{snippet.code}\n{output[-3000:]}"
    finally:
        subprocess.run([str(REPO_ROOT / ".venv" / "bin" / "din"), "down"], cwd=checkout, env=env,
                       capture_output=True, timeout=120)
