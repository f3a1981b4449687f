"""Fixtures of the pytest-benchmark suite (benchmarks/test_*.py): every available device."""
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def compiled(device):
    """Skip unless contrastmask_ops has compiled kernels for this device (else 'fused' would time the fallback)."""
    import contrastmask_ops

    if not contrastmask_ops.build_info()[device.type]:
        pytest.skip(f"contrastmask_ops has no compiled {device.type} kernels")
