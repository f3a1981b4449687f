"""The per-ROI baseline does the same work as the library: same partitions, kept ROIs and key-set sizes,
and with sigma = 1 (every candidate sampled, so no randomness left) the same loss and gradient."""
import torch

import contrastmask_ops.reference as ref

from .baselines import per_roi
from .inputs import make_batch


def _key_bits(keys):
    return torch.stack([(keys >> s) & 1 for s in range(4)]).bool()


def test_same_partitions_kept_rois_and_set_sizes():
    batch = make_batch(48, 8)
    labels = ref.partition(batch.masks, batch.cams, batch.is_novel)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(batch.masks), batch.is_novel, seed=3)
    plan = per_roi.plan(batch.masks, batch.cams, batch.is_novel)
    assert keep.any() and torch.equal(plan.keep, keep)
    assert torch.equal(plan.foreground, labels == 1) and torch.equal(plan.background, labels == 0)
    assert torch.equal(plan.keys.sum(dim=(2, 3)), _key_bits(keys).sum(dim=(2, 3)))


def test_full_sampling_gives_same_loss_and_grad():
    """With every candidate sampled (sigma=1) the per-ROI pipeline gives the reference's loss and gradient."""
    batch = make_batch(48, 8, dtype=torch.float64)
    labels = ref.partition(batch.masks, batch.cams, batch.is_novel)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(batch.masks), batch.is_novel, sigma=1.0, seed=3)
    plan = per_roi.plan(batch.masks, batch.cams, batch.is_novel, sigma=1.0)
    assert torch.equal(plan.keys, _key_bits(keys) & keep.view(1, -1, 1, 1))
    expected = ref.contrastive_loss_from_keys(batch.z, labels, keys, keep)
    (expected_grad,) = torch.autograd.grad(expected, batch.z)
    loss = per_roi.loss(batch.z, plan)
    (grad,) = torch.autograd.grad(loss, batch.z)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
