"""The loss at the ends of its range: large, extreme and collapsed float32 features (rescaled paths, DESIGN
"Numerics" and "Collapsed features"), zero norms, tiny temperatures, NaN, one channel, autocast. On every
device (devices.py) and on both paths (the reference and the kernels: IMPLS)."""
import functools

import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import (COLLAPSED_LOSS_RTOL, IMPLS, assert_grad_close, collapsed_feature_cases, cpu_loss_inputs,
                   device_loss_and_grad, extreme_feature_cases, fused_loss_and_grad, loss_and_grad, loss_kwargs,
                   needs_kernels)
from contrastmask_ops import reference as ref


@needs_kernels
def test_smallest_temperature_stays_finite(device):
    # At the bound (1e-4) the logits reach 1e4: large, but the loss and dz stay finite in float32.
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(5, (14, 14), 8, torch.float32, 2))
    for formulation in ("paper", "released"):
        loss, g = device_loss_and_grad(device, z, labels, keys, keep, tau_easy=1e-4, tau_hard=1e-4,
                                       formulation=formulation)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), formulation


@needs_kernels
@pytest.mark.parametrize("scale", [1e19, 1e30])
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_large_float32_features_are_rescaled(device, scale, formulation, share_queries):
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


def _check_float32_case(case, float64_loss, float32_loss_and_grad=None):
    """float32_loss_and_grad (default: float64_loss's) on the z of an extreme_feature_cases() or
    collapsed_feature_cases() case in float32 against float64_loss on it in float64: both finite, the loss
    within 1e-5 relative (COLLAPSED_LOSS_RTOL);
    dz of a collapsed case within its grad_rel * max|dz64|, of an extreme case within rtol 1e-4 plus
    1e-6 * max|dz64| (a pixel's gradient is about 1 / |z|: the tolerance is relative to the largest)."""
    _, z, labels, keys, keep, kw, *collapsed_grad_rel = case
    want, want_g = loss_and_grad(float64_loss, z, labels, keys, keep, **kw)
    float32_loss_and_grad = float32_loss_and_grad or functools.partial(loss_and_grad, float64_loss)
    loss, g = float32_loss_and_grad(z.float(), labels, keys, keep, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss.double(), want, rtol=COLLAPSED_LOSS_RTOL if collapsed_grad_rel else 1e-5, atol=0)
    if collapsed_grad_rel:
        assert_grad_close(g, want_g, collapsed_grad_rel[0], atol=0)
    else:
        torch.testing.assert_close(g.double(), want_g, rtol=1e-4, atol=1e-6 * float(want_g.abs().max()))


# Each case with the float64 API whose answer is exact for it: the CPU kernels for the extreme cases (no
# rescaling in float64), the reference for the collapsed ones.
FLOAT64_ANSWERS = ([pytest.param(case, cm, id=case[0]) for case in extreme_feature_cases()]
                   + [pytest.param(case, ref, id=case[0]) for case in collapsed_feature_cases()])


@needs_kernels
@pytest.mark.parametrize("case,float64_api", FLOAT64_ANSWERS)
def test_float32_matches_float64(device, case, float64_api):
    # Extreme: keys whose huge components cancel ("released") and norms near float32's limit, through the
    # rescaled path of each device (DESIGN, "Numerics").
    # Collapsed: "released" keys z - q of a constant (or nearly constant) partition or batch. A float32 q would
    # leave its rounding noise there (|q| * 2^-24, above the 1e-8 clamp), whose direction would decide the
    # cosines: each implementation another loss, and dz up to 7x too large. So the query's sums are taken in
    # double and z - q formed from its hi and lo parts (DESIGN, "Collapsed features"): each device gives the
    # float64 reference's loss and dz within the tolerances of cases.py.
    _check_float32_case(case, float64_api.contrastive_loss_from_keys, functools.partial(device_loss_and_grad, device))


# ---------------------------------------------------------------- both paths (reference, kernels)


def _finite_loss_and_grad(impl, z, b, **kw):
    """The pipeline's (loss, dz) on batch b's masks, CAMs and novel flags with features z; both finite."""
    loss, g = fused_loss_and_grad(impl, z, b["masks"], b["cams"], b["is_novel"], **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    return loss, g


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_norm_features_stay_finite(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    z = b["z"].clone()
    z[:, :, :10] = 0.0  # zero vectors among keys and queries' pixels
    z[2] = 0.0
    for formulation in ("paper", "released"):
        _finite_loss_and_grad(impl, z, b, formulation=formulation, seed=2)
    _finite_loss_and_grad(impl, torch.zeros_like(z), b, seed=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_temperature_stays_finite(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    _finite_loss_and_grad(impl, b["z"], b, tau_easy=1e-3, tau_hard=1e-3)


def _scaled_loss_and_grad(impl, scale, dtype, formulation):
    """Loss and scale * dL/dz at z * scale: the cosines are scale-invariant, so both equal the unscaled ones."""
    b = blob_batch(6, 28, 28, 8, seed=1)
    loss, g = fused_loss_and_grad(impl, b["z"].to(dtype) * scale, b["masks"], b["cams"], b["is_novel"],
                             formulation=formulation, seed=2)
    return loss, g * scale


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("scale,dtype", [(1e15, torch.float32), (1e19, torch.float32), (1e30, torch.float32),
                                         (1e19, torch.float64), (1e150, torch.float64), (1e250, torch.float64)])
def test_large_features_give_the_same_loss(impl, formulation, scale, dtype):
    # Beyond 1e18 in float32 the squared norms would overflow (NaN); large features are rescaled by a power
    # of two (DESIGN, "Numerics"), so loss and scale * dL/dz equal the unscaled ones.
    want, want_g = _scaled_loss_and_grad(impl, 1.0, dtype, formulation)
    loss, g = _scaled_loss_and_grad(impl, scale, dtype, formulation)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-6 * float(want_g.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", extreme_feature_cases() + collapsed_feature_cases(), ids=lambda c: c[0])
def test_float32_matches_own_float64(impl, case):
    # Each implementation in float32 against its own float64 answer, the exact one (no rescaling in float64).
    # Extreme features (DESIGN, "Numerics"): a "released" key whose huge components cancel keeps its small ones
    # only when scaled by |z - q| (by |z| + |q|, dz would be 1e6 too large); a pixel norm beyond float32's range
    # is out of the documented range. Collapsed features: DESIGN, "Collapsed features"; the kernels on every
    # device against the reference: test_float32_matches_float64 above.
    _check_float32_case(case, impl.contrastive_loss_from_keys)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_extreme_dynamic_range_stays_finite(impl, formulation, share_queries):
    # One ROI at 1e30 beside ROIs of tiny, zero and cancelling features: the large ROI's scale must not
    # push another ROI's clamped norms (eps * scale) into underflow, nor a zero query into 0 / 0.
    b = blob_batch(6, 28, 28, 8, seed=1)
    z = b["z"].clone()
    z[0] *= 1e30
    z[1] *= 1e-30
    z[2] = 0.0
    z[3, :, :, :14] = 1e20  # fg and bg means near zero or exactly zero: +x and -x halves
    z[3, :, :, 14:] = -1e20
    z[4, :, ::2] = 0.0  # zero keys beside large ones
    z[4] *= 1e25
    _finite_loss_and_grad(impl, z, b, formulation=formulation, share_queries=share_queries, seed=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_used_pixel_gives_nan_loss(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    labels = impl.partition(b["masks"], b["cams"], b["is_novel"])
    n, y, x = [int(v) for v in (labels == 1).nonzero()[0]]
    z = b["z"].clone()
    z[n, 0, y, x] = float("nan")
    loss = impl.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], min_keys=0, seed=0)
    assert torch.isnan(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_channel(impl):
    b = blob_batch(5, 13, 21, 1, seed=4)
    loss, _ = _finite_loss_and_grad(impl, b["z"], b, seed=1)
    assert loss.item() != 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_bfloat16_computes_in_float32(impl):
    b = blob_batch(6, 14, 14, 16, seed=5)
    args = (b["masks"], b["cams"], b["is_novel"])
    want32, g32 = fused_loss_and_grad(impl, b["z"], *args, seed=3)
    z16 = b["z"].bfloat16()
    want16, g16 = fused_loss_and_grad(impl, z16.float(), *args, seed=3)
    z32 = b["z"].clone().requires_grad_(True)
    z16 = z16.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forward under autocast, backward outside (as advised)
        got32 = impl.query_sharing_contrastive_loss(z32, *args, seed=3)
        got16 = impl.query_sharing_contrastive_loss(z16, *args, seed=3)
        got64 = impl.query_sharing_contrastive_loss(b["z"].double(), *args, seed=3)
    (gg32,) = torch.autograd.grad(got32, z32)
    (gg16,) = torch.autograd.grad(got16, z16)
    assert got32.dtype == got16.dtype == torch.float32 and got64.dtype == torch.float64
    assert gg32.dtype == torch.float32 and gg16.dtype == torch.bfloat16
    # the same float32 computation as outside autocast (no matmul dropped to bfloat16)
    torch.testing.assert_close(got32, want32, rtol=1e-6, atol=0)
    torch.testing.assert_close(gg32, g32, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got16, want16, rtol=1e-6, atol=0)
    torch.testing.assert_close(gg16, g16.bfloat16(), rtol=0, atol=0)
    # the loss from explicit keys too
    labels = ref.partition(*args)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(b["masks"]), b["is_novel"], seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = impl.contrastive_loss_from_keys(z16, labels, keys, keep, formulation="released")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, impl.contrastive_loss_from_keys(z16.float(), labels, keys, keep,
                                                                    formulation="released"), rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.xfail(strict=True, reason="known: a key that is its own query ('released', a one-pixel partition) has "
                                       "z - q = 0 exactly; the cosine's gradient there is 1e8 (the 1e-8 clamp) times "
                                       "a difference that is exactly 0, which float32 cannot carry: both "
                                       "implementations lose the rest of the gradient (found by test_properties.py)")
def test_released_key_as_own_query_grad(impl):
    # One novel ROI of 1x2 pixels: one background and one foreground pixel, each a key and each its
    # partition's query. The loss is fine; the float32 gradient should match the float64 one.
    masks = torch.tensor([[[False, True]]])
    cams = torch.tensor([[[0.0, 1.0]]])
    novel = torch.ones(1, dtype=torch.bool)
    labels = ref.partition(masks, cams, novel)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(masks), novel, min_keys=0, seed=0)
    assert keep.all() and (keys != 0).all()
    z = torch.randn(1, 2, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(formulation="released", share_queries=False)
    want = ref.contrastive_loss_from_keys(z.requires_grad_(True), labels, keys, keep, **kw)
    (want_g,) = torch.autograd.grad(want, z)
    z32 = z.detach().float().requires_grad_(True)
    got = impl.contrastive_loss_from_keys(z32, labels, keys, keep, **kw)
    (g,) = torch.autograd.grad(got, z32)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=0)  # the loss itself is right
    torch.testing.assert_close(g.double(), want_g, rtol=0, atol=1e-3 * float(want_g.abs().max()))
