import os
import threading

import pytest

from din.shared.bus.files import write_secret
from din.shared.bus.nats_auth import creds_text, read_creds


def test_a_secret_file_is_private_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "keys" / "user.creds"
    write_secret(path, "first\n")
    write_secret(path, "second\n")
    assert path.read_text() == "second\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(path.parent) == ["user.creds"]


def test_a_reader_never_sees_a_rewritten_secret_truncated(tmp_path):
    """Credentials reissued while a client reconnects: every read is one whole version."""
    path = tmp_path / "user.creds"
    versions = {f"version {n}\n" * 200 for n in range(2)}
    write_secret(path, sorted(versions)[0])
    seen: set[str] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(300):
            write_secret(path, sorted(versions)[n % 2])
    finally:
        stop.set()
        reader.join()
    assert seen <= versions


def test_a_creds_file_whose_jwt_holds_a_run_of_dashes_still_reads(tmp_path):
    """A JWT is base64url: about one in 500 holds ``---``, which once made the file unreadable."""
    token = "eyJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJuYW1lIjoiZXhlY3V0b3ItY2xvdWQtMiJ9---x.c2ln-_"
    seed = b"SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4"
    path = tmp_path / "u.creds"
    write_secret(path, creds_text(token, seed))
    assert read_creds(path) == (token, seed.decode())


def test_a_file_without_both_blocks_is_not_creds(tmp_path):
    path = tmp_path / "u.creds"
    path.write_text("-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n")
    with pytest.raises(ValueError, match="not a NATS credentials file"):
        read_creds(path)
