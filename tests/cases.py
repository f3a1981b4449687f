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
