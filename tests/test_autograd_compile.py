"""Autograd, torch.library.opcheck and torch.compile through the compiled operators (opcheck and
torch.compile on every device, see devices.py)."""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch

pytestmark = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")
ops = torch.ops.contrastmask


def _tiny(seed=0, n=3, c=4, dtype=torch.float64):
    b = blob_batch(n, 9, 11, c, seed=seed, dtype=dtype)
    labels, keys, keep = ops.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.5, 2, 1, seed)
    assert keep.any(), "the tiny batch must keep some ROI"
    return b, labels, keys, keep


@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_gradcheck_loss_from_keys(formulation, share_queries):
    b, labels, keys, keep = _tiny()
    z = b["z"].clone().requires_grad_(True)
    fn = lambda z: cm.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share_queries,
                                                 formulation=formulation)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_gradcheck_fused(formulation, share_queries):
    b, *_ = _tiny(seed=1)
    z = b["z"].clone().requires_grad_(True)
    fn = lambda z: cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], sigma=0.5, min_keys=1,
                                                     share_queries=share_queries, formulation=formulation, seed=4)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


def _opcheck_cases(device):
    b, labels, keys, keep = _tiny(dtype=torch.float32)
    b, labels, keys, keep = device.batch(b), device.to(labels), device.to(keys), device.to(keep)
    ops = device.ops
    sqdist = ops.boundary_sqdist(b["masks"])
    z = b["z"].clone().requires_grad_(True)
    loss, queries, pixstats, termstats = ops.contrastive_loss(z, labels, keys, keep, 0.7, 0.3, True, "paper")
    grad = device.to(torch.ones((), dtype=z.dtype))
    return {
        "partition": (b["masks"], b["cams"], b["is_novel"], None, 0.1),
        "boundary_sqdist": (b["masks"],),
        "sample_keys": (labels, sqdist, b["is_novel"], 0.3, 2, 1, 5),
        "roi_plan": (b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 1, 5),
        "contrastive_loss": (z, labels, keys, keep, 0.7, 0.3, True, "paper"),
        "contrastive_loss_backward": (grad, z.detach(), labels, keys, keep, queries.detach(), pixstats.detach(),
                                      termstats.detach(), 0.7, 0.3, True, "paper"),
    }


@pytest.mark.parametrize("name", ["partition", "boundary_sqdist", "sample_keys", "roi_plan", "contrastive_loss",
                                  "contrastive_loss_backward"])
def test_opcheck(device, name):
    torch.library.opcheck(getattr(device.ops, name).default, _opcheck_cases(device)[name])


def test_torch_compile_fullgraph_matches_eager(device):
    b = device.batch(blob_batch(8, 28, 28, 16, seed=3))

    def step(z, masks, cams, is_novel):
        return cm.query_sharing_contrastive_loss(z, masks, cams, is_novel, seed=123) * 2.0

    torch._dynamo.reset()  # a fresh compile on each device (the public API routes to its kernels)
    compiled = torch.compile(step, fullgraph=True)
    z1 = b["z"].clone().requires_grad_(True)
    z2 = b["z"].clone().requires_grad_(True)
    eager = step(z1, b["masks"], b["cams"], b["is_novel"])
    got = compiled(z2, b["masks"], b["cams"], b["is_novel"])
    assert torch.equal(eager, got)
    eager.backward()
    got.backward()
    assert torch.equal(z1.grad, z2.grad)


def test_stats_are_detached():
    b = blob_batch(8, 28, 28, 16, seed=3)
    z = b["z"].clone().requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=1,
                                                    return_stats=True)
    assert loss.requires_grad and not stats.q_pos.requires_grad
