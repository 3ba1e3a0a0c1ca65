"""Shared fixtures for the unit tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model zoo, built once per test session."""
    from din.zoo import build_zoo

    out_dir = tmp_path_factory.mktemp("zoo")
    build_zoo(out_dir)
    return out_dir
