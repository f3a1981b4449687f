"""Fixtures of the tests that train the reference model. A module whose every test trains one asks for
one_thread in `pytestmark = pytest.mark.usefixtures("one_thread")`. The model is imported inside the fixtures
and tiny_model.py: the operator tests run without torchvision and pycocotools."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """These models are tiny: a second thread buys little, and on a shared machine it costs a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The tiny config's shapes data, generated once per module."""
    from model.data.build import prepare_data
    from tiny_model import load_tiny

    root = str(tmp_path_factory.mktemp("shapes"))
    prepare_data(load_tiny(f"data.root={root}")["data"])
    return root
