"""The fused pipeline (query_sharing_contrastive_loss: roi_plan, then the loss) and its module
(QuerySharingContrastiveLoss), on every device (devices.py) and on both paths (the reference and the kernels:
IMPLS); the reference's composition of the building blocks. Two runs on one device must agree bit for bit (no
float atomics)."""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import CPU_OPS, IMPLS, assert_grad_close, baseline_loss_fn, fused_loss_and_grad, loss_kwargs, needs_kernels
from contrastmask_ops import reference as ref


@needs_kernels
@pytest.mark.parametrize("n,c,batch_seed,seed", [(32, 16, 8, 5), (24, 64, 0, 0), (24, 64, 1, 1)])
@pytest.mark.parametrize("share_queries", [True, False])
def test_fused_loss_matches_the_baseline(device, n, c, batch_seed, seed, share_queries):
    b = blob_batch(n, 28, 28, c, seed=batch_seed)
    kw = dict(seed=seed, share_queries=share_queries)
    zb = b["z"].clone().requires_grad_(True)
    if device.kind == "cpu":
        loss_base, stats_base = ref.query_sharing_contrastive_loss(zb, b["masks"], b["cams"], b["is_novel"],
                                                                   return_stats=True, **kw)
        kept_base, per_set_base = stats_base.kept, stats_base.keys_per_set
    else:
        labels, keys, keep = CPU_OPS.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, seed)
        loss_base = baseline_loss_fn(device)(zb, labels, keys, keep, **loss_kwargs("paper", share_queries))
        kept_base = keep.sum()
        per_set_base = ((keys[keep].unsqueeze(-1) >> torch.arange(4, dtype=torch.uint8)) & 1).reshape(-1, 4).sum(0)
    (g_base,) = torch.autograd.grad(loss_base, zb)
    d = device.batch(b)
    z = d["z"].clone().requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(z, d["masks"], d["cams"], d["is_novel"], return_stats=True, **kw)
    (g,) = torch.autograd.grad(loss, z)
    assert int(stats.kept) == int(kept_base) > 0
    assert torch.equal(stats.keys_per_set.cpu(), per_set_base)
    torch.testing.assert_close(loss.cpu(), loss_base.detach(), rtol=1e-5, atol=1e-7)
    assert_grad_close(g.cpu(), g_base, 1e-4)
    if device.kind == "cpu":  # the reference's queries
        torch.testing.assert_close(stats.q_pos.float(), stats_base.q_pos.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.q_neg.float(), stats_base.q_neg.float(), rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("share_queries", [True, False])
def test_two_runs_are_bit_identical(device, dtype, share_queries):
    b = device.batch(blob_batch(64, 28, 28, 64, seed=7, dtype=dtype))

    def run():
        z = b["z"].clone().requires_grad_(True)
        loss, stats = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=123,
                                                        share_queries=share_queries, return_stats=True)
        (g,) = torch.autograd.grad(loss, z)
        return loss, g, stats.q_pos, stats.keys_per_set

    first, second = run(), run()
    assert first[0].item() != 0.0
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@needs_kernels
def test_seed_decides_and_threads_do_not(device):
    b = device.batch(blob_batch(32, 28, 28, 32, seed=7))
    args = (b["z"], b["masks"], b["cams"], b["is_novel"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cm.query_sharing_contrastive_loss(*args, seed=11)
        torch.set_num_threads(max(2, threads))
        two = cm.query_sharing_contrastive_loss(*args, seed=11)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # bit-identical: reductions run in ROI order
    assert not torch.equal(one, cm.query_sharing_contrastive_loss(*args, seed=12))


@needs_kernels
def test_module_matches_the_function(device):
    b = device.batch(blob_batch(8, 28, 28, 16, seed=2))
    crit = cm.QuerySharingContrastiveLoss(sigma=0.5, tau_easy=0.5, share_queries=False)
    got = crit(b["z"], b["masks"], b["cams"], b["is_novel"], seed=3)
    want = cm.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], sigma=0.5, tau_easy=0.5,
                                             share_queries=False, seed=3)
    assert torch.equal(got, want)
    assert "sigma=0.5" in repr(crit)


@needs_kernels
@pytest.mark.parametrize("share_queries", [True, False])
def test_empty_batch(device, share_queries):
    z = device.to(torch.randn(0, 8, 28, 28)).requires_grad_(True)
    masks = device.to(torch.zeros(0, 28, 28, dtype=torch.bool))
    novel = device.to(torch.zeros(0, dtype=torch.bool))
    loss = cm.query_sharing_contrastive_loss(z, masks, None, novel, share_queries=share_queries)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and g.shape == z.shape
    # The saved statistics have the CPU's shapes and values (the empty group's log-sum-exp is -inf).
    out = device.ops.contrastive_loss(z.detach(), masks.to(torch.int8), masks.to(torch.uint8), novel, 0.7, 0.3,
                                      share_queries, "paper")
    want = CPU_OPS.contrastive_loss(z.detach().cpu(), masks.cpu().to(torch.int8), masks.cpu().to(torch.uint8),
                                    novel.cpu(), 0.7, 0.3, share_queries, "paper")
    for g_, w_ in zip(out, want):
        assert g_.shape == w_.shape and torch.equal(g_.cpu(), w_)


@needs_kernels
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_all_dropped_gives_zero_loss_and_grad(device, formulation):
    b = device.batch(blob_batch(6, 28, 28, 8, seed=0))
    z = b["z"].requires_grad_(True)
    loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], min_keys=10**6,
                                             formulation=formulation)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


# ---------------------------------------------------------------- both paths (reference, kernels)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("share_queries", [True, False])
def test_empty_batch_on_both_paths(impl, share_queries):
    z = torch.randn(0, 8, 28, 28)
    masks = torch.zeros(0, 28, 28, dtype=torch.bool)
    loss, g = fused_loss_and_grad(impl, z, masks, None, torch.zeros(0, dtype=torch.bool), share_queries=share_queries)
    assert loss.item() == 0.0 and g.shape == z.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_all_dropped_is_zero_on_both_paths(impl, formulation):
    b = blob_batch(6, 28, 28, 8, seed=0)
    loss, g = fused_loss_and_grad(impl, b["z"], b["masks"], b["cams"], b["is_novel"], min_keys=10**6,
                             formulation=formulation)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("share", [True, False])
def test_pipeline_composes_blocks_and_stats(share):
    batch = blob_batch(12, 14, 10, 8, seed=17)
    batch["valid"] = torch.ones(12, dtype=torch.bool)
    batch["valid"][3] = False
    args = (batch["z"], batch["masks"], batch["cams"], batch["is_novel"])
    loss, stats = ref.query_sharing_contrastive_loss(*args, valid=batch["valid"], seed=99, share_queries=share,
                                                     return_stats=True)
    labels = ref.partition(batch["masks"], batch["cams"], batch["is_novel"], valid=batch["valid"])
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(batch["masks"]), batch["is_novel"], seed=99)
    assert not keep[3]
    want = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    assert loss.item() == want.item()
    assert stats.kept.dtype == torch.int64 and stats.kept.item() == int(keep.sum())
    per_set = [int(((keys[keep] >> s) & 1).sum()) for s in range(4)]
    assert stats.keys_per_set.tolist() == per_set
    fg = (labels == 1).flatten(1) & keep[:, None]
    mu = torch.einsum("ncp,np->nc", batch["z"].flatten(2), fg.float()) / fg.sum(1, keepdim=True).clamp_min(1)
    if share:
        assert stats.q_pos.shape == (8,)
        has = fg.any(1)
        torch.testing.assert_close(stats.q_pos, mu[has].mean(0))
    else:
        assert stats.q_pos.shape == (12, 8) and (stats.q_neg[~keep] == 0).all()
        torch.testing.assert_close(stats.q_pos, mu)
    assert not stats.q_pos.requires_grad
    assert ref.query_sharing_contrastive_loss(*args, seed=99).dtype == torch.float32


def test_pipeline_defaults_match_spec():
    batch = blob_batch(6, 10, 10, 4, seed=3)
    args = (batch["z"], batch["masks"], batch["cams"], batch["is_novel"])
    a = ref.query_sharing_contrastive_loss(*args, seed=1)
    b = ref.query_sharing_contrastive_loss(*args, seed=1, delta=0.1, sigma=0.3, tau_easy=0.7, tau_hard=0.3,
                                           hard_sqdist=2, min_keys=5, share_queries=True, formulation="paper")
    assert a.item() == b.item()


def test_empty_partitions_are_not_errors():
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    z = torch.randn(2, 3, 5, 5, requires_grad=True)
    loss = ref.query_sharing_contrastive_loss(z, masks, None, torch.zeros(2, dtype=torch.bool), seed=0)
    loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all()


def test_torch_func_grad_matches_autograd():
    # torch.func's transforms wrap every tensor made inside them (no storage for the sampler's numpy hash)
    b = blob_batch(4, 12, 12, 6, seed=1, dtype=torch.float64)

    def loss(z):
        return ref.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=3, min_keys=1)

    z = b["z"].clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(loss(z), z, create_graph=True)
    (ddz,) = torch.autograd.grad(dz.pow(2).sum(), z)
    torch.testing.assert_close(torch.func.grad(loss)(b["z"]), dz.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.grad(lambda z: torch.func.grad(loss)(z).pow(2).sum())(b["z"]), ddz,
                               rtol=1e-10, atol=1e-14)
