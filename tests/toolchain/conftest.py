"""Fixtures of the build and toolchain tests: `repo`, the repository root whose build files they read or run."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def repo() -> Path:
    return Path(__file__).resolve().parents[2]
