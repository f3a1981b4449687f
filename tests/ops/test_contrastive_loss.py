"""The loss from a plan (contrastive_loss_from_keys, torch.ops.contrastmask.contrastive_loss and its backward) on
every device (devices.py), and the reference against a naive per-ROI loop of SPEC.md's formulas.

What each device is compared with (the baseline): on cuda-emu and cuda, the CPU kernels on the same inputs; on
cpu, the pure-PyTorch reference. Losses: relative 1e-5 in float32 (the same sums in another order), 1e-10 in
float64; gradients: max|g - g_base| <= 1e-4 * max|g_base| in float32. float16/bfloat16 accumulate in float32 on
every device and differ only by the final rounding to the input dtype. Numerics at the ends of the range:
test_loss_numerics.py; the fused pipeline: test_query_sharing_loss.py."""
import math
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import (CPU_OPS, assert_grad_close, baseline_loss_fn, cpu_loss_inputs, device_loss_and_grad,
                   loss_and_grad, loss_kwargs, needs_kernels, reference_plan)
from contrastmask_ops import reference as ref, torch_loss
from contrastmask_ops.stats import loss_stats


LOSS_CASES = [
    (1, (28, 28), 16, 0),
    (7, (13, 21), 300, 1),   # more channels than one channel block
    (64, (28, 28), 64, 2),
    (4, (64, 64), 8, 3),     # H * W = 4096: several pixel blocks per ROI
    (3, (1, 4096), 8, 4),
    (5, (13, 21), 1, 7),     # one channel
    (7, (13, 21), 1, 1),     # one channel; "released" noise below 1e-3 on the CPU
    (7, (14, 14), 256, 2),
]


@needs_kernels
@pytest.mark.parametrize("n,hw,c,seed", LOSS_CASES)
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_float32(device, n, hw, c, seed, formulation, share_queries):
    z, labels, keys, keep = cpu_loss_inputs(n, hw, c, torch.float32, seed)
    assert keep.any()
    kw = loss_kwargs(formulation, share_queries)
    loss, g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
    loss_base, g_base = loss_and_grad(baseline_loss_fn(device), z, labels, keys, keep, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, loss_base, rtol=1e-5, atol=1e-7)
    if c == 1:
        # Every cosine of 1-vectors is +-1: the exact gradient is 0 and every implementation holds only
        # rounding noise, so compare with 0 instead. In "released" the noise is amplified by 1/|z - q|
        # (|z - q| reaches 5e-5 here, the noise 0.06 to 0.2), so only finiteness is checked.
        assert torch.isfinite(g).all()
        if formulation == "paper" or (device.kind == "cpu" and seed == 1):
            assert g.abs().max() <= 1e-3 and g_base.abs().max() <= 1e-3
    else:
        assert_grad_close(g, g_base, 1e-4)


# (dtype, loss rtol, loss atol, gradient rel): against the CPU kernels (cuda, cuda-emu) and against the
# reference (cpu).
OTHER_DTYPES = {
    "kernels": [(torch.float64, 1e-10, 0.0, 1e-9), (torch.float16, 2e-3, 0.0, 2e-2),
                (torch.bfloat16, 1.6e-2, 0.0, 2e-2)],
    "reference": [(torch.float64, 1e-10, 1e-6, 1e-9), (torch.float16, 1e-4, 1e-6, 2e-2),
                  (torch.bfloat16, 1e-4, 1e-6, 2e-2)],
}


@needs_kernels
@pytest.mark.parametrize("dtype_index,dtype_name", [(0, "float64"), (1, "float16"), (2, "bfloat16")])
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_other_dtypes(device, dtype_index, dtype_name, formulation, share_queries):
    dtype, loss_rtol, loss_atol, grad_rel = OTHER_DTYPES["reference" if device.kind == "cpu" else "kernels"][
        dtype_index]
    z, labels, keys, keep = cpu_loss_inputs(7, (28, 28), 32, dtype, 5)
    variants = [loss_kwargs(formulation, share_queries)]
    if device.kind == "cpu" and share_queries:
        variants.append(dict(formulation=formulation))  # the default temperatures too
    for kw in variants:
        loss, g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
        loss_base, g_base = loss_and_grad(baseline_loss_fn(device), z, labels, keys, keep, **kw)
        assert loss.dtype == dtype and g.dtype == dtype
        torch.testing.assert_close(loss.double(), loss_base.double(), rtol=loss_rtol, atol=loss_atol)
        assert_grad_close(g, g_base, grad_rel, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("share_queries", [True, False])
def test_saved_statistics(device, share_queries):
    if device.kind == "cpu":
        pytest.skip("compares the CUDA kernels' saved statistics with the CPU kernels' (the reference has none)")
    z, labels, keys, keep = cpu_loss_inputs(7, (28, 28), 32, torch.float32, 6)
    args = (0.7, 0.3, share_queries, "paper")
    got = device.ops.contrastive_loss(device.to(z), device.to(labels), device.to(keys), device.to(keep), *args)
    want = CPU_OPS.contrastive_loss(z, labels, keys, keep, *args)
    for name, g, w in zip(["loss", "queries", "pixstats", "termstats"], got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-5, msg=name)


@needs_kernels
@pytest.mark.parametrize("share_queries", [True, False])
def test_backward_checks_the_saved_statistics(device, share_queries):
    # Statistics that do not belong to this z must be refused before any kernel reads them (the kernels
    # would read out of bounds: non-finite dz, or a SIGSEGV at N = 512, 64 x 64).
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(6, (14, 21), 8, torch.float32, 3))
    args = (0.7, 0.3, share_queries, "paper")
    _, queries, pixstats, termstats = device.ops.contrastive_loss(z, labels, keys, keep, *args)
    grad = device.to(torch.ones(()))
    bad = {
        "pixstats": (queries, pixstats[:, :, :5], termstats),
        "queries": (queries[..., :3], pixstats, termstats),
        "termstats": (queries, pixstats, termstats.double()),
    }
    for name, saved in bad.items():
        with pytest.raises(ValueError) as info:
            device.ops.contrastive_loss_backward(grad, z, labels, keys, keep, *saved, *args)
        assert str(info.value).startswith(name), str(info.value)
    for bad_grad in (torch.ones(2), torch.ones(1), torch.ones((), dtype=torch.int64), torch.ones((), device="meta")):
        # a meta grad with real z would be read as garbage (the loss scaled by uninitialised memory)
        with pytest.raises(ValueError, match="^grad"):
            device.ops.contrastive_loss_backward(bad_grad if bad_grad.is_meta else device.to(bad_grad), z, labels,
                                                 keys, keep, queries, pixstats, termstats, *args)
    # Statistics of a smaller batch than z (the case that crashed): refused, and the good call still works.
    _, q2, p2, t2 = device.ops.contrastive_loss(z[:2], labels[:2], keys[:2], keep[:2], *args)
    with pytest.raises(ValueError, match="^(queries|pixstats)"):
        device.ops.contrastive_loss_backward(grad, z, labels, keys, keep, q2, p2, t2, *args)
    dz = device.ops.contrastive_loss_backward(grad, z, labels, keys, keep, queries, pixstats, termstats, *args)
    assert torch.isfinite(dz).all()


@needs_kernels
@pytest.mark.parametrize("share_queries", [True, False])
def test_caller_made_keep(device, share_queries):
    # keep from the caller: a kept ROI with an empty foreground, one with an empty background, and a
    # dropped ROI whose keys are set (DESIGN, "Queries for kept ROIs with an empty partition" and "Keys of
    # dropped ROIs are ignored").
    z, labels, keys, keep = cpu_loss_inputs(6, (13, 21), 16, torch.float32, 11)
    labels, keys, keep = labels.clone(), keys.clone(), keep.clone()
    labels[0][labels[0] == 1] = 0
    labels[1][labels[1] == 0] = -1
    keep[:2] = True
    keep[2] = False
    keys[2] = 15
    kw = loss_kwargs("paper", share_queries)
    loss, g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
    loss_base, g_base = loss_and_grad(baseline_loss_fn(device), z, labels, keys, keep, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, loss_base, rtol=1e-5, atol=1e-7)
    assert_grad_close(g, g_base, 1e-4)
    assert torch.count_nonzero(g[2]) == 0


@needs_kernels
def test_nan_pixels(device):
    z, labels, keys, keep = cpu_loss_inputs(6, (28, 28), 8, torch.float32, 1, min_keys=0)
    n = int(keep.nonzero()[0])
    # A NaN in a pixel that is a key (or enters a query) makes the loss NaN (DESIGN, "NaN") ...
    y, x = [int(v) for v in ((labels[n] == 1) & (keys[n] != 0)).nonzero()[0]]
    z_nan = z.clone()
    z_nan[n, 0, y, x] = float("nan")
    loss, _ = device_loss_and_grad(device, z_nan, labels, keys, keep)
    assert torch.isnan(loss)
    # ... and one in an ignored, non-key pixel changes nothing.
    labels, keys = labels.clone(), keys.clone()
    labels[n, y, x] = -1
    keys[n, y, x] = 0
    loss_ok, g_ok = device_loss_and_grad(device, z, labels, keys, keep)
    loss, g = device_loss_and_grad(device, z_nan, labels, keys, keep)
    assert torch.isfinite(loss) and torch.equal(loss, loss_ok)
    assert torch.equal(g, g_ok)


@needs_kernels
@pytest.mark.parametrize("layout", ["sliced", "channels_last"])
def test_non_contiguous_z(device, layout):
    z, labels, keys, keep = cpu_loss_inputs(5, (13, 21), 12, torch.float32, 2)
    if layout == "sliced":
        z_nc = torch.cat([z, torch.randn_like(z)], dim=1)[:, ::2]  # every other channel of a bigger tensor
        z = z_nc.contiguous()
    else:
        z_nc = z.to(memory_format=torch.channels_last)
    assert not z_nc.is_contiguous()
    kw = loss_kwargs("paper", True)
    for share_queries in (True, False):
        kw["share_queries"] = share_queries
        zd = device.to(z_nc).detach().requires_grad_(True)
        assert not zd.is_contiguous()
        loss = cm.contrastive_loss_from_keys(zd, device.to(labels), device.to(keys), device.to(keep), **kw)
        (g,) = torch.autograd.grad(loss, zd)
        loss_c, g_c = device_loss_and_grad(device, z, labels, keys, keep, **kw)
        assert torch.equal(loss.cpu(), loss_c)
        assert torch.equal(g.cpu(), g_c)


@needs_kernels
def test_many_rois(device):
    # Enough ROIs for several chunks of the two-level reductions over ROIs (shared queries).
    z, labels, keys, keep = cpu_loss_inputs(300, (4, 6), 3, torch.float32, 9, min_keys=1)
    assert int(keep.sum()) > 100
    for share_queries in (True, False):
        kw = loss_kwargs("paper", share_queries)
        loss, g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
        again, g_again = device_loss_and_grad(device, z, labels, keys, keep, **kw)
        assert torch.equal(loss, again) and torch.equal(g, g_again)
        loss_base, g_base = loss_and_grad(baseline_loss_fn(device), z, labels, keys, keep, **kw)
        torch.testing.assert_close(loss, loss_base, rtol=1e-5, atol=1e-7)
        assert_grad_close(g, g_base, 1e-4)


# ---------------------------------------------------------------- the reference against a naive loop


def naive_cos(q, x):
    return (x @ q) / (torch.clamp_min(q.norm(), 1e-8) * torch.clamp_min(x.norm(dim=1), 1e-8))


def naive_term(q, pos, neg, t, formulation):
    """T(q, P, G, t) of SPEC step 6; pos, neg are (k, C) tensors of key features."""
    if pos.shape[0] == 0:
        return q.new_zeros(())
    if formulation == "released":
        pos, neg = pos - q, neg - q
    s_pos, s_neg = naive_cos(q, pos), naive_cos(q, neg)
    own = s_pos / t if formulation == "paper" else s_pos
    total = q.new_zeros(())
    for j in range(pos.shape[0]):
        total = total + torch.log(torch.exp(own[j]) + torch.exp(s_neg / t).sum()) - s_pos[j] / t
    return total / pos.shape[0]


def naive_loss(z, labels, keys, keep, *, tau_easy=0.7, tau_hard=0.3, share_queries=True, formulation="paper"):
    z = z.double()
    n, c = z.shape[:2]
    feats = z.reshape(n, c, -1).transpose(1, 2)  # (N, P, C)
    lab = labels.reshape(n, -1)
    kb = keys.reshape(n, -1)
    kept = [i for i in range(n) if keep[i]]
    mus = {}
    sets = {}
    for i in kept:
        for side, value in ((0, 1), (1, 0)):
            part = feats[i][lab[i] == value]
            mus[i, side] = part.mean(dim=0) if part.shape[0] else None
        for s in range(4):
            sets[i, s] = feats[i][((kb[i] >> s) & 1) == 1]
    terms = [(0, 0, 2, tau_easy), (0, 1, 3, tau_hard), (1, 2, 0, tau_easy), (1, 3, 1, tau_hard)]

    def four_terms(q, key_sets):
        return sum(naive_term(q[side], key_sets[p], key_sets[g], t, formulation) for side, p, g, t in terms)

    if share_queries:
        q = []
        for side in (0, 1):
            present = [mus[i, side] for i in kept if mus[i, side] is not None]
            q.append(torch.stack(present).mean(dim=0) if present else z.new_zeros(c))
        pooled = [torch.cat([sets[i, s] for i in kept] + [z.new_zeros(0, c)]) for s in range(4)]
        return four_terms(q, pooled)
    if not kept:
        return z.new_zeros(())
    total = z.new_zeros(())
    for i in kept:
        q = [mus[i, side] if mus[i, side] is not None else z.new_zeros(c) for side in (0, 1)]
        total = total + four_terms(q, [sets[i, s] for s in range(4)])
    return total / len(kept)


def sampled(n, h, w, c, seed, dtype=torch.float64, min_keys=1, sigma=0.3):
    batch = blob_batch(n, h, w, c, seed=seed, dtype=dtype)
    labels, sqdist = reference_plan(batch)
    keys, keep = ref.sample_keys(labels, sqdist, batch["is_novel"], sigma=sigma, min_keys=min_keys, seed=seed)
    return batch, labels, keys, keep


PARAMS = [("paper", True, 0.7, 0.3), ("paper", False, 0.7, 0.3), ("released", True, 0.3, 0.7),
          ("released", False, 0.3, 0.7), ("paper", True, 0.05, 2.0)]


@pytest.mark.parametrize("formulation,share,tau_easy,tau_hard", PARAMS)
def test_loss_matches_naive_loop(formulation, share, tau_easy, tau_hard):
    batch, labels, keys, keep = sampled(7, 9, 11, 6, seed=21)
    assert keep.sum() >= 3
    kw = dict(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share, formulation=formulation)
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys, keep, **kw)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_caller_made_keys_and_keep(formulation, share):
    # DESIGN's decisions "Queries for kept ROIs with an empty partition", "Keys of dropped ROIs", "A pixel
    # in several sets" and "Empty sets in the loss": a kept ROI with an empty partition, keys on ignored
    # pixels, keys of dropped ROIs, pixels in several sets, an empty negative set.
    batch, labels, keys, keep = sampled(6, 8, 8, 5, seed=4)
    labels, keys, keep = labels.clone(), keys.clone(), keep.clone()
    labels[0] = 0  # kept ROI without foreground
    labels[1, :2] = -1  # ignored pixels that are keys
    keys[1, :2] = 0b0101
    keep[2] = False
    keys[2] = 0b1111  # ignored: ROI dropped
    keys[3] |= 0b0011  # every pixel an EF and HF key
    kw = dict(share_queries=share, formulation=formulation)
    keep[0] = True
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys, keep, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    # only hard-bg negatives missing: term B has positives and no negatives
    keys_nb = keys & ~torch.tensor(0b1000, dtype=torch.uint8)
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys_nb, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys_nb, keep, **kw)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_loss_low_precision_dtypes(dtype, formulation):
    batch, labels, keys, keep = sampled(10, 12, 12, 16, seed=8, dtype=dtype)
    z = batch["z"]
    got, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep, formulation=formulation)
    want, want_grad = loss_and_grad(ref.contrastive_loss_from_keys, z.double(), labels, keys, keep,
                                    formulation=formulation)
    assert got.dtype == dtype and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))


@pytest.mark.parametrize("share", [True, False])
def test_loss_no_kept_roi_is_zero_with_zero_grad(share):
    z = torch.randn(0, 4, 5, 5, requires_grad=True)
    loss = ref.contrastive_loss_from_keys(z, torch.zeros(0, 5, 5, dtype=torch.int8),
                                          torch.zeros(0, 5, 5, dtype=torch.uint8), torch.zeros(0, dtype=torch.bool),
                                          share_queries=share)
    loss.backward()
    assert loss.item() == 0 and z.grad is not None and z.grad.shape == z.shape
    batch, labels, keys, keep = sampled(4, 6, 6, 3, seed=2, dtype=torch.float32)
    z = batch["z"].clone()
    z[0, 0, 0, 0] = math.nan  # no effect: nothing is used
    z.requires_grad_(True)
    loss = ref.contrastive_loss_from_keys(z, labels, keys, torch.zeros_like(keep), share_queries=share)
    loss.backward()
    assert loss.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_zero_features_are_finite(formulation, share):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=5, dtype=torch.float32)
    for z in (torch.zeros_like(batch["z"]), batch["z"].clone().index_fill_(3, torch.tensor([0, 3]), 0.0)):
        loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep,
                                   formulation=formulation, share_queries=share)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # features equal to the query ("released": z - q = 0)
    z = torch.ones_like(batch["z"])
    loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep,
                               formulation=formulation, share_queries=share)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("tau", [1e-3, 1e3])
def test_loss_extreme_temperatures_are_finite(tau):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=6, dtype=torch.float32)
    loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep,
                               tau_easy=tau, tau_hard=tau)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("share", [True, False])
def test_loss_nan_in_used_pixel_only(share):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=9, dtype=torch.float32)
    n = int(keep.nonzero()[0])
    used = (labels[n] >= 0) | (keys[n] != 0)
    clean = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    r, c = map(int, used.nonzero()[0])
    z = batch["z"].clone()
    z[n, 1, r, c] = math.nan
    assert torch.isnan(ref.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share))
    # a NaN in an ignored, non-key pixel (or a dropped ROI) has no effect
    labels = labels.clone()
    labels[n, r, c] = -1
    keys = keys.clone()
    keys[n, r, c] = 0
    z = batch["z"].clone()
    z[~keep] = math.nan
    z[n, :, r, c] = math.nan
    dirty = ref.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share)
    clean = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    assert torch.isfinite(dirty) and dirty.item() == clean.item()


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_gradcheck(formulation, share):
    batch, labels, keys, keep = sampled(3, 4, 5, 3, seed=13, min_keys=1, sigma=0.6)
    z = batch["z"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: ref.contrastive_loss_from_keys(x, labels, keys, keep, formulation=formulation,
                                                 share_queries=share), (z,))


@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_loss_double_backward(formulation):
    # The reference has gradients of gradients (the fused loss refuses them; test_autograd_compile.py).
    batch, labels, keys, keep = sampled(3, 4, 5, 3, seed=13, min_keys=1, sigma=0.6)
    z = batch["z"].clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x: ref.contrastive_loss_from_keys(x, labels, keys, keep, formulation=formulation, share_queries=False),
        (z,))


def exact_released_cos(q, x):
    """cos(q, x - q) with x - q, the dot product and the squared norms summed exactly (Fractions), then one
    rounding each: the reference must not lose what q.x - |q|^2 loses to cancellation for x near q."""
    from fractions import Fraction

    qf = [Fraction(v) for v in q]
    d = [Fraction(a) - b for a, b in zip(x, qf)]
    dot = sum(a * b for a, b in zip(qf, d))
    q_norm = math.sqrt(float(sum(a * a for a in qf)))
    d_norm = math.sqrt(float(sum(a * a for a in d)))
    return float(dot) / (max(q_norm, 1e-8) * max(d_norm, 1e-8))


def exact_released_loss(z, keys, keep, q_pos, q_neg, *, tau_easy, tau_hard, share_queries):
    """SPEC step 6, formulation "released", for the given queries, with exact cosines and math.fsum sums."""
    n, c = z.shape[:2]
    feats = z.reshape(n, c, -1).transpose(1, 2).tolist()
    kb = keys.reshape(n, -1).tolist()
    kept = [i for i in range(n) if keep[i]]

    def term(q, pos, neg, t):
        if not pos:
            return 0.0
        s_pos = [exact_released_cos(q, x) for x in pos]
        neg_sum = math.fsum(math.exp(exact_released_cos(q, x) / t) for x in neg)
        return math.fsum(math.log(math.exp(s) + neg_sum) - s / t for s in s_pos) / len(s_pos)

    def four_terms(qs, sets):
        return math.fsum(term(qs[side], sets[p], sets[g], tau_hard if hard else tau_easy)
                         for side, p, g, hard in torch_loss.TERMS)

    def sets_of(i):
        return [[feats[i][j] for j in range(len(kb[i])) if kb[i][j] >> s & 1] for s in range(4)]

    if share_queries:
        pooled = [sum((sets_of(i)[s] for i in kept), []) for s in range(4)]
        return four_terms([q_pos.tolist(), q_neg.tolist()], pooled)
    return math.fsum(four_terms([q_pos[i].tolist(), q_neg[i].tolist()], sets_of(i)) for i in kept) / len(kept)


@pytest.mark.parametrize("scale,noise", [(1.0, 0.0), (1e9, 0.0), (1e3, 1e-9), (1.0, 1e-12)])
@pytest.mark.parametrize("share", [True, False])
def test_released_cosine_is_exact_near_the_query(scale, noise, share):
    # Constant z (C = 8; every pixel the same vector, so z - q is the rounding of the mean), and z within
    # noise * scale of a constant: q.(z - q) computed as q.z - |q|^2 cancels, z - q formed first does not.
    batch = blob_batch(5, 9, 10, 8, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, generator=g, dtype=torch.float64) * scale
    z = v.view(1, 8, 1, 1) + noise * scale * torch.randn(batch["z"].shape, generator=g, dtype=torch.float64)
    labels, sqdist = reference_plan(batch)
    keys, keep = ref.sample_keys(labels, sqdist, batch["is_novel"], seed=0, min_keys=1)
    assert keep.sum() >= 3
    kw = dict(tau_easy=0.3, tau_hard=0.7, share_queries=share)
    loss = ref.contrastive_loss_from_keys(z, labels, keys, keep, formulation="released", **kw)
    # The queries the reference used (the oracle takes them as given: z - q is defined by them).
    _, queries = torch_loss.loss_and_queries(z, labels, keys, keep, 0.3, 0.7, share, "released")
    stats = loss_stats(keys, keep, queries, share)
    want = exact_released_loss(z, keys, keep, stats.q_pos, stats.q_neg, **kw)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want) <= 1e-13 * abs(want), (loss.item(), want)
