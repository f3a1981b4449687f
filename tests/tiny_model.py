"""Shared set-up of the tests that train the reference model on tiny shapes data (model/configs/tiny.json).
Test modules import the fixtures by name, which makes pytest use them there."""
import os

import pytest
import torch

from model.config import load_config
from model.data.build import prepare_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "model", "configs", "tiny.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread buys little, and on a shared machine it costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    prepare_data(load_config(TINY, [f"data.root={root}"])["data"])
    return root


def tiny_config(data_root, out_dir, *overrides):
    return load_config(TINY, [f"data.root={data_root}", f"output_dir={out_dir}", *overrides])
