"""Deterministic, realistic test batches: blobby masks, smooth CAMs and mask-correlated features.

Torch only, generated on the CPU from a seeded generator (identical on every machine), then moved.
"""
import math

import torch


def _grid(h: int, w: int):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    return yy, xx  # (H, W) each


def blob_masks(n: int, h: int, w: int, *, generator: torch.Generator, max_blobs: int = 3,
               empty_frac: float = 0.05, full_frac: float = 0.05) -> torch.Tensor:
    """bool (n, h, w): unions of 1..max_blobs random rotated ellipses. Centres may lie slightly outside
    the grid, so some blobs touch the border; a fraction of rows is all 0 or all 1."""
    yy, xx = _grid(h, w)
    size = torch.tensor([h, w], dtype=torch.float32)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    n_blobs = torch.randint(1, max_blobs + 1, (n,), generator=generator)
    for b in range(max_blobs):
        centre = (torch.rand(n, 2, generator=generator) * 1.4 - 0.2) * size  # (n, 2) row, col
        radii = (torch.rand(n, 2, generator=generator) * 0.4 + 0.1) * size + 0.5
        angle = torch.rand(n, generator=generator) * math.pi
        dy = yy - centre[:, 0, None, None]
        dx = xx - centre[:, 1, None, None]
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        u = (dy * cos + dx * sin) / radii[:, 0, None, None]
        v = (-dy * sin + dx * cos) / radii[:, 1, None, None]
        inside = u.square() + v.square() <= 1.0
        masks |= inside & (b < n_blobs)[:, None, None]
    kind = torch.rand(n, generator=generator)
    masks[kind < empty_frac] = False
    masks[(kind >= empty_frac) & (kind < empty_frac + full_frac)] = True
    return masks


def blob_cams(masks: torch.Tensor, *, generator: torch.Generator, n_bumps: int = 3) -> torch.Tensor:
    """float32 (n, h, w) in [0, 1]: a blurred copy of the mask plus random Gaussian bumps, min-max scaled
    per ROI, so every CAM reaches 0 and 1 and has values on both sides of delta and 1 - delta."""
    n, h, w = masks.shape
    yy, xx = _grid(h, w)
    scale = float(max(h, w))
    raw = masks.float()
    if h > 2 and w > 2:  # a 3x3 box blur smooths the mask's edge
        raw = torch.nn.functional.avg_pool2d(raw[:, None], 3, stride=1, padding=1, count_include_pad=False)[:, 0]
    for _ in range(n_bumps):
        centre = torch.rand(n, 2, generator=generator) * torch.tensor([h, w], dtype=torch.float32)
        width = (torch.rand(n, generator=generator) * 0.3 + 0.1) * scale
        amp = torch.rand(n, generator=generator) * 1.2 - 0.4
        d2 = (yy - centre[:, 0, None, None]).square() + (xx - centre[:, 1, None, None]).square()
        raw = raw + amp[:, None, None] * torch.exp(-d2 / (2 * width[:, None, None].square()))
    lo = raw.amin(dim=(1, 2), keepdim=True)
    hi = raw.amax(dim=(1, 2), keepdim=True)
    return ((raw - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


def blob_batch(n: int, h: int, w: int, c: int, *, seed: int, dtype: torch.dtype = torch.float32,
               novel_frac: float = 0.5, device="cpu", cams_dtype: torch.dtype = torch.float32) -> dict:
    """A batch of n ROIs: z (n, c, h, w) of dtype, masks bool, cams in [0, 1], is_novel bool, valid None.
    Foreground pixels share a mean direction in feature space, so the loss is meaningful."""
    g = torch.Generator().manual_seed(seed)
    masks = blob_masks(n, h, w, generator=g)
    cams = blob_cams(masks, generator=g)
    is_novel = torch.rand(n, generator=g) < novel_frac
    direction = torch.randn(c, generator=g)
    direction = direction / direction.norm().clamp_min(1e-6)
    sign = masks.float() * 2 - 1  # +1 foreground, -1 background
    z = torch.randn(n, c, h, w, generator=g) + 1.5 * sign[:, None] * direction[None, :, None, None]
    return dict(
        z=z.to(device=device, dtype=dtype),
        masks=masks.to(device),
        cams=cams.to(device=device, dtype=cams_dtype),
        is_novel=is_novel.to(device),
        valid=None,
    )
