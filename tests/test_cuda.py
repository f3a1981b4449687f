"""The CUDA kernels against the CPU kernels on the same inputs (skipped without a CUDA device).

Integer outputs (labels, distances, key bits, keep) must be identical. Losses: relative 1e-5 in
float32 (the same sums in another order), 1e-10 in float64; gradients: max|g - g_cpu| <= 1e-4 *
max|g_cpu| in float32. float16/bfloat16 accumulate in float32 on both devices and differ only by the
final rounding to the input dtype. Two CUDA runs must agree bit for bit (no float atomics).
"""
import pytest
import torch

import contrastmask_ops as cm
from blobs import make_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not cm.build_info()["cuda"], reason="CUDA kernels not built"),
]

ops = torch.ops.contrastmask
CUDA = "cuda"

# (n, (h, w), seed): typical ROIs, odd shapes, and the H * W = 4096 limit in both orientations.
PLAN_CASES = [
    (1, (28, 28), 0),
    (7, (13, 21), 1),
    (64, (28, 28), 2),
    (5, (64, 64), 3),
    (3, (1, 4096), 4),
    (3, (4096, 1), 5),
]


def _plan_kwargs(seed):
    return dict(sigma=[0.3, 1.0, 0.05][seed % 3], hard_sqdist=[2, 0, 5][seed % 3], min_keys=[5, 0, 12][seed % 3])


def _random_valid(n, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(n, generator=g) > 0.2 if seed % 2 else None


def _cuda(t):
    return None if t is None else t.to(CUDA)


def _plan_on(device, b, valid, kw, seed):
    to = (lambda t: None if t is None else t.to(device))
    masks, cams, novel, valid = to(b["masks"]), to(b["cams"]), to(b["is_novel"]), to(valid)
    labels = ops.partition(masks, cams, novel, valid, 0.1)
    sqdist = ops.boundary_sqdist(masks)
    keys, keep = ops.sample_keys(labels, sqdist, novel, kw["sigma"], kw["hard_sqdist"], kw["min_keys"], seed)
    fused = ops.roi_plan(masks, cams, novel, valid, 0.1, kw["sigma"], kw["hard_sqdist"], kw["min_keys"], seed)
    return [t.cpu() for t in (labels, sqdist, keys, keep) + tuple(fused)]


@pytest.mark.parametrize("n,hw,seed", PLAN_CASES)
def test_plan_ops_match_cpu(n, hw, seed):
    b = make_batch(n, hw[0], hw[1], 1, seed=seed)
    valid = _random_valid(n, seed)
    kw = _plan_kwargs(seed)
    got = _plan_on(CUDA, b, valid, kw, seed)
    want = _plan_on("cpu", b, valid, kw, seed)
    for name, g, w in zip(["labels", "sqdist", "keys", "keep", "fused labels", "fused keys", "fused keep"], got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cam_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_plan_dtypes_match_cpu(mask_dtype, cam_dtype):
    b = make_batch(16, 13, 21, 1, seed=3)
    masks, cams = b["masks"].to(mask_dtype), b["cams"].to(cam_dtype)
    cams[0, 0, :4] = torch.tensor([0.9, 0.1, 0.5, 1.0]).to(cam_dtype)  # values on the thresholds
    novel = b["is_novel"].clone()
    novel[0] = True
    for delta in (0.1, 0.5):
        want = ops.roi_plan(masks, cams, novel, None, delta, 0.3, 2, 0, 11)
        got = ops.roi_plan(masks.to(CUDA), cams.to(CUDA), novel.to(CUDA), None, delta, 0.3, 2, 0, 11)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), delta
    assert torch.equal(ops.boundary_sqdist(masks.to(CUDA)).cpu(), ops.boundary_sqdist(masks))


def _loss_inputs(n, hw, c, dtype, seed, min_keys=3):
    b = make_batch(n, hw[0], hw[1], c, seed=seed, dtype=dtype)
    labels, keys, keep = ops.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, min_keys, seed)
    return b["z"], labels, keys, keep


def _loss_and_grad(z, labels, keys, keep, device, **kw):
    z = z.detach().to(device).clone().requires_grad_(True)
    loss = cm.contrastive_loss_from_keys(z, labels.to(device), keys.to(device), keep.to(device), **kw)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach().cpu(), g.cpu()


def _assert_grad_close(g, g_ref, rel, atol=1e-7):
    scale = g_ref.double().abs().max().item()
    err = (g.double() - g_ref.double()).abs().max().item()
    assert err <= rel * scale + atol, (err, scale)


def _loss_kwargs(formulation, share_queries):
    kw = dict(tau_easy=0.7, tau_hard=0.3, share_queries=share_queries, formulation=formulation)
    if formulation == "released":
        kw.update(tau_easy=0.3, tau_hard=0.7)
    return kw


LOSS_CASES = [
    (1, (28, 28), 16, 0),
    (7, (13, 21), 300, 1),   # more channels than one channel block
    (64, (28, 28), 64, 2),
    (4, (64, 64), 8, 3),     # H * W = 4096: several pixel blocks per ROI
    (3, (1, 4096), 8, 4),
]


@pytest.mark.parametrize("n,hw,c,seed", LOSS_CASES)
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_matches_cpu_float32(n, hw, c, seed, formulation, share_queries):
    z, labels, keys, keep = _loss_inputs(n, hw, c, torch.float32, seed)
    assert keep.any()
    kw = _loss_kwargs(formulation, share_queries)
    loss, g = _loss_and_grad(z, labels, keys, keep, CUDA, **kw)
    loss_cpu, g_cpu = _loss_and_grad(z, labels, keys, keep, "cpu", **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, loss_cpu, rtol=1e-5, atol=1e-7)
    _assert_grad_close(g, g_cpu, 1e-4)


@pytest.mark.parametrize("share_queries", [True, False])
def test_saved_statistics_match_cpu(share_queries):
    z, labels, keys, keep = _loss_inputs(7, (28, 28), 32, torch.float32, 6)
    kw = ("paper",)
    got = ops.contrastive_loss(z.to(CUDA), labels.to(CUDA), keys.to(CUDA), keep.to(CUDA), 0.7, 0.3, share_queries, *kw)
    want = ops.contrastive_loss(z, labels, keys, keep, 0.7, 0.3, share_queries, *kw)
    for name, g, w in zip(["loss", "queries", "pixstats", "termstats"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,loss_rtol,grad_rel", [
    (torch.float64, 1e-10, 1e-9), (torch.float16, 2e-3, 2e-2), (torch.bfloat16, 1.6e-2, 2e-2)])
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_matches_cpu_other_dtypes(dtype, loss_rtol, grad_rel, formulation, share_queries):
    z, labels, keys, keep = _loss_inputs(7, (28, 28), 32, dtype, 5)
    kw = _loss_kwargs(formulation, share_queries)
    loss, g = _loss_and_grad(z, labels, keys, keep, CUDA, **kw)
    loss_cpu, g_cpu = _loss_and_grad(z, labels, keys, keep, "cpu", **kw)
    assert loss.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_cpu.double(), rtol=loss_rtol, atol=0.0)
    _assert_grad_close(g, g_cpu, grad_rel, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("share_queries", [True, False])
def test_two_runs_are_bit_identical(dtype, share_queries):
    b = make_batch(64, 28, 28, 64, seed=7, dtype=dtype, device=CUDA)

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


@pytest.mark.parametrize("share_queries", [True, False])
def test_fused_loss_matches_cpu(share_queries):
    b = make_batch(32, 28, 28, 16, seed=8)
    kw = dict(seed=5, share_queries=share_queries, return_stats=True)
    z = b["z"].clone().requires_grad_(True)
    loss_cpu, stats_cpu = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], **kw)
    (g_cpu,) = torch.autograd.grad(loss_cpu, z)
    zc = b["z"].to(CUDA).requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(zc, _cuda(b["masks"]), _cuda(b["cams"]), _cuda(b["is_novel"]),
                                                    **kw)
    (g,) = torch.autograd.grad(loss, zc)
    assert int(stats.kept) == int(stats_cpu.kept) > 0
    assert torch.equal(stats.keys_per_set.cpu(), stats_cpu.keys_per_set)
    torch.testing.assert_close(loss.cpu(), loss_cpu.detach(), rtol=1e-5, atol=1e-7)
    _assert_grad_close(g.cpu(), g_cpu, 1e-4)


def test_loss_takes_no_host_sync():
    z, labels, keys, keep = (t.to(CUDA) for t in _loss_inputs(16, (28, 28), 32, torch.float32, 9))
    z.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for share_queries in (True, False):
            loss = cm.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share_queries)
            torch.autograd.grad(loss, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("share_queries", [True, False])
def test_empty_batch(share_queries):
    z = torch.randn(0, 8, 28, 28, device=CUDA, requires_grad=True)
    masks = torch.zeros(0, 28, 28, dtype=torch.bool, device=CUDA)
    novel = torch.zeros(0, dtype=torch.bool, device=CUDA)
    loss = cm.query_sharing_contrastive_loss(z, masks, None, novel, share_queries=share_queries)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0 and g.shape == z.shape
    # The saved statistics have the CPU's shapes and values (the empty group's log-sum-exp is -inf).
    out = ops.contrastive_loss(z.detach(), masks.to(torch.int8), masks.to(torch.uint8), novel, 0.7, 0.3,
                               share_queries, "paper")
    want = ops.contrastive_loss(z.detach().cpu(), masks.cpu().to(torch.int8), masks.cpu().to(torch.uint8),
                                novel.cpu(), 0.7, 0.3, share_queries, "paper")
    for g_, w_ in zip(out, want):
        assert g_.shape == w_.shape and torch.equal(g_.cpu(), w_)


@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_every_roi_dropped_gives_zero_loss_and_zero_grad(formulation):
    b = make_batch(6, 28, 28, 8, seed=0, device=CUDA)
    z = b["z"].requires_grad_(True)
    loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], min_keys=10**6,
                                             formulation=formulation)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


def test_bad_values_raise_and_the_device_stays_usable():
    b = make_batch(4, 13, 21, 4, seed=1, device=CUDA)
    masks = b["masks"].to(torch.float32)
    masks[2, 3, 4] = 0.5
    with pytest.raises(ValueError, match="masks"):
        cm.boundary_sqdist(masks)
    with pytest.raises(ValueError, match="masks"):
        cm.query_sharing_contrastive_loss(b["z"], masks, b["cams"], b["is_novel"])
    novel = torch.ones(4, dtype=torch.bool, device=CUDA)
    with pytest.raises(ValueError, match="cams"):
        cm.partition(b["masks"], None, novel)
    with pytest.raises(ValueError, match="cams"):
        cm.query_sharing_contrastive_loss(b["z"], b["masks"], None, novel)
    # No device assert fired: the context still runs kernels and the good input still works.
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
    assert torch.equal(labels.cpu(), cm.partition(b["masks"].cpu(), b["cams"].cpu(), b["is_novel"].cpu()))
    torch.cuda.synchronize()


def test_mixed_devices_are_rejected():
    b = make_batch(2, 13, 21, 4, seed=1)
    with pytest.raises(ValueError, match="is_novel"):
        ops.partition(b["masks"].to(CUDA), b["cams"].to(CUDA), b["is_novel"], None, 0.1)


def test_stats_take_no_host_sync():
    # LossStats masks with keep instead of indexing with it (contrastmask_ops.common.loss_stats).
    z, labels, keys, keep = (t.to(CUDA) for t in _loss_inputs(16, (28, 28), 32, torch.float32, 9))
    queries = ops.contrastive_loss(z, labels, keys, keep, 0.7, 0.3, False, "paper")[1]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for share_queries in (True, False):
            stats = cm.common.loss_stats(keys, keep, queries, share_queries)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(stats.kept) == int(keep.sum())


@pytest.mark.parametrize("impl", [cm, cm.reference], ids=["kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_computes_in_float32(impl, dtype):
    b = make_batch(6, 28, 28, 16, seed=5, device=CUDA)
    args = (b["masks"], b["cams"], b["is_novel"])
    z_low = b["z"].to(dtype).requires_grad_(True)
    z32 = b["z"].clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        got_low = impl.query_sharing_contrastive_loss(z_low, *args, seed=3)
        got32 = impl.query_sharing_contrastive_loss(z32, *args, seed=3)
    assert got_low.dtype == got32.dtype == torch.float32
    (g_low,) = torch.autograd.grad(got_low, z_low)
    assert g_low.dtype == dtype
    torch.testing.assert_close(got_low, impl.query_sharing_contrastive_loss(z_low.detach().float(), *args, seed=3),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(got32, impl.query_sharing_contrastive_loss(b["z"], *args, seed=3), rtol=1e-6, atol=0)
