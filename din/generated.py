"""Files DIN generates and keeps in the repository (schemas, compose): write them, or tell which drifted."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def stale_files(root: Path, folder: str, pattern: str, files: dict[str, str]) -> list[str]:
    """Relative paths under ``root/folder`` matching ``pattern`` that a fresh render no longer produces."""
    return [
        p.relative_to(root).as_posix()
        for p in sorted((root / folder).glob(pattern))
        if p.relative_to(root).as_posix() not in files
    ]


def write_files(root: Path, files: dict[str, str], stale: list[str]) -> list[Path]:
    """Write ``files`` (relative path → text) under ``root`` and remove ``stale``; return the paths written."""
    for rel in stale:
        (root / rel).unlink()
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def drifted_files(root: Path, files: dict[str, str], stale: list[str]) -> list[str]:
    """Relative paths whose content under ``root`` differs from ``files``, plus missing and ``stale`` ones."""
    changed = [rel for rel, text in files.items() if not (root / rel).is_file() or (root / rel).read_text() != text]
    return sorted(changed + stale)


def check_or_write(check: bool, what: str, drifted: Callable[[], list[str]], write: Callable[[], list[Path]],
                   *, current: str, command: str) -> int:
    """A ``din <command> [--check]`` run: with ``check``, report the files of ``what`` that drifted (exit 1) or
    say ``current``; else write them and say which."""
    if check:
        stale = drifted()
        if stale:
            print(f"din: {len(stale)} {what} out of date: {', '.join(stale)}", file=sys.stderr)
            print(f"run `din {command}` and commit the result", file=sys.stderr)
            return 1
        print(current)
        return 0
    written = write()
    print(f"wrote {len(written)} files: {', '.join(p.name for p in written)}")
    return 0
