import os
import tempfile
import zlib

# torch.compile's on-disk caches default to one folder under /tmp that outlives a build: an entry traced
# with an older fake kernel would replay its output shapes. Each test session gets a fresh one (set
# before torch is imported; spawned test processes inherit it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="contrastmask-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import devices  # noqa: E402

# tests/ is on sys.path through pytest's `pythonpath` setting (pyproject.toml), so shared helpers
# (blobs.py, cases.py, devices.py, cuda_emu.py) import as plain modules.


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=devices.all_devices())
def device(request, monkeypatch):
    """The device a test's ops run on: cpu, cuda-emu under each fiber order, cuda (see devices.py).
    On cuda-emu the public API is routed to torch.ops.contrastmask_emu for the test, and the random
    order's seed is derived from the test id (reproducible, different per test)."""
    d = request.param
    devices.activate(d, monkeypatch)
    if d.kind == "cuda-emu" and d.order == "rand":
        import cuda_emu
        cuda_emu.set_order("rand", zlib.crc32(request.node.nodeid.encode()) ^ cuda_emu.env_seed())
    return d


# Fixtures of the tests that train the reference model (test_model_*.py, test_ablate.py, ...). A module whose
# every test trains one asks for one_thread in `pytestmark = pytest.mark.usefixtures("one_thread")`. The model
# is imported inside the fixtures: the operator tests run without torchvision and pycocotools.

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
