"""Public functions. Each runs the compiled operator when the extension is built, else the
pure-PyTorch reference (with one warning). Semantics: ../shared/SPEC.md and docs/DESIGN.md."""
from typing import Optional

import torch
from torch import Tensor

from . import _ext, reference
from .reference import LossStats

if _ext.HAS_EXTENSION:
    from . import ops as _registered  # noqa: F401  (fake kernels and autograd)

    _ops = torch.ops.contrastmask


def _use_kernels() -> bool:
    if _ext.HAS_EXTENSION:
        return True
    _ext.warn_fallback_once()
    return False


def seed_to_int64(seed: Optional[int]) -> int:
    """The seed's 64 bits as a signed int64 (SPEC: seed taken mod 2^64); None draws one from torch's
    default generator, so torch.manual_seed makes the sampler reproducible."""
    if seed is None:
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *, delta: float = 0.1,
              valid: Optional[Tensor] = None) -> Tensor:
    """Label per pixel: 1 foreground, 0 background, -1 ignored (int8, (N, H, W))."""
    if not _use_kernels():
        return reference.partition(masks, cams, is_novel, delta=delta, valid=valid)
    return _ops.partition(masks, cams, is_novel, valid, float(delta))


def boundary_sqdist(masks: Tensor) -> Tensor:
    """Exact squared Euclidean distance of every pixel to its mask's boundary (int32, (N, H, W));
    INT32_MAX where a mask has no boundary."""
    if not _use_kernels():
        return reference.boundary_sqdist(masks)
    return _ops.boundary_sqdist(masks)


def sample_keys(labels: Tensor, sqdist: Tensor, is_novel: Tensor, *, sigma: float = 0.3, hard_sqdist: int = 2,
                min_keys: int = 5, seed: Optional[int] = None):
    """Deterministic key sample: (keys uint8 (N, H, W) with bit s set for set s in EF, HF, EB, HB;
    keep bool (N,))."""
    if not _use_kernels():
        return reference.sample_keys(labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist,
                                     min_keys=min_keys, seed=seed)
    return _ops.sample_keys(labels, sqdist, is_novel, float(sigma), int(hard_sqdist), int(min_keys),
                            seed_to_int64(seed))


def _loss_with_aux(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation):
    return _ops.contrastive_loss(z, labels, keys, keep, float(tau_easy), float(tau_hard), bool(share_queries),
                                 str(formulation))


def contrastive_loss_from_keys(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, *, tau_easy: float = 0.7,
                               tau_hard: float = 0.3, share_queries: bool = True,
                               formulation: str = "paper") -> Tensor:
    """The query-sharing contrastive loss (Eqs. 1, 2, 4) from explicit key sets; differentiable in z.
    Lets a detector with its own sampling reuse the loss."""
    if not _use_kernels():
        return reference.contrastive_loss_from_keys(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard,
                                                    share_queries=share_queries, formulation=formulation)
    return _loss_with_aux(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation)[0]


def _stats(keys: Tensor, keep: Tensor, queries: Tensor, share_queries: bool) -> LossStats:
    bits = torch.arange(4, device=keys.device, dtype=torch.uint8)
    in_set = (keys[keep].unsqueeze(-1) >> bits) & 1
    per_set = in_set.reshape(-1, 4).sum(0, dtype=torch.int64)
    queries = queries.detach()
    if share_queries:
        q_pos, q_neg = queries[0, 0], queries[0, 1]
    else:
        q_pos, q_neg = queries[:, 0], queries[:, 1]
    return LossStats(kept=keep.sum(dtype=torch.int64), keys_per_set=per_set, q_pos=q_pos, q_neg=q_neg)


def query_sharing_contrastive_loss(z: Tensor, masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *,
                                   valid: Optional[Tensor] = None, delta: float = 0.1, sigma: float = 0.3,
                                   tau_easy: float = 0.7, tau_hard: float = 0.3, hard_sqdist: int = 2,
                                   min_keys: int = 5, share_queries: bool = True, formulation: str = "paper",
                                   seed: Optional[int] = None, return_stats: bool = False):
    """The whole pipeline: partition + boundary distance + key sampling fused in one per-ROI kernel,
    then the loss. Returns the loss (0-dim, z's dtype), or (loss, LossStats) with return_stats."""
    if not _use_kernels():
        return reference.query_sharing_contrastive_loss(
            z, masks, cams, is_novel, valid=valid, delta=delta, sigma=sigma, tau_easy=tau_easy, tau_hard=tau_hard,
            hard_sqdist=hard_sqdist, min_keys=min_keys, share_queries=share_queries, formulation=formulation,
            seed=seed, return_stats=return_stats)
    labels, keys, keep = _ops.roi_plan(masks, cams, is_novel, valid, float(delta), float(sigma), int(hard_sqdist),
                                       int(min_keys), seed_to_int64(seed))
    loss, queries, _, _ = _loss_with_aux(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation)
    if return_stats:
        return loss, _stats(keys, keep, queries, share_queries)
    return loss
