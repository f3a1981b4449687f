"""The tiny config (model/configs/tiny.json) of the tests that train the reference model, and the paths they
share. Their fixtures (one_thread, data_root) are in conftest.py."""
import os

from model.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "model", "configs", "tiny.json")


def load_tiny(*overrides):
    return load_config(TINY_CONFIG, list(overrides))


def tiny_config(data_root, out_dir, *overrides):
    return load_tiny(f"data.root={data_root}", f"output_dir={out_dir}", *overrides)
