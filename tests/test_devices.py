"""Every op on every device: cpu, cuda-emu (the CUDA kernels emulated on the CPU, under three fiber
orders; always run) and cuda (when a GPU is present). See devices.py and conftest.py.

What each device is compared with (the baseline): on cuda-emu and cuda, the CPU kernels on the same
inputs; on cpu, the pure-PyTorch reference. Integer outputs (labels, distances, key bits, keep) must be
identical. Losses: relative 1e-5 in float32 (the same sums in another order), 1e-10 in float64;
gradients: max|g - g_base| <= 1e-4 * max|g_base| in float32. float16/bfloat16 accumulate in float32 on
every device and differ only by the final rounding to the input dtype. Two runs on one device must
agree bit for bit (no float atomics).
"""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import (COLLAPSED_LOSS_RTOL, assert_grad_close, collapsed_feature_cases,
                   extreme_feature_cases, loss_and_grad, loss_kwargs, plan_kwargs, random_valid)
from contrastmask_ops import reference as ref
from devices import has_gpu

pytestmark = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")

CPU_OPS = torch.ops.contrastmask  # the CPU kernels, whatever the device under test


# ---------------------------------------------------------------- baselines

def _plan_steps(partition, boundary_sqdist, sample_keys, b, valid, kw, seed):
    labels = partition(b["masks"], b["cams"], b["is_novel"], valid=valid)
    sqdist = boundary_sqdist(b["masks"])
    keys, keep = sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    return labels, sqdist, keys, keep


def baseline_plan(device, b, valid, kw, seed):
    """(labels, sqdist, keys, keep) of the three plan steps on the CPU inputs b: the reference for the
    cpu device, the CPU kernels for the others."""
    if device.kind == "cpu":
        return _plan_steps(ref.partition, ref.boundary_sqdist, ref.sample_keys, b, valid, kw, seed)
    return _plan_steps(
        lambda m, c, n, valid: CPU_OPS.partition(m, c, n, valid, 0.1),
        CPU_OPS.boundary_sqdist,
        lambda l, d, n, seed, sigma, hard_sqdist, min_keys: CPU_OPS.sample_keys(l, d, n, sigma, hard_sqdist,
                                                                                min_keys, seed),
        b, valid, kw, seed)


def baseline_loss_fn(device):
    """contrastive_loss_from_keys of the baseline: the reference for cpu, the CPU kernels otherwise."""
    if device.kind == "cpu":
        return ref.contrastive_loss_from_keys

    def cpu_kernels(z, labels, keys, keep, *, tau_easy, tau_hard, share_queries, formulation):
        return CPU_OPS.contrastive_loss(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation)[0]

    return cpu_kernels


def device_loss_and_grad(device, z, labels, keys, keep, **kw):
    """Loss and gradient through the public API on the device, returned on the CPU."""
    loss, g = loss_and_grad(cm.contrastive_loss_from_keys, device.to(z), device.to(labels), device.to(keys),
                            device.to(keep), **kw)
    return loss.cpu(), g.cpu()


def cpu_loss_inputs(n, hw, c, dtype, seed, min_keys=3):
    """z and a plan (labels, keys, keep) made by the CPU kernels, all on the CPU."""
    b = blob_batch(n, hw[0], hw[1], c, seed=seed, dtype=dtype)
    labels, keys, keep = CPU_OPS.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, min_keys, seed)
    return b["z"], labels, keys, keep


# ---------------------------------------------------------------- plan

# (n, (h, w), seed): typical ROIs, odd shapes, the H * W = 4096 limit in both orientations, one pixel.
PLAN_CASES = [
    (1, (28, 28), 0),
    (7, (13, 21), 1),
    (64, (28, 28), 2),
    (5, (64, 64), 3),
    (3, (1, 4096), 4),
    (3, (4096, 1), 5),
    (4, (1, 1), 6),
]


@pytest.mark.parametrize("n,hw,seed", PLAN_CASES)
def test_plan_ops(device, n, hw, seed):
    b = blob_batch(n, hw[0], hw[1], 1, seed=seed)
    valid = random_valid(n, seed)
    kw = plan_kwargs(seed)
    d = device.batch(b)
    got = list(_plan_steps(cm.partition, cm.boundary_sqdist, cm.sample_keys, d, device.to(valid), kw, seed))
    got += device.ops.roi_plan(d["masks"], d["cams"], d["is_novel"], device.to(valid), 0.1, kw["sigma"],
                               kw["hard_sqdist"], kw["min_keys"], seed)
    labels, sqdist, keys, keep = baseline_plan(device, b, valid, kw, seed)
    want = [labels, sqdist, keys, keep, labels, keys, keep]
    for name, g, w in zip(["labels", "sqdist", "keys", "keep", "fused labels", "fused keys", "fused keep"], got, want):
        assert g.device.type == device.torch_device.type, name
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), name


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cam_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_plan_dtypes(device, mask_dtype, cam_dtype):
    b = blob_batch(16, 13, 21, 1, seed=3)
    masks, cams = b["masks"].to(mask_dtype), b["cams"].to(cam_dtype)
    cams[0, 0, :4] = torch.tensor([0.9, 0.1, 0.5, 1.0]).to(cam_dtype)  # values on the thresholds
    novel = b["is_novel"].clone()
    novel[0] = True
    for delta in (0.1, 0.5):
        got = device.ops.roi_plan(device.to(masks), device.to(cams), device.to(novel), None, delta, 0.3, 2, 0, 11)
        if device.kind == "cpu":
            labels = ref.partition(masks, cams, novel, delta=delta)
            keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(masks), novel, sigma=0.3, min_keys=0, seed=11)
            want = (labels, keys, keep)
        else:
            want = CPU_OPS.roi_plan(masks, cams, novel, None, delta, 0.3, 2, 0, 11)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), delta
    want_sqdist = ref.boundary_sqdist(masks) if device.kind == "cpu" else CPU_OPS.boundary_sqdist(masks)
    assert torch.equal(cm.boundary_sqdist(device.to(masks)).cpu(), want_sqdist)


@pytest.mark.parametrize("hw", [(28, 28), (9, 70)])  # CPU roi_plan: row bitmasks (W <= 64) and generic (W > 64)
def test_roi_offset_samples_a_slice_as_the_whole_batch_does(device, hw):
    """Rows [a:b] sampled with roi_offset=a get rows [a:b] of the whole batch's keys and keep (how a batch
    split across processes samples as one process would), through roi_plan and sample_keys alike."""
    n, seed = 13, 6
    b = device.batch(blob_batch(n, hw[0], hw[1], 1, seed=seed))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    whole = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed)
    whole_keys, whole_keep = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed)
    assert whole_keep.sum() >= n // 2
    for a, e in [(0, 5), (5, 5), (5, 13), (12, 13)]:
        rows = slice(a, e)
        _, keys, keep = device.ops.roi_plan(masks[rows], cams[rows], novel[rows], None, 0.1, 0.3, 2, 1, seed, a)
        assert torch.equal(keys, whole[1][rows]) and torch.equal(keep, whole[2][rows]), (a, e)
        keys, keep = cm.sample_keys(labels[rows], sqdist[rows], novel[rows], min_keys=1, seed=seed, roi_offset=a)
        assert torch.equal(keys, whole_keys[rows]) and torch.equal(keep, whole_keep[rows]), (a, e)
        # the offset as a tensor (the global loss's no-sync path): on the masks' device the kernel reads it
        for where in {device.torch_device, torch.device("cpu")}:
            offset = torch.tensor(a, device=where)
            seed_t = torch.tensor(seed, device=device.torch_device)
            _, keys, keep = device.ops.roi_plan.offset_tensor(masks[rows], cams[rows], novel[rows], None, 0.1, 0.3,
                                                              2, 1, seed_t, offset)
            assert torch.equal(keys, whole[1][rows]) and torch.equal(keep, whole[2][rows]), (a, e, where)
    # the offset is what makes them equal: without it, the slice samples other pixels
    _, keys, _ = device.ops.roi_plan(masks[5:], cams[5:], novel[5:], None, 0.1, 0.3, 2, 1, seed)
    assert not torch.equal(keys, whole[1][5:])
    with pytest.raises(ValueError, match="roi_offset"):
        device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed, -1)
    with pytest.raises(ValueError, match="roi_offset"):
        device.ops.roi_plan.offset_tensor(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(seed),
                                          torch.tensor([0]))


# (an integer seed, the int64 tensor with its 64 bits): SPEC takes the seed mod 2^64.
SEED_FORMS = [(0, 0), (6, 6), (2**63 - 1, 2**63 - 1), (2**63 + 17, 2**63 + 17 - 2**64), (-1, -1)]


@pytest.mark.parametrize("hw", [(28, 28), (9, 70)])  # CPU roi_plan: row bitmasks (W <= 64) and generic (W > 64)
@pytest.mark.parametrize("seed,bits", SEED_FORMS)
def test_tensor_seed_samples_the_keys_of_the_integer_seed(device, hw, seed, bits):
    """A 0-dim int64 seed tensor, on the CPU or on the tensors' device, samples what the integer does: through
    roi_plan, sample_keys and the whole pipeline, and the reference's sampler too."""
    n = 13
    b = device.batch(blob_batch(n, hw[0], hw[1], 4, seed=4))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    want_plan = device.ops.roi_plan.int_seed(masks, cams, novel, None, 0.1, 0.3, 2, 1, bits, 3)  # raw ops: int64
    want_keys = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed)
    assert want_plan[2].sum() >= n // 2
    want_loss, want_stats = cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, min_keys=1, seed=seed,
                                                              return_stats=True)
    for seed_tensor in (torch.tensor(bits), device.to(torch.tensor(bits))):
        plan = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed_tensor, 3)
        assert all(torch.equal(got, want) for got, want in zip(plan, want_plan))
        keys = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed_tensor)
        assert all(torch.equal(got, want) for got, want in zip(keys, want_keys))
        loss, stats = cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, min_keys=1, seed=seed_tensor,
                                                        return_stats=True)
        assert torch.equal(loss, want_loss) and torch.equal(stats.keys_per_set, want_stats.keys_per_set)
    if device.kind == "cpu":  # the reference takes both forms too, and samples the kernels' keys
        got = ref.sample_keys(labels, sqdist, novel, min_keys=1, seed=torch.tensor(bits))
        assert all(torch.equal(g, w) for g, w in zip(got, want_keys))
    # the seed matters: another one samples other keys
    other = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(bits ^ 1), 3)
    assert not torch.equal(other[1], want_plan[1])


def test_bad_seed_tensors_are_refused_naming_seed(device):
    b = device.batch(blob_batch(3, 9, 11, 4, seed=1))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    wrong_shape_or_dtype = [device.to(torch.tensor([5])), device.to(torch.tensor(5, dtype=torch.int32)),
                            device.to(torch.tensor(5.0))]
    for bad in wrong_shape_or_dtype + [torch.tensor(5, device="meta")]:  # meta: neither the CPU nor the device
        with pytest.raises(ValueError, match="^seed"):
            cm.sample_keys(labels, sqdist, novel, seed=bad)
        with pytest.raises(ValueError, match="^seed"):
            cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=bad)
    for bad in wrong_shape_or_dtype:  # the kernels' own checks
        with pytest.raises(ValueError, match="^seed"):
            device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, bad)
        with pytest.raises(ValueError, match="^seed"):
            device.ops.sample_keys(labels, sqdist, novel, 0.3, 2, 1, bad)


# ---------------------------------------------------------------- loss

LOSS_CASES = [
    (1, (28, 28), 16, 0),
    (7, (13, 21), 300, 1),   # more channels than one channel block
    (64, (28, 28), 64, 2),
    (4, (64, 64), 8, 3),     # H * W = 4096: several pixel blocks per ROI
    (3, (1, 4096), 8, 4),
    (5, (13, 21), 1, 7),     # one channel
]


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
        if formulation == "paper":
            assert g.abs().max() <= 1e-3 and g_base.abs().max() <= 1e-3
    else:
        assert_grad_close(g, g_base, 1e-4)


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


@pytest.mark.parametrize("share_queries", [True, False])
def test_backward_checks_the_saved_statistics(device, share_queries):
    # Statistics that do not belong to this z must be refused before any kernel reads them (the CPU
    # backward once read out of bounds: non-finite dz, and a SIGSEGV at N = 512, 64 x 64).
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
        # a meta grad with real z was read as garbage (the loss scaled by uninitialised memory)
        with pytest.raises(ValueError, match="^grad"):
            device.ops.contrastive_loss_backward(bad_grad if bad_grad.is_meta else device.to(bad_grad), z, labels,
                                                 keys, keep, queries, pixstats, termstats, *args)
    # Statistics of a smaller batch than z (the case that crashed): refused, and the good call still works.
    _, q2, p2, t2 = device.ops.contrastive_loss(z[:2], labels[:2], keys[:2], keep[:2], *args)
    with pytest.raises(ValueError, match="^(queries|pixstats)"):
        device.ops.contrastive_loss_backward(grad, z, labels, keys, keep, q2, p2, t2, *args)
    dz = device.ops.contrastive_loss_backward(grad, z, labels, keys, keep, queries, pixstats, termstats, *args)
    assert torch.isfinite(dz).all()


@pytest.mark.parametrize("tau", [1e-39, 9.999999e-05, -1.0])
def test_raw_ops_refuse_temperatures_below_the_minimum(device, tau):
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(3, (8, 8), 4, torch.float32, 1))
    with pytest.raises(ValueError, match=r"^tau_easy: expected a temperature >= 1e-04, got " + repr(tau)):
        device.ops.contrastive_loss(z, labels, keys, keep, tau, 0.3, True, "paper")


def test_raw_ops_print_numbers_in_full_and_blame_z(device):
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(3, (8, 8), 4, torch.float32, 1))
    with pytest.raises(ValueError, match=r"^tau_hard: .*got -0\.30000001"):
        device.ops.contrastive_loss(z, labels, keys, keep, 0.7, -0.30000001, True, "paper")
    with pytest.raises(ValueError, match="^z: expected N, H, W of the plan"):
        device.ops.contrastive_loss(z[:, :, :, :7], labels, keys, keep, 0.7, 0.3, True, "paper")
    masks = device.to(torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^sigma: expected a value in \(0, 1\], got 1\.0000001"):
        device.ops.roi_plan(masks, None, device.to(torch.zeros(2, dtype=torch.bool)), None, 0.1, 1.0000001, 2, 5, 0)


def test_smallest_temperature_gives_a_finite_loss_and_gradient(device):
    # At the bound (1e-4) the logits reach 1e4: large, but the loss and dz stay finite in float32.
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(5, (14, 14), 8, torch.float32, 2))
    for formulation in ("paper", "released"):
        loss, g = device_loss_and_grad(device, z, labels, keys, keep, tau_easy=1e-4, tau_hard=1e-4,
                                       formulation=formulation)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), formulation


@pytest.mark.parametrize("scale", [1e19, 1e30])
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_large_float32_features_give_the_unscaled_loss(device, scale, formulation, share_queries):
    # Squared norms of a float32 z overflow from |z| ~ 1e18; the kernels then compute the pixel again with
    # its key and the queries scaled by powers of two (DESIGN, "Numerics"), so the loss, scale * dz and the
    # cosines equal those of the unscaled z, and the stored key norms are the unscaled ones times the scale.
    z, labels, keys, keep = cpu_loss_inputs(6, (20, 17), 16, torch.float32, 5)
    kw = loss_kwargs(formulation, share_queries)
    want, want_g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
    loss, g = device_loss_and_grad(device, z * scale, labels, keys, keep, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    assert_grad_close(g * scale, want_g, 1e-5)
    if device.kind == "cpu":
        return
    args = (kw["tau_easy"], kw["tau_hard"], share_queries, formulation)
    _, _, stats, _ = device.ops.contrastive_loss(device.to(z * scale), device.to(labels), device.to(keys),
                                                 device.to(keep), *args)
    _, _, base, _ = device.ops.contrastive_loss(device.to(z), device.to(labels), device.to(keys),
                                                device.to(keep), *args)
    torch.testing.assert_close(stats[:, :2].cpu(), base[:, :2].cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats[:, 2:].cpu(), base[:, 2:].cpu() * scale, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", extreme_feature_cases(), ids=lambda c: c[0])
def test_extreme_float32_features_give_the_float64_answer(device, case):
    # Keys whose huge components cancel ("released") and norms near float32's limit: the rescaled path of
    # each device against the float64 CPU kernels, which need no rescaling here (DESIGN, "Numerics").
    _, z, labels, keys, keep, kw = case
    want, want_g = loss_and_grad(cm.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    loss, g = device_loss_and_grad(device, z.float(), labels, keys, keep, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(g.double(), want_g, rtol=1e-4, atol=1e-6 * float(want_g.abs().max()))


@pytest.mark.parametrize("case", collapsed_feature_cases(), ids=lambda c: c[0])
def test_released_collapsed_features_give_the_float64_answer(device, case):
    # Issue 22, item 5: "released" keys z - q of a constant (or nearly constant) partition or batch. float32 once
    # held q's rounding noise there (|q| * 2^-24, above the 1e-8 clamp), whose direction decided the cosines:
    # CPU kernels, CUDA kernels and reference each returned another loss, and dz up to 7x too large. The
    # query's sums are now taken in double and z - q formed from its hi and lo parts (DESIGN, "Collapsed
    # features"), so each device gives the float64 reference's loss and dz within the tolerances of cases.py.
    _, z, labels, keys, keep, kw, grad_rel = case
    want, want_g = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep, **kw)
    loss, g = device_loss_and_grad(device, z.float(), labels, keys, keep, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), want, rtol=COLLAPSED_LOSS_RTOL, atol=0)
    assert_grad_close(g, want_g, grad_rel, atol=0)


# (dtype, loss rtol, loss atol, gradient rel): against the CPU kernels (cuda, cuda-emu) and against the
# reference (cpu).
OTHER_DTYPES = {
    "kernels": [(torch.float64, 1e-10, 0.0, 1e-9), (torch.float16, 2e-3, 0.0, 2e-2),
                (torch.bfloat16, 1.6e-2, 0.0, 2e-2)],
    "reference": [(torch.float64, 1e-10, 1e-6, 1e-9), (torch.float16, 1e-4, 1e-6, 2e-2),
                  (torch.bfloat16, 1e-4, 1e-6, 2e-2)],
}


@pytest.mark.parametrize("dtype_index,dtype_name", [(0, "float64"), (1, "float16"), (2, "bfloat16")])
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_loss_other_dtypes(device, dtype_index, dtype_name, formulation, share_queries):
    dtype, loss_rtol, loss_atol, grad_rel = OTHER_DTYPES["reference" if device.kind == "cpu" else "kernels"][
        dtype_index]
    z, labels, keys, keep = cpu_loss_inputs(7, (28, 28), 32, dtype, 5)
    kw = loss_kwargs(formulation, share_queries)
    loss, g = device_loss_and_grad(device, z, labels, keys, keep, **kw)
    loss_base, g_base = loss_and_grad(baseline_loss_fn(device), z, labels, keys, keep, **kw)
    assert loss.dtype == dtype and g.dtype == dtype
    torch.testing.assert_close(loss.double(), loss_base.double(), rtol=loss_rtol, atol=loss_atol)
    assert_grad_close(g, g_base, grad_rel, atol=1e-12)


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


@pytest.mark.parametrize("share_queries", [True, False])
def test_fused_loss(device, share_queries):
    b = blob_batch(32, 28, 28, 16, seed=8)
    kw = dict(seed=5, share_queries=share_queries)
    zb = b["z"].clone().requires_grad_(True)
    if device.kind == "cpu":
        loss_base, stats = ref.query_sharing_contrastive_loss(zb, b["masks"], b["cams"], b["is_novel"],
                                                              return_stats=True, **kw)
        kept_base, per_set_base = stats.kept, stats.keys_per_set
    else:
        labels, keys, keep = CPU_OPS.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, 5)
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


@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_every_roi_dropped_gives_zero_loss_and_zero_grad(device, formulation):
    b = device.batch(blob_batch(6, 28, 28, 8, seed=0))
    z = b["z"].requires_grad_(True)
    loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], min_keys=10**6,
                                             formulation=formulation)
    (g,) = torch.autograd.grad(loss, z)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


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


def test_bad_values_raise_and_the_device_stays_usable(device):
    b = device.batch(blob_batch(4, 13, 21, 4, seed=1))
    masks = b["masks"].to(torch.float32)
    masks[2, 3, 4] = 0.5
    with pytest.raises(ValueError, match="masks"):
        cm.boundary_sqdist(masks)
    with pytest.raises(ValueError, match="masks"):
        cm.query_sharing_contrastive_loss(b["z"], masks, b["cams"], b["is_novel"])
    novel = device.to(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cams"):
        cm.partition(b["masks"], None, novel)
    with pytest.raises(ValueError, match="cams"):
        cm.query_sharing_contrastive_loss(b["z"], b["masks"], None, novel)
    # No device assert fired: the device still runs kernels and the good input still works.
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
    want = CPU_OPS.partition(b["masks"].cpu(), b["cams"].cpu(), b["is_novel"].cpu(), None, 0.1)
    assert torch.equal(labels.cpu(), want)
    if device.kind == "cuda":
        torch.cuda.synchronize()


def test_check_inputs_false_skips_the_value_checks(device):
    """check_inputs=False (CUDA-graph capture: no read-back of the error word) gives the same results for valid
    input, and a bad mask or missing CAMs no longer raise (their results are unspecified)."""
    b = device.batch(blob_batch(6, 13, 21, 4, seed=1))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    checked = (cm.partition(masks, cams, novel), cm.boundary_sqdist(masks),
               device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(5)),
               cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=5, return_stats=True))
    unchecked = (cm.partition(masks, cams, novel, check_inputs=False), cm.boundary_sqdist(masks, check_inputs=False),
                 device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(5), 0, False),
                 cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=5, return_stats=True,
                                                   check_inputs=False))
    def flat(results):  # the tensors of nested tuples (LossStats included), in order
        return [t for r in results for t in (flat(r) if isinstance(r, tuple) else (r,))]

    assert len(flat(checked)) == 10  # labels, sqdist, the plan (3), the loss and its LossStats (5)
    assert all(torch.equal(got, want) for got, want in zip(flat(unchecked), flat(checked)))
    bad_masks = masks.to(torch.float32)
    bad_masks[2, 3, 4] = 0.5
    all_novel = device.to(torch.ones(6, dtype=torch.bool))
    bad_calls = [
        lambda check: cm.boundary_sqdist(bad_masks, check_inputs=check),
        lambda check: cm.partition(bad_masks, cams, novel, check_inputs=check),
        lambda check: cm.partition(masks, None, all_novel, check_inputs=check),
        lambda check: cm.query_sharing_contrastive_loss(b["z"], bad_masks, cams, novel, seed=5, check_inputs=check),
        lambda check: cm.query_sharing_contrastive_loss(b["z"], masks, None, all_novel, seed=5, check_inputs=check),
    ]
    if device.kind == "cpu":  # the reference skips its value checks too
        bad_calls += [
            lambda check: ref.partition(bad_masks, cams, novel, check_inputs=check),
            lambda check: ref.boundary_sqdist(bad_masks, check_inputs=check),
            lambda check: ref.query_sharing_contrastive_loss(b["z"], masks, None, all_novel, seed=5,
                                                             check_inputs=check),
        ]
    for call in bad_calls:
        with pytest.raises(ValueError, match="^(masks|cams)"):
            call(True)
        call(False)
    with pytest.raises(TypeError, match="^check_inputs"):
        cm.partition(masks, cams, novel, check_inputs="no")
    if device.kind == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- GPU only

@pytest.mark.cuda
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_cuda_graph_replays_the_pipeline_with_a_device_seed():
    """With check_inputs=False and a seed tensor on the GPU the pipeline has no host sync, so a training step's
    loss and backward can be captured in a CUDA graph; each replay samples with the seed the tensor then holds."""
    b = {k: v.cuda() for k, v in blob_batch(16, 28, 28, 32, seed=2).items()}
    z = b["z"].clone().requires_grad_(True)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def step():
        loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=seed,
                                                 check_inputs=False)
        (dz,) = torch.autograd.grad(loss, z)
        return loss, dz

    side = torch.cuda.Stream()  # warm up outside the capture, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, dz = step()
    for value in (3, 11, 2**40):
        seed.fill_(value)
        graph.replay()
        want = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=value)
        (want_dz,) = torch.autograd.grad(want, z)
        assert torch.equal(loss, want), value
        assert torch.equal(dz, want_dz), value  # no float atomics: the same bits


@pytest.mark.cuda
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_loss_takes_no_host_sync():
    z, labels, keys, keep = (t.cuda() for t in cpu_loss_inputs(16, (28, 28), 32, torch.float32, 9))
    z.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for share_queries in (True, False):
            loss = cm.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share_queries)
            torch.autograd.grad(loss, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_mixed_devices_are_rejected():
    b = blob_batch(2, 13, 21, 4, seed=1)
    with pytest.raises(ValueError, match="is_novel"):
        CPU_OPS.partition(b["masks"].cuda(), b["cams"].cuda(), b["is_novel"], None, 0.1)


@pytest.mark.parametrize("width", [60, 100])  # the row-bitmask path (W <= 64) and the per-ROI loop
def test_an_unchecked_plan_drops_only_the_roi_with_a_bad_mask(device, width):
    # check_inputs=False: a non-binary mask drops its own ROI (keep False), not the others of its thread's chunk
    m = torch.zeros(6, 20, width)
    m[:, 5:15, 10:40] = 1
    m[0, 0, 0] = 0.5
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            keep = device.ops.roi_plan(device.to(m), None, device.to(torch.zeros(6, dtype=torch.bool)), None, 0.1,
                                       0.3, 2, 1, device.to(torch.tensor(3)), 0, False)[2]
            assert keep.tolist() == [False] + [True] * 5, n_threads
    finally:
        torch.set_num_threads(threads)
