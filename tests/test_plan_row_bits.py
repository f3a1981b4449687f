"""The CPU fused plan's row-bitmask path (grids with W <= 64) against the three separate steps.

roi_plan on W <= 64 replaces the exact EDT by a dilation of the boundary rows and samples with a
bucket select; partition -> boundary_sqdist -> sample_keys (exact EDT, nth_element) and the Python
reference must give the identical labels, key bits and keep flags, for every hard_sqdist (negative,
zero, small, larger than any distance in the grid, beyond int32) and at the width limits (W = 1, 64
and 65, where the generic path takes over).
"""
import pytest
import torch

import contrastmask_ops as cm
from contrastmask_ops import reference as ref
from blobs import blob_batch

pytestmark = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")

INT32_MAX = 2**31 - 1
GRIDS = [(28, 28), (1, 64), (64, 1), (5, 64), (64, 64), (3, 65), (40, 70), (2, 2), (13, 21)]
HARD_SQDISTS = [-1, 0, 1, 2, 3, 8, 50, 10**6, INT32_MAX, 2**40]


def _steps(b, valid, seed, **kw):
    """The three separate CPU ops: partition, exact boundary_sqdist, sample_keys."""
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"], valid=valid)
    sqdist = cm.boundary_sqdist(b["masks"])
    keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    return labels, keys, keep


def _fused(b, valid, seed, sigma, hard_sqdist, min_keys):
    return torch.ops.contrastmask.roi_plan(b["masks"], b["cams"], b["is_novel"], valid, 0.1, sigma, hard_sqdist,
                                           min_keys, seed)


def _assert_same(fused, steps):
    for name, got, want in zip(("labels", "keys", "keep"), fused, steps):
        assert torch.equal(got, want), f"{name} differ"


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("hard_sqdist", HARD_SQDISTS)
def test_fused_plan_equals_steps(hw, hard_sqdist):
    b = blob_batch(12, hw[0], hw[1], 1, seed=hw[0] * 100 + hw[1])
    valid = torch.arange(12) % 5 != 3
    kw = dict(sigma=0.3, hard_sqdist=hard_sqdist, min_keys=1)
    fused = _fused(b, valid, 7, **kw)
    _assert_same(fused, _steps(b, valid, 7, **kw))
    assert fused[2].any(), "the case should keep some ROI, or it tests nothing"


@pytest.mark.parametrize("seed", range(6))
def test_fused_plan_equals_reference_across_seeds(seed):
    sigma = [0.3, 0.05, 0.55, 1.0, 0.999, 0.5][seed]
    hw = GRIDS[seed % len(GRIDS)]
    b = blob_batch(20, hw[0], hw[1], 1, seed=seed)
    kw = dict(sigma=sigma, hard_sqdist=[2, 5, 0, 2, 18, 1][seed], min_keys=[5, 0, 1, 3, 0, 2][seed])
    labels = ref.partition(b["masks"], b["cams"], b["is_novel"])
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(b["masks"]), b["is_novel"], seed=seed * 7919, **kw)
    _assert_same(_fused(b, None, seed * 7919, **kw), (labels, keys, keep))


@pytest.mark.parametrize("fill", [0, 1])
@pytest.mark.parametrize("hard_sqdist", [2, INT32_MAX - 1, INT32_MAX])
def test_masks_without_boundary(fill, hard_sqdist):
    """All-background / all-foreground base masks: d^2 = INT32_MAX everywhere (hard iff hard_sqdist >= it)."""
    n, h, w = 4, 9, 11
    masks = torch.full((n, h, w), bool(fill))
    cams = torch.rand(n, h, w, generator=torch.Generator().manual_seed(0))
    is_novel = torch.tensor([False, False, True, False])
    b = dict(masks=masks, cams=cams, is_novel=is_novel)
    kw = dict(sigma=0.5, hard_sqdist=hard_sqdist, min_keys=0)
    fused = _fused(b, None, 3, **kw)
    _assert_same(fused, _steps(b, None, 3, **kw))
    # Base ROIs have one empty partition, so none is kept.
    assert not fused[2][~is_novel].any()


def test_hard_band_is_the_disk_around_the_boundary():
    """A single foreground pixel: its boundary is the pixel and its 4 neighbours; the band for
    hard_sqdist = 2 is their 3x3 dilation (a 5x5 square minus its corners), counted by hand."""
    masks = torch.zeros(1, 9, 9, dtype=torch.bool)
    masks[0, 4, 4] = True
    sqdist = cm.boundary_sqdist(masks)[0]
    band = sqdist <= 2
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7, 2:7] = True
    for y, x in [(2, 2), (2, 6), (6, 2), (6, 6)]:
        expected[y, x] = False
    assert torch.equal(band, expected)
    # The fused plan's sets agree: with sigma = 1 every candidate is a key, so the key bits are the sets.
    labels, keys, keep = torch.ops.contrastmask.roi_plan(masks, None, torch.tensor([False]), None, 0.1, 1.0, 2, 0, 0)
    assert keep.item()
    hard = (keys[0] & 0b1010) != 0  # hard-fg or hard-bg
    assert torch.equal(hard, expected)
