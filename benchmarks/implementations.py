"""The three implementations under test, behind one small interface.

Each implementation offers the same three calls on a `Batch` (benchmarks/inputs.py):
  plan(batch)            -> an opaque plan (partition + boundary distance + key sampling)
  loss(z, plan)          -> the loss from that plan (forward; call .backward() for the gradient)
  pipeline(z, batch)     -> plan and loss in one call, as a training step would run it
All use the spec's default parameters (delta 0.1, sigma 0.3, tau 0.7/0.3, hard_sqdist 2, min_keys 5).
"""
from __future__ import annotations

import random

import torch

from .inputs import KEY_SEED, Batch

IMPLEMENTATIONS = ("fused", "reference", "per_roi")


class Fused:
    """contrastmask_ops' public API (compiled kernels; the reference if the extension is not built)."""

    name = "fused"

    def __init__(self):
        import contrastmask_ops as cm

        self.cm = cm
        self.compiled = bool(cm.build_info()["extension"])

    def plan(self, batch: Batch):
        if self.compiled:  # the fused per-ROI kernel, exactly what query_sharing_contrastive_loss runs
            return torch.ops.contrastmask.roi_plan(batch.masks, batch.cams, batch.is_novel, None, 0.1, 0.3, 2, 5,
                                                   KEY_SEED)
        return _plan_from_blocks(self.cm, batch)

    def loss(self, z, plan):
        labels, keys, keep = plan
        return self.cm.contrastive_loss_from_keys(z, labels, keys, keep)

    def pipeline(self, z, batch: Batch):
        return self.cm.query_sharing_contrastive_loss(z, batch.masks, batch.cams, batch.is_novel, seed=KEY_SEED)


class Reference(Fused):
    """contrastmask_ops.reference: the pure-PyTorch loss a user would otherwise write."""

    name = "reference"

    def __init__(self):
        import contrastmask_ops.reference as ref

        self.cm = ref
        self.compiled = False


def _plan_from_blocks(api, batch: Batch):
    """partition -> boundary_sqdist -> sample_keys through the public building blocks."""
    labels = api.partition(batch.masks, batch.cams, batch.is_novel)
    sqdist = api.boundary_sqdist(batch.masks)
    keys, keep = api.sample_keys(labels, sqdist, batch.is_novel, seed=KEY_SEED)
    return labels, keys, keep


class PerRoi:
    """The released code's per-ROI pipeline (benchmarks/baselines/per_roi.py)."""

    name = "per_roi"

    def __init__(self):
        from .baselines import per_roi  # needs scipy: imported only when this column runs

        self._impl = per_roi
        self.rng = random.Random(KEY_SEED)

    def plan(self, batch: Batch):
        return self._impl.plan(batch.masks, batch.cams, batch.is_novel, rng=self.rng)

    def loss(self, z, plan):
        return self._impl.loss(z, plan)

    def pipeline(self, z, batch: Batch):
        return self._impl.query_sharing_contrastive_loss(z, batch.masks, batch.cams, batch.is_novel, rng=self.rng)


def make(name: str):
    return {"fused": Fused, "reference": Reference, "per_roi": PerRoi}[name]()
