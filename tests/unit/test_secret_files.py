import os
import threading

from shared.bus.files import write_secret


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
