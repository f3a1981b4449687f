"""LossStats: what query_sharing_contrastive_loss(..., return_stats=True) returns beside the loss, on both
paths (DESIGN: public API)."""
from typing import NamedTuple

import torch
from torch import Tensor


class LossStats(NamedTuple):
    """Detached statistics of one loss call."""

    kept: Tensor  # int64 0-dim: number of kept ROIs
    keys_per_set: Tensor  # int64 (4,): EF, HF, EB, HB key counts over kept ROIs
    q_pos: Tensor  # (C,) with share_queries, else (N, C) (zero rows for dropped ROIs)
    q_neg: Tensor


def loss_stats(keys: Tensor, keep: Tensor, queries: Tensor, share_queries: bool) -> LossStats:
    """LossStats from the key bits, keep and the queries (G, 2, C), or the compiled op's (G, 4, C) whose rows
    2 and 3 are the lo parts of q+ and q- (left out here: q_pos and q_neg are the queries rounded to the
    accumulation dtype). Masks with keep instead of indexing with it, so nothing waits for the device (no
    host sync) and the shapes do not depend on the data."""
    n, h, w = keys.shape
    bits = torch.arange(4, device=keys.device, dtype=torch.uint8).view(1, 4, 1)
    in_set = ((keys.reshape(n, 1, h * w) >> bits) & 1) * keep.view(n, 1, 1)
    per_set = in_set.sum(dim=(0, 2), dtype=torch.int64)
    queries = queries.detach()
    if share_queries:
        q_pos, q_neg = queries[0, 0], queries[0, 1]
    else:
        q_pos, q_neg = queries[:, 0], queries[:, 1]
    return LossStats(kept=keep.sum(dtype=torch.int64), keys_per_set=per_set, q_pos=q_pos, q_neg=q_neg)
