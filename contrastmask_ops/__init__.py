"""contrastmask_ops: fused CPU/CUDA operators for ContrastMask's query-sharing pixel-level
contrastive loss (CVPR 2022), with a pure-PyTorch reference (contrastmask_ops.reference)."""
from . import reference
from ._ext import build_info
from .functional import (
    boundary_sqdist,
    contrastive_loss_from_keys,
    partition,
    query_sharing_contrastive_loss,
    sample_keys,
)
from .module import QuerySharingContrastiveLoss
from .stats import LossStats

__all__ = [
    "partition",
    "boundary_sqdist",
    "sample_keys",
    "contrastive_loss_from_keys",
    "query_sharing_contrastive_loss",
    "QuerySharingContrastiveLoss",
    "LossStats",
    "build_info",
    "reference",
]
__version__ = "0.1.0"
