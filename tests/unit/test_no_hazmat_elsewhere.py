"""Only ``shared/envelope.py`` may touch ``cryptography.hazmat`` (CONVENTIONS §7), and ``shared/bus/tls.py``, which
issues X.509 certificates for the brokers (key generation and PEM encoding live under hazmat; it seals nothing)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("shared", "services", "din")
ALLOWED = {"shared/envelope.py", "shared/bus/tls.py"}
_HAZMAT_MODULE = re.compile(r"^cryptography\.hazmat(\.|$)")


def hazmat_users(source: str) -> bool:
    """True if ``source`` imports ``cryptography.hazmat`` in any spelling we can see."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(_HAZMAT_MODULE.match(alias.name) for alias in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _HAZMAT_MODULE.match(node.module):
                return True
            if node.module == "cryptography" and any(alias.name == "hazmat" for alias in node.names):
                return True
        elif isinstance(node, ast.Call):
            # import_module("cryptography.hazmat..."), __import__("cryptography", fromlist=["hazmat"])
            strings = {
                sub.value
                for sub in ast.walk(node)
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str)
            }
            if any(_HAZMAT_MODULE.match(s) for s in strings) or {"cryptography", "hazmat"} <= strings:
                return True
    return False


def _python_files() -> list[Path]:
    return sorted(p for top in SCANNED if (REPO / top).is_dir() for p in (REPO / top).rglob("*.py"))


def test_only_envelope_imports_hazmat() -> None:
    files = _python_files()
    users = {p.relative_to(REPO).as_posix() for p in files if hazmat_users(p.read_text(encoding="utf-8"))}
    stray = users - ALLOWED
    assert stray == set(), f"only shared/envelope.py may import cryptography.hazmat, not {sorted(stray)}"
    # The scan must see the one allowed user, or it is looking in the wrong place.
    assert users == ALLOWED


def test_scanner_sees_every_spelling() -> None:
    spellings = [
        "import cryptography.hazmat.primitives",
        "import cryptography.hazmat as h",
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM",
        "from cryptography import hazmat",
        "def f():\n    from cryptography.hazmat.primitives import hashes\n",
        "import importlib\nimportlib.import_module('cryptography.hazmat.primitives')",
        "m = __import__('cryptography', fromlist=['hazmat'])",
    ]
    for source in spellings:
        assert hazmat_users(source), source
    harmless = [
        "import cryptography",
        "from cryptography.fernet import Fernet",
        "x = 'hazmat suit'",
        '"""No module but shared.envelope imports cryptography.hazmat."""',
        "# import cryptography.hazmat is not allowed here",
    ]
    for source in harmless:
        assert not hazmat_users(source), source
