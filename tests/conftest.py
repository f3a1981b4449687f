import os
import sys

import pytest
import torch

# tests/ holds shared helpers (blobs.py); make them importable as plain modules.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
