"""Helpers shared by the op tests (test_ops.py against the reference, test_devices.py by device)."""
import torch


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
