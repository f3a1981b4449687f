"""Class activation maps (Zhou et al. 2016) of ROIs, resized and min-max normalised per ROI."""
import torch.nn.functional as F


def normalize_per_roi(cams, eps=1e-6):
    """(N, H, W) -> (N, H, W) scaled to [0, 1] per ROI; a flat map becomes all zeros."""
    flat = cams.flatten(1)
    low = flat.amin(1)[:, None, None]
    high = flat.amax(1)[:, None, None]
    return (cams - low) / (high - low).clamp_min(eps)


def resize_cams(cams, size):
    """(N, h, w) raw CAMs -> (N, size, size), bilinear, then normalised to [0, 1] per ROI.

    Normalising after resizing gives every ROI a map that reaches exactly 0 and 1 at that size.
    """
    resized = F.interpolate(cams[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return normalize_per_roi(resized)
