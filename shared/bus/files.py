"""Writing secret files: created 0600 before any byte lands in them, and replaced whole."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (parents created), readable by its owner only. The file is written beside
    ``path`` and renamed over it, so a process reading it meanwhile (a client reconnecting with its credentials
    file) sees the old contents or the new, never a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
