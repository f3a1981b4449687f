"""The per-ROI pipeline: what the authors' released code does every iteration, written afresh.

Masks and CAMs go to the CPU; a Python loop over ROIs partitions each one, runs
`scipy.ndimage.distance_transform_edt` for the boundary band of base ROIs and draws keys with
`random.sample`; the key sets go back to z's device as boolean masks, and the loss gathers keys by
boolean indexing and is computed with ordinary PyTorch ops.

It follows SPEC.md's definitions (partition, 4-neighbour boundary, d^2 <= hard_sqdist band, min_keys
rule, k = ceil(sigma * c)) so the key sets have the same sizes as the fused sampler's, but it draws
them with Python's `random` instead of the spec's hash, so the pixels differ.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

NUM_SETS = 4  # easy-fg, hard-fg, easy-bg, hard-bg


@dataclass
class PerRoiPlan:
    foreground: torch.Tensor  # (N, H, W) bool, CPU: label-1 pixels (query partition)
    background: torch.Tensor  # (N, H, W) bool, CPU: label-0 pixels
    keys: torch.Tensor  # (4, N, H, W) bool, CPU: sampled key pixels of each set
    keep: torch.Tensor  # (N,) bool, CPU


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other value (both sides of every transition)."""
    edge = np.zeros_like(mask)
    vertical = mask[1:, :] != mask[:-1, :]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def _candidate_sets(mask, cam, novel, delta, hard_sqdist):
    """The four candidate sets of one ROI, plus its foreground and background partitions."""
    if novel:
        fg = cam >= np.float32(1.0 - delta)
        bg = (cam <= np.float32(delta)) & ~fg
        return fg, bg, (fg, fg, bg, bg)
    fg = mask
    bg = ~mask
    edge = _boundary(mask)
    if edge.any():
        # distance_transform_edt measures the distance to the nearest zero, so zero out the boundary.
        hard = np.rint(distance_transform_edt(~edge) ** 2) <= hard_sqdist
    else:
        hard = np.zeros_like(mask)
    return fg, bg, (fg & ~hard, fg & hard, bg & ~hard, bg & hard)


def plan(masks, cams, is_novel, *, delta=0.1, sigma=0.3, hard_sqdist=2, min_keys=5,
         rng: random.Random | None = None) -> PerRoiPlan:
    """Partition, boundary distance and key sampling, one ROI at a time on the CPU."""
    rng = rng or random.Random(0)
    masks_np = masks.detach().to("cpu").numpy().astype(bool)
    cams_np = cams.detach().to("cpu", torch.float32).numpy()
    novel_np = is_novel.detach().to("cpu").numpy()
    n, h, w = masks_np.shape
    foreground = np.zeros((n, h, w), dtype=bool)
    background = np.zeros((n, h, w), dtype=bool)
    keys = np.zeros((NUM_SETS, n, h * w), dtype=bool)
    keep = np.zeros(n, dtype=bool)
    for roi in range(n):
        fg, bg, sets = _candidate_sets(masks_np[roi], cams_np[roi], bool(novel_np[roi]), delta,
                                       hard_sqdist)
        foreground[roi], background[roi] = fg, bg
        candidates = [np.flatnonzero(s).tolist() for s in sets]
        if not fg.any() or not bg.any() or min(len(c) for c in candidates) < min_keys:
            continue
        keep[roi] = True
        for set_id, pixels in enumerate(candidates):
            count = min(len(pixels), math.ceil(sigma * len(pixels)))
            keys[set_id, roi, rng.sample(pixels, count)] = True
    return PerRoiPlan(
        foreground=torch.from_numpy(foreground),
        background=torch.from_numpy(background),
        keys=torch.from_numpy(keys.reshape(NUM_SETS, n, h, w)),
        keep=torch.from_numpy(keep),
    )


def _cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return (keys @ query) / (keys.norm(dim=1).clamp_min(1e-8) * query.norm().clamp_min(1e-8))


def _term(query, positives, negatives, tau):
    """T(q, P, G, tau) of SPEC step 6."""
    if positives.shape[0] == 0:
        return query.new_zeros(())
    s_pos = _cosine(query, positives) / tau
    if negatives.shape[0] == 0:  # the denominator is the positive's own term alone
        lse_neg = s_pos.new_tensor(float("-inf"))
    else:
        lse_neg = torch.logsumexp(_cosine(query, negatives) / tau, dim=0)
    return (torch.logaddexp(s_pos, lse_neg) - s_pos).mean()


def loss(z: torch.Tensor, plan: PerRoiPlan, *, tau_easy=0.7, tau_hard=0.3) -> torch.Tensor:
    """Query-sharing loss from a per-ROI plan: queries by masked means, keys by boolean indexing."""
    device = z.device
    keep = plan.keep.to(device)
    if not bool(keep.any()):
        return z.sum() * 0.0
    features = z if z.dtype == torch.float64 else z.float()  # accumulate in float32 (float64 for float64)
    fg = plan.foreground.to(device)[keep].unsqueeze(1)
    bg = plan.background.to(device)[keep].unsqueeze(1)
    kept = features[keep]
    mu_pos = (kept * fg).sum(dim=(2, 3)) / fg.sum(dim=(2, 3))
    mu_neg = (kept * bg).sum(dim=(2, 3)) / bg.sum(dim=(2, 3))
    q_pos, q_neg = mu_pos.mean(dim=0), mu_neg.mean(dim=0)
    pixels = features.permute(0, 2, 3, 1)  # (N, H, W, C) so a boolean mask gathers (K, C) keys
    easy_fg, hard_fg, easy_bg, hard_bg = (pixels[m.to(device)] for m in plan.keys)
    return (_term(q_pos, easy_fg, easy_bg, tau_easy) + _term(q_pos, hard_fg, hard_bg, tau_hard)
            + _term(q_neg, easy_bg, easy_fg, tau_easy) + _term(q_neg, hard_bg, hard_fg, tau_hard)
            ).to(z.dtype)


def query_sharing_contrastive_loss(z, masks, cams, is_novel, *, rng=None, **params):
    """The whole per-ROI pipeline: plan on the CPU, loss on z's device."""
    plan_params = {k: params[k] for k in ("delta", "sigma", "hard_sqdist", "min_keys") if k in params}
    loss_params = {k: params[k] for k in ("tau_easy", "tau_hard") if k in params}
    return loss(z, plan(masks, cams, is_novel, rng=rng, **plan_params), **loss_params)
