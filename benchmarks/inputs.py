"""Realistic benchmark inputs: blobby object masks, CAMs that roughly agree with them, half the ROIs novel.

Masks are thresholded smooth noise plus a centred bump (objects tend to fill the middle of their box), so
they have one or a few blobs with smooth boundaries, like mask targets cropped to 28x28 ROIs. CAMs are a
sigmoid of a smoothed signed distance-like field of the mask with noise, so a novel ROI has a confident
foreground core, a confident background and an uncertain band in between (labels 1, 0 and -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SEED = 20220601  # fixed so every implementation and every run sees the same inputs
KEY_SEED = 1234  # sampler seed passed to the implementations that take one


@dataclass
class Batch:
    z: torch.Tensor  # (N, C, H, W), leaf with requires_grad
    masks: torch.Tensor  # (N, H, W) bool
    cams: torch.Tensor  # (N, H, W) float32 in [0, 1]
    is_novel: torch.Tensor  # (N,) bool

    @property
    def num_rois(self) -> int:
        return self.z.shape[0]


def _smooth_noise(n: int, h: int, w: int, cells: int, gen: torch.Generator) -> torch.Tensor:
    """Low-frequency noise: a coarse random grid upsampled bicubically to (n, h, w)."""
    coarse = torch.randn(n, 1, cells, cells, generator=gen)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[:, 0]


def make_masks_and_cams(n: int, h: int = 28, w: int = 28, seed: int = SEED):
    """Masks (n, h, w) bool and CAMs (n, h, w) float32, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, h).view(h, 1)
    xs = torch.linspace(-1, 1, w).view(1, w)
    # Centred elliptic bump with a random aspect ratio per ROI.
    aspect = torch.empty(n, 1, 1).uniform_(0.6, 1.6, generator=gen)
    bump = 1.5 - (ys**2 * aspect + xs**2 / aspect) * 2.0
    field = bump + 0.9 * _smooth_noise(n, h, w, 5, gen)
    # Per-ROI threshold so the foreground covers 20-70 % of the box.
    coverage = torch.empty(n).uniform_(0.2, 0.7, generator=gen)
    ranked = field.flatten(1).sort(dim=1, descending=True).values
    rank = (coverage * (h * w)).long().clamp(1, h * w - 1)
    thresholds = ranked.gather(1, rank.view(n, 1)).view(n, 1, 1)
    masks = field > thresholds
    # CAM: a noisy, blurred view of the same field; ~30 % of the pixels fall in the uncertain band.
    cam_field = (field - thresholds) + 0.4 * _smooth_noise(n, h, w, 7, gen)
    cams = torch.sigmoid(cam_field * 4.0).float()
    return masks, cams


def make_batch(n: int, c: int, h: int = 28, w: int = 28, dtype=torch.float32,
               device="cpu", seed: int = SEED) -> Batch:
    """One batch of ROIs; the first half (rounded down) of the ROIs are base, the rest novel, shuffled."""
    masks, cams = make_masks_and_cams(n, h, w, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    is_novel = torch.zeros(n, dtype=torch.bool)
    is_novel[torch.randperm(n, generator=gen)[: n // 2]] = True
    z = torch.randn(n, c, h, w, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    z.requires_grad_(True)
    return Batch(z=z, masks=masks.to(device), cams=cams.to(device), is_novel=is_novel.to(device))
