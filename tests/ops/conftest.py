"""Fixtures of the op tests: `device`, the device a test's ops run on (devices.py)."""
import zlib

import pytest

import devices


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
