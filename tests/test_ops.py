"""The compiled CPU operators against contrastmask_ops.reference (the pure-PyTorch oracle).

Tolerances: integer outputs (labels, distances, key bits, keep) must be identical. Losses: relative
1e-5 in float32, 1e-10 in float64. Gradients: max|g - g_ref| <= 1e-4 * max|g_ref| in float32 (the same
sums taken in another order); with C = 1 the exact gradient is 0 and both must be within 1e-3 of it. float16/bfloat16 inputs accumulate in float32 in both
implementations: loss relative 1e-4 and gradients 2e-2 of max|g_ref| (one rounding to the input dtype).
"""
import itertools

import pytest
import torch

import contrastmask_ops as cm
from contrastmask_ops import reference as ref
from blobs import blob_batch
from cases import assert_grad_close, loss_and_grad, loss_kwargs, plan_kwargs, random_valid

pytestmark = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")

SHAPES = [(28, 28), (14, 14), (13, 21)]
PLAN_CASES = list(itertools.product([0, 1, 7, 64], SHAPES, [0, 1, 2]))


@pytest.mark.parametrize("n,hw,seed", PLAN_CASES)
def test_plan_ops_match_reference(n, hw, seed):
    b = blob_batch(n, hw[0], hw[1], 1, seed=seed)
    valid = random_valid(n, seed)
    kw = plan_kwargs(seed)
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"], valid=valid)
    assert labels.dtype == torch.int8
    assert torch.equal(labels, ref.partition(b["masks"], b["cams"], b["is_novel"], valid=valid))
    sqdist = cm.boundary_sqdist(b["masks"])
    assert sqdist.dtype == torch.int32
    assert torch.equal(sqdist, ref.boundary_sqdist(b["masks"]))
    keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    keys_ref, keep_ref = ref.sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    assert torch.equal(keep, keep_ref)
    assert torch.equal(keys, keys_ref)
    # The fused plan gives the same as the three steps.
    f_labels, f_keys, f_keep = torch.ops.contrastmask.roi_plan(
        b["masks"], b["cams"], b["is_novel"], valid, 0.1, kw["sigma"], kw["hard_sqdist"], kw["min_keys"], seed)
    assert torch.equal(f_labels, labels) and torch.equal(f_keys, keys) and torch.equal(f_keep, keep)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("cam_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_partition_dtypes_match_reference(mask_dtype, cam_dtype):
    b = blob_batch(16, 13, 21, 1, seed=3)
    masks, cams = b["masks"].to(mask_dtype), b["cams"].to(cam_dtype)
    # Put CAM values exactly on the thresholds, where rounding decides.
    cams[0, 0, :4] = torch.tensor([0.9, 0.1, 0.5, 1.0]).to(cam_dtype)
    for delta in (0.1, 0.25, 0.5):
        got = cm.partition(masks, cams, b["is_novel"], delta=delta)
        assert torch.equal(got, ref.partition(masks, cams, b["is_novel"], delta=delta)), delta


@pytest.mark.parametrize("seed", range(4))
def test_sample_counts_are_exact(seed):
    b = blob_batch(32, 28, 28, 1, seed=seed)
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
    sqdist = cm.boundary_sqdist(b["masks"])
    keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], sigma=0.3, min_keys=0, seed=seed)
    cand = ref.candidate_sets(labels, sqdist, b["is_novel"], 2)  # (N, 4, H*W) bool
    import math
    for n in range(32):
        for s in range(4):
            picked = ((keys[n].flatten() >> s) & 1).bool()
            c = int(cand[n, s].sum())
            expected = min(c, math.ceil(0.3 * c)) if keep[n] else 0
            assert int(picked.sum()) == expected
            assert not (picked & ~cand[n, s]).any()


def _loss_inputs(n, hw, c, dtype, seed):
    b = blob_batch(n, hw[0], hw[1], c, seed=seed, dtype=dtype)
    labels, keys, keep = torch.ops.contrastmask.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2,
                                                         3, seed)
    return b["z"], labels, keys, keep


LOSS_CASES = [
    # (n, hw, c, seed)
    (1, (28, 28), 16, 0),
    (7, (13, 21), 1, 1),
    (7, (14, 14), 256, 2),
    (64, (28, 28), 16, 3),
    (64, (13, 21), 256, 4),
]


@pytest.mark.parametrize("n,hw,c,seed", LOSS_CASES)
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_matches_reference_float32(n, hw, c, seed, formulation, share_queries):
    z, labels, keys, keep = _loss_inputs(n, hw, c, torch.float32, seed)
    kw = loss_kwargs(formulation, share_queries)
    loss, g = loss_and_grad(cm.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    loss_ref, g_ref = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    if c == 1:
        # Every cosine of 1-vectors is +-1: the exact gradient is 0, and both sides hold only rounding
        # noise (amplified by 1/|z - q| in "released"), so compare each with 0 instead.
        assert g.abs().max() <= 1e-3 and g_ref.abs().max() <= 1e-3
    else:
        assert_grad_close(g, g_ref, 1e-4)


@pytest.mark.parametrize("dtype,loss_rtol,grad_rel", [
    (torch.float64, 1e-10, 1e-9), (torch.float16, 1e-4, 2e-2), (torch.bfloat16, 1e-4, 2e-2)])
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_loss_matches_reference_other_dtypes(dtype, loss_rtol, grad_rel, formulation):
    z, labels, keys, keep = _loss_inputs(7, (28, 28), 32, dtype, 5)
    kw = dict(formulation=formulation)
    loss, g = loss_and_grad(cm.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    loss_ref, g_ref = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    assert loss.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_ref.double(), rtol=loss_rtol, atol=1e-6)
    assert_grad_close(g, g_ref, grad_rel)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("share_queries", [True, False])
def test_fused_pipeline_matches_reference(seed, share_queries):
    b = blob_batch(24, 28, 28, 64, seed=seed)
    args = (b["masks"], b["cams"], b["is_novel"])
    kw = dict(share_queries=share_queries, seed=seed, return_stats=True)
    z = b["z"].clone().requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(z, *args, **kw)
    (g,) = torch.autograd.grad(loss, z)
    z_ref = b["z"].clone().requires_grad_(True)
    loss_ref, stats_ref = ref.query_sharing_contrastive_loss(z_ref, *args, **kw)
    (g_ref,) = torch.autograd.grad(loss_ref, z_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7)
    assert_grad_close(g, g_ref, 1e-4)
    assert int(stats.kept) == int(stats_ref.kept) > 0
    assert torch.equal(stats.keys_per_set, stats_ref.keys_per_set)
    torch.testing.assert_close(stats.q_pos.float(), stats_ref.q_pos.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.q_neg.float(), stats_ref.q_neg.float(), rtol=1e-5, atol=1e-6)


def test_same_seed_same_result_and_threads_do_not_matter():
    b = blob_batch(32, 28, 28, 32, seed=7)
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


def test_module_wrapper_matches_function():
    b = blob_batch(8, 28, 28, 16, seed=2)
    crit = cm.QuerySharingContrastiveLoss(sigma=0.5, tau_easy=0.5, share_queries=False)
    got = crit(b["z"], b["masks"], b["cams"], b["is_novel"], seed=3)
    want = cm.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], sigma=0.5, tau_easy=0.5,
                                             share_queries=False, seed=3)
    assert torch.equal(got, want)
    assert "sigma=0.5" in repr(crit)


def test_kernel_sampler_is_uniform_over_seeds():
    # Every candidate of a set should be picked about equally often across seeds (chi-square).
    from scipy.stats import chisquare

    b = blob_batch(8, 28, 28, 1, seed=11)
    novel = torch.zeros(8, dtype=torch.bool)
    labels = cm.partition(b["masks"], None, novel)
    sqdist = cm.boundary_sqdist(b["masks"])
    cand = ref.candidate_sets(labels, sqdist, novel, 2)
    n = int(cm.sample_keys(labels, sqdist, novel, min_keys=5, seed=0)[1].nonzero()[0])
    seeds = 800
    hits = torch.zeros(4, 28 * 28)
    for seed in range(seeds):
        keys, keep = cm.sample_keys(labels, sqdist, novel, sigma=0.3, min_keys=5, seed=seed)
        assert keep[n]  # keep does not depend on the seed
        hits += ((keys[n].flatten() >> torch.arange(4)[:, None]) & 1).float()
    for s in range(4):
        observed = hits[s][cand[n, s]].numpy()
        assert len(observed) >= 5 and observed.sum() > 0
        assert chisquare(observed).pvalue > 1e-4, s
