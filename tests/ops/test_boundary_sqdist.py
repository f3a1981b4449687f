"""boundary_sqdist: the reference against scipy's exact EDT and a naive boundary, and an all-foreground mask on
both paths (the reference and the kernels). On every device it runs with the plan (test_roi_plan.py)."""
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

from blobs import blob_masks
from cases import IMPLS, INT32_MAX
from contrastmask_ops import reference as ref


def naive_boundary(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    b = np.zeros_like(mask, dtype=bool)
    for r in range(h):
        for c in range(w):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] != mask[r, c]:
                    b[r, c] = True
    return b


def scipy_sqdist(mask: np.ndarray) -> np.ndarray:
    """Exact squared EDT to the boundary from scipy's nearest-boundary-pixel indices."""
    b = naive_boundary(mask) if mask.size <= 1024 else np.asarray(ref.boundary_pixels(torch.from_numpy(mask)[None])[0])
    if not b.any():
        return np.full(mask.shape, INT32_MAX, dtype=np.int64)
    idx = scipy.ndimage.distance_transform_edt(~b, return_distances=False, return_indices=True)
    rows, cols = np.indices(mask.shape)
    return (rows - idx[0]) ** 2 + (cols - idx[1]) ** 2


def test_boundary_pixels_match_definition():
    g = torch.Generator().manual_seed(1)
    masks = blob_masks(20, 9, 13, generator=g)
    got = ref.boundary_pixels(masks)
    for m, b in zip(masks.numpy(), got.numpy()):
        np.testing.assert_array_equal(b, naive_boundary(m))


@pytest.mark.parametrize("h,w", [(28, 28), (13, 21), (21, 13), (1, 17), (17, 1), (1, 1), (2, 2), (64, 64),
                                 (1, 4096), (4096, 1), (5, 700)])
def test_reference_matches_scipy(h, w):
    g = torch.Generator().manual_seed(h * 10007 + w)
    n = 12 if h * w <= 1024 else 3
    masks = blob_masks(n, h, w, generator=g, empty_frac=0.1, full_frac=0.1)
    masks[0] = torch.rand(h, w, generator=g) < 0.5  # salt and pepper
    got = ref.boundary_sqdist(masks)
    assert got.dtype == torch.int32 and got.shape == (n, h, w)
    for m, d in zip(masks.numpy(), got.numpy()):
        np.testing.assert_array_equal(d.astype(np.int64), scipy_sqdist(m))


def test_reference_on_special_masks():
    masks = torch.zeros(4, 7, 9, dtype=torch.uint8)
    masks[1] = 1  # all 1
    masks[2, 3, 4] = 1  # single pixel: boundary = the pixel and its 4 neighbours
    masks[3, 0, :] = 1  # a border row
    d = ref.boundary_sqdist(masks)
    assert (d[0] == INT32_MAX).all() and (d[1] == INT32_MAX).all()
    assert d[2, 3, 4] == 0 and d[2, 2, 4] == 0 and d[2, 3, 5] == 0 and d[2, 2, 3] == 1
    assert d[2, 0, 0] == 3 ** 2 + 3 ** 2  # nearest boundary pixel: (3, 3)
    assert d[3, 0, 5] == 0 and d[3, 1, 5] == 0 and d[3, 2, 5] == 1 and d[3, 6, 0] == 25
    for m, dd in zip(masks.numpy(), d.numpy()):
        np.testing.assert_array_equal(dd.astype(np.int64), scipy_sqdist(m))


def test_reference_empty_batch_and_float_masks():
    assert ref.boundary_sqdist(torch.zeros(0, 5, 6)).shape == (0, 5, 6)
    g = torch.Generator().manual_seed(3)
    masks = blob_masks(5, 10, 12, generator=g)
    torch.testing.assert_close(ref.boundary_sqdist(masks.to(torch.float16)), ref.boundary_sqdist(masks))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_foreground_mask_has_no_boundary(impl):
    masks = torch.ones(2, 13, 21, dtype=torch.bool)
    masks[1] = False
    d = impl.boundary_sqdist(masks)
    assert (d == 2**31 - 1).all()
    labels = impl.partition(masks, None, torch.zeros(2, dtype=torch.bool))
    keys, keep = impl.sample_keys(labels, d, torch.zeros(2, dtype=torch.bool), min_keys=0, seed=0)
    assert not keep.any() and keys.sum() == 0  # one partition is empty
