"""Regression-tracking benchmarks of the operators on small shapes: `pytest benchmarks --benchmark-only`.

Speed targets are judged by `python -m benchmarks.run`, never here; these tests record timings
(compare runs with `--benchmark-autosave` / `--benchmark-compare`) and check that each call works.
"""
import pytest
import torch

from .implementations import make
from .inputs import KEY_SEED, make_batch

N, C = 32, 64  # small enough that the whole suite runs in seconds on a 2-core CPU


def synchronized(fn, device):
    """fn followed by a device sync, so a CUDA benchmark times the work and not its launch."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def fwd_bwd(forward, z):
    def run():
        z.grad = None
        loss = forward()
        loss.backward()
        return loss
    return run


@pytest.mark.benchmark(group="plan ops")
@pytest.mark.parametrize("op", ["partition", "boundary_sqdist", "sample_keys", "roi_plan"])
def test_plan_op(benchmark, device, compiled, op):
    import contrastmask_ops as cm

    batch = make_batch(N, C, device=device)
    labels = cm.partition(batch.masks, batch.cams, batch.is_novel)
    sqdist = cm.boundary_sqdist(batch.masks)
    calls = {
        "partition": lambda: cm.partition(batch.masks, batch.cams, batch.is_novel),
        "boundary_sqdist": lambda: cm.boundary_sqdist(batch.masks),
        "sample_keys": lambda: cm.sample_keys(labels, sqdist, batch.is_novel, seed=KEY_SEED),
        "roi_plan": lambda: torch.ops.contrastmask.roi_plan(batch.masks, batch.cams, batch.is_novel, None, 0.1, 0.3,
                                                            2, 5, KEY_SEED),
    }
    out = benchmark(synchronized(calls[op], device))
    first = out[0] if isinstance(out, tuple) else out
    assert first.shape == batch.masks.shape


@pytest.mark.benchmark(group="loss fwd+bwd from a plan")
@pytest.mark.parametrize("impl_name", ["fused", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_fwd_bwd(benchmark, request, device, impl_name, dtype):
    if impl_name == "fused":
        request.getfixturevalue("compiled")
    batch = make_batch(N, C, dtype=dtype, device=device)
    impl = make(impl_name)
    plan = impl.plan(batch)
    loss = benchmark(synchronized(fwd_bwd(lambda: impl.loss(batch.z, plan), batch.z), device))
    assert torch.isfinite(loss) and torch.isfinite(batch.z.grad).all()


@pytest.mark.benchmark(group="pipeline fwd+bwd")
@pytest.mark.parametrize("impl_name", ["fused", "reference", "per_roi"])
def test_pipeline_fwd_bwd(benchmark, request, device, impl_name):
    if impl_name == "fused":
        request.getfixturevalue("compiled")
    batch = make_batch(N, C, device=device)
    impl = make(impl_name)
    loss = benchmark(synchronized(fwd_bwd(lambda: impl.pipeline(batch.z, batch), batch.z), device))
    assert torch.isfinite(loss) and torch.isfinite(batch.z.grad).all()
