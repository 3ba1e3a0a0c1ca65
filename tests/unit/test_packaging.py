"""The installed distribution holds one top-level package, ``din``, and nothing in the checkout imports the folders
it maps (``shared``, ``services``, ``zoo``, ``bench``) by their bare names, which only resolve from the checkout's
root and would shadow, or be shadowed by, any other distribution's package of that name."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAPPED = ("shared", "services", "zoo", "bench")
SOURCES = ("din", *MAPPED, "tests")


def bare_imports(path: Path) -> list[str]:
    """``import X`` / ``from X import`` of a mapped folder by its bare name in ``path``, as ``file:line name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(REPO)}:{node.lineno} {name}" for name in names
                  if name.split(".")[0] in MAPPED]
    return found


def test_nothing_imports_a_mapped_folder_by_its_bare_name():
    offending = [hit for folder in SOURCES for path in sorted((REPO / folder).rglob("*.py"))
                 for hit in bare_imports(path)]
    assert offending == []


def test_the_wheel_holds_only_the_din_package(tmp_path):
    source = tmp_path / "source"
    for name in (*MAPPED, "din"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    wheel = next(tmp_path.glob("din-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"din"}
    for module in ("din/shared/contracts/__init__.py", "din/services/executor/__main__.py", "din/zoo/build.py",
                   "din/bench/security.py"):
        assert module in names
