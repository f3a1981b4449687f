"""Helpers shared by the op tests (tests/ops/): the sampler and loss parameters varied with a case, the batches
of the numerics tests, the two paths (IMPLS: the reference and the kernels) and the baselines of the device
tests (on cpu the reference, elsewhere the CPU kernels). The `device` fixture is in conftest.py."""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from contrastmask_ops import reference as ref

CPU_OPS = torch.ops.contrastmask  # the CPU kernels, whatever the device under test
IMPLS = [pytest.param(ref, id="reference")]  # the two paths of the public API
if cm.build_info()["cpu"]:
    IMPLS.append(pytest.param(cm, id="kernels"))
needs_kernels = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")
INT32_MAX = 2**31 - 1  # boundary_sqdist of a mask without boundary


def plan_kwargs(seed):
    """Sampler parameters varied with the case, so min_keys = 0 and sigma = 1 are covered too."""
    return dict(sigma=[0.3, 1.0, 0.05][seed % 3], hard_sqdist=[2, 0, 5][seed % 3], min_keys=[5, 0, 12][seed % 3])


def random_valid(n, seed):
    """A `valid` flag per ROI (about 80 % True) for odd seeds, None for even ones."""
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.rand(n, generator=g) > 0.2 if seed % 2 else None


def loss_kwargs(formulation, share_queries):
    kw = dict(tau_easy=0.7, tau_hard=0.3, share_queries=share_queries, formulation=formulation)
    if formulation == "released":
        kw.update(tau_easy=0.3, tau_hard=0.7)  # the released configuration's temperatures
    return kw


def loss_and_grad(fn, z, *args, **kw):
    """(loss, dloss/dz) of fn(z, *args, **kw), both detached."""
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, *args, **kw)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def assert_grad_close(g, g_ref, rel, atol=1e-7):
    """max |g - g_ref| <= rel * max |g_ref| + atol."""
    scale = g_ref.double().abs().max().item()
    err = (g.double() - g_ref.double()).abs().max().item()
    assert err <= rel * scale + atol, (err, scale)


def extreme_feature_cases():
    """Batches (name, z in float64, labels, keys, keep, loss kwargs) whose float32 cosines need the rescaled
    path (DESIGN, "Numerics"); float64 computes them without rescaling, so it is their exact answer.
    "cancelling": "released" keys whose 2**100 components cancel against the query's, leaving small ones;
    "near_the_limit": pixels and a query of norm 4e37 (float32's limit is 3.4e38) beside pixels of norm 1."""
    keep = torch.tensor([True])
    labels = torch.tensor([[[1, 1, 1, 0, 0]]], dtype=torch.int8)
    keys = torch.tensor([[[1, 1, 1, 4, 4]]], dtype=torch.uint8)  # easy foreground, easy background
    z = torch.zeros(1, 2, 1, 5, dtype=torch.float64)
    z[0, 0, 0] = torch.tensor([2.0**100] * 3 + [-2.0**100] * 2)
    z[0, 1, 0] = torch.tensor([0.01, 0.03, -0.04, 0.01, -0.01])
    released = dict(tau_easy=0.3, tau_hard=0.7, share_queries=False, formulation="released")
    cases = [("cancelling", z, labels, keys, keep, released)]
    z = torch.zeros(1, 16, 1, 5, dtype=torch.float64)
    z[0, :, 0, :2] = 1e37
    z[0, :, 0, 2] = 0.5
    z[0, :, 0, 3] = -1.0
    z[0, 0, 0, 4] = 1.0
    paper = dict(tau_easy=0.7, tau_hard=0.3, share_queries=False, formulation="paper")
    cases.append(("near_the_limit", z, labels, keys, keep, paper))
    return cases


# "released" keys on collapsed features (DESIGN, "Collapsed features"): float32 against
# float64. The loss within COLLAPSED_LOSS_RTOL (relative); dz: max|dz32 - dz64| <= grad_rel * max|dz64|, grad_rel
# given with each case. At a key whose z - q is 0 (or below the 1e-8 clamp) dz is the clamp's slope, dL/ds / 1e-8,
# minus the same terms of the other keys through the query: a difference of terms that are 1e2 to 1e3 times the
# result, so float32 resolves it to about 2^-24 times that ratio, which grows with the keys sharing a query.
COLLAPSED_LOSS_RTOL = 1e-5
COLLAPSED_GRAD_REL = 2e-4        # 6 ROIs (measured: at most 6e-5 on cpu, cuda-emu and the reference)
COLLAPSED_GRAD_REL_LARGE = 1e-2  # 32 ROIs of 28 x 28, one shared query pair (measured: 2.3e-3 cpu, 6e-4 cuda-emu)


def collapsed_feature_cases():
    """Batches (name, z in float64 holding float32 values, labels, keys, keep, loss kwargs, grad_rel) whose
    "released" keys z - q are exactly 0 (a partition or the whole batch constant: the query is that constant) or
    a few float32 units in the last place of q (nearly constant), where float32 once returned rounding noise
    whose direction decided the cosines (reported: loss 9.14 for 9.36, dz 3.3e7 for 4.5e6). The plans are the
    reference's: 6 ROIs of 20 x 20 with 8 channels (min_keys 5), and 32 ROIs of 28 x 28 for the large case."""
    def plan(b, seed):
        labels = ref.partition(b["masks"], b["cams"], b["is_novel"])
        keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(b["masks"]), b["is_novel"], seed=seed)
        return labels, keys, keep

    b = blob_batch(6, 20, 20, 8, seed=4)
    labels, keys, keep = plan(b, 3)
    assert int(keep.sum()) >= 3
    roi = int(keep.nonzero()[1])  # a kept ROI that is not the first
    g = torch.Generator().manual_seed(5)
    vector = torch.randn(8, generator=g).float().double()  # one feature vector for every pixel
    ulp = torch.finfo(torch.float32).eps * vector.abs().max()

    def released(share_queries):
        return dict(tau_easy=0.3, tau_hard=0.7, share_queries=share_queries, formulation="released")

    def near(z):  # z plus -1.5 to 1.5 float32 ulps of the vector's largest component, per element
        steps = torch.randint(-3, 4, z.shape, generator=g).double()
        return z + steps * ulp / 2

    plan6 = (labels, keys, keep)
    small = COLLAPSED_GRAD_REL
    cases = []
    z = b["z"].double()
    z[roi] = 0.3  # the reported case: one ROI constant 0.3, no sharing
    cases.append(("roi_constant_0.3", z, *plan6, released(False), small))
    cases.append(("batch_constant_0.3_shared", torch.full_like(z, 0.3), *plan6, released(True), small))
    z = b["z"].double()
    z[roi] = vector[:, None, None]
    cases.append(("roi_constant_vector", z, *plan6, released(False), small))
    z = vector[None, :, None, None].expand_as(z).clone()
    cases.append(("batch_constant_vector_shared", z, *plan6, released(True), small))
    z = b["z"].double()
    z[roi] = near(vector[:, None, None].expand_as(z[roi]))
    cases.append(("roi_nearly_constant", z, *plan6, released(False), small))
    z = near(vector[None, :, None, None].expand_as(z))
    cases.append(("batch_nearly_constant_shared", z, *plan6, released(True), small))
    cases.append(("batch_nearly_constant", z, *plan6, released(False), small))
    b = blob_batch(32, 28, 28, 8, seed=1)
    z = torch.full_like(b["z"], 0.3).double()
    cases.append(("large_batch_constant_0.3_shared", z, *plan(b, 1), released(True), COLLAPSED_GRAD_REL_LARGE))
    return [(name, z.float().double(), *rest) for name, z, *rest in cases]  # float32 values


def reference_plan(batch):
    """labels and sqdist of a blob batch, by the reference."""
    labels = ref.partition(batch["masks"], batch["cams"], batch["is_novel"])
    sqdist = ref.boundary_sqdist(batch["masks"])
    return labels, sqdist


def fused_loss_and_grad(impl, z, *args, **kw):
    """(loss, dloss/dz) of impl.query_sharing_contrastive_loss(z, *args, **kw)."""
    z = z.clone().requires_grad_(True)
    loss = impl.query_sharing_contrastive_loss(z, *args, **kw)
    (g,) = torch.autograd.grad(loss, z)
    return loss, g


# ---------------------------------------------------------------- baselines of the device tests


def plan_steps(partition, boundary_sqdist, sample_keys, b, valid, kw, seed):
    """(labels, sqdist, keys, keep) of the three plan steps given as functions."""
    labels = partition(b["masks"], b["cams"], b["is_novel"], valid=valid)
    sqdist = boundary_sqdist(b["masks"])
    keys, keep = sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    return labels, sqdist, keys, keep


def baseline_plan(device, b, valid, kw, seed):
    """(labels, sqdist, keys, keep) of the three plan steps on the CPU inputs b: the reference for the
    cpu device, the CPU kernels for the others."""
    if device.kind == "cpu":
        return plan_steps(ref.partition, ref.boundary_sqdist, ref.sample_keys, b, valid, kw, seed)
    return plan_steps(
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
