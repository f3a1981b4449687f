"""Public functions. Each runs the compiled operator when the extension holds kernels for the device of
its tensors, else the pure-PyTorch reference (with a one-time warning). Semantics: docs/SPEC.md and
docs/DESIGN.md. Arguments are validated by contrastmask_ops._validation on both paths."""
from typing import Optional

import torch
from torch import Tensor

from . import _autocast, _ext, _validation, fake_kernels, global_batch, reference
from ._seed import Seed, seed_or_draw, seeded_overload
from .stats import loss_stats

if _ext.HAS_EXTENSION:
    fake_kernels.register()
    _autocast.register()
    _ops = torch.ops.contrastmask


def _use_kernels(x) -> bool:
    """True when the compiled library holds kernels for the device of x (the call's first tensor); else
    warns once per device type and the caller uses the reference. A non-tensor x is judged as a CPU
    tensor: validation then names it."""
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if device_type in _ext.KERNEL_DEVICE_TYPES:
        return True
    _ext.warn_fallback_once(device_type)
    return False


def partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *, delta: float = 0.1,
              valid: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """Label per pixel: 1 foreground, 0 background, -1 ignored (int8, (N, H, W)). check_inputs=False skips the
    checks of the masks' 0/1 values and of CAMs for novel ROIs, present and free of NaN (on CUDA host syncs;
    off, the call can be captured in a CUDA graph): bad values then give unspecified labels instead of an
    error."""
    if not _use_kernels(masks):
        return reference.partition(masks, cams, is_novel, delta=delta, valid=valid, check_inputs=check_inputs)
    delta = _validation.partition_args(masks, cams, is_novel, valid, delta)
    check_inputs = _validation.flag("check_inputs", check_inputs)
    labels = _ops.partition(masks, cams, is_novel, valid, delta, check_inputs)
    _validation.check_cam_values_after_kernel(cams, is_novel, check_inputs)
    return labels


def boundary_sqdist(masks: Tensor, *, check_inputs: bool = True) -> Tensor:
    """Exact squared Euclidean distance of every pixel to its mask's boundary (int32, (N, H, W));
    INT32_MAX where a mask has no boundary. check_inputs: as for partition."""
    if not _use_kernels(masks):
        return reference.boundary_sqdist(masks, check_inputs=check_inputs)
    _validation.check_masks(masks)
    return _ops.boundary_sqdist(masks, _validation.flag("check_inputs", check_inputs))


def sample_keys(labels: Tensor, sqdist: Tensor, is_novel: Tensor, *, sigma: float = 0.3, hard_sqdist: int = 2,
                min_keys: int = 5, seed: Seed = None, roi_offset: int = 0):
    """Deterministic key sample: (keys uint8 (N, H, W) with bit s set for set s in EF, HF, EB, HB;
    keep bool (N,)). ROI n is sampled as ROI n + roi_offset of a larger batch, so a batch split into
    slices [a:b], each sampled with roi_offset=a, gets the keys of the whole batch. seed: an integer, a 0-dim
    int64 tensor on the CPU or the tensors' device (the same keys as the integer; read on the device, and a
    compiled graph takes a new one each call without recompiling), or None (drawn; not under torch.compile)."""
    if not _use_kernels(labels):
        return reference.sample_keys(labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist,
                                     min_keys=min_keys, seed=seed, roi_offset=roi_offset)
    sigma, hard_sqdist, min_keys, seed, roi_offset = _validation.sample_keys_args(
        labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed,
        roi_offset=roi_offset)
    seed = seed_or_draw(seed)
    op = seeded_overload(_ops.sample_keys, seed)
    return op(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed, roi_offset)


def contrastive_loss_from_keys(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, *, tau_easy: float = 0.7,
                               tau_hard: float = 0.3, share_queries: bool = True,
                               formulation: str = "paper") -> Tensor:
    """The query-sharing contrastive loss (Eqs. 1, 2, 4) from explicit key sets; differentiable in z.
    Lets a detector with its own sampling reuse the loss. 0-dim, z's dtype (float32 for a float16/bfloat16
    z under autocast)."""
    if not _use_kernels(z):
        return reference.contrastive_loss_from_keys(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard,
                                                    share_queries=share_queries, formulation=formulation)
    params = _validation.loss_from_keys_args(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard,
                                             share_queries=share_queries, formulation=formulation)
    return _ops.contrastive_loss(z, labels, keys, keep, *params)[0]


# A deliberate twin of reference.py's: the two paths keep one public signature (tests/ops/test_dispatch.py,
# test_both_paths_keep_one_public_signature holds them to it).
def query_sharing_contrastive_loss(z: Tensor, masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *,
                                   valid: Optional[Tensor] = None, delta: float = 0.1, sigma: float = 0.3,
                                   tau_easy: float = 0.7, tau_hard: float = 0.3, hard_sqdist: int = 2,
                                   min_keys: int = 5, share_queries: bool = True, formulation: str = "paper",
                                   seed: Seed = None, return_stats: bool = False, process_group=None,
                                   check_inputs: bool = True):
    """The whole pipeline: partition + boundary distance + key sampling fused in one per-ROI kernel,
    then the loss. Returns the loss (0-dim, z's dtype; float32 for a float16/bfloat16 z under autocast),
    or (loss, LossStats) with return_stats. seed: as for sample_keys (an integer or a 0-dim int64 tensor
    may change every step under torch.compile without recompiling). check_inputs: as for partition; with
    check_inputs=False and a seed tensor on the device, the CUDA pipeline has no host sync (CUDA graphs).

    process_group (a torch.distributed ProcessGroup; every rank of it calls this with its own ROIs and the
    same parameters and seed): the loss of all ranks' ROIs concatenated in rank order, the same value on
    every rank, and each rank's gradient for its z is that loss's gradient for its rows. Only O(C)
    numbers cross processes (DESIGN, "Global query sharing"). Under DistributedDataParallel, which
    averages gradients over ranks, multiply this loss by the world size to train as one process would on
    the whole batch. LossStats then hold this rank's kept ROIs and keys and the global queries."""
    if not _use_kernels(z):
        return reference.query_sharing_contrastive_loss(
            z, masks, cams, is_novel, valid=valid, delta=delta, sigma=sigma, tau_easy=tau_easy, tau_hard=tau_hard,
            hard_sqdist=hard_sqdist, min_keys=min_keys, share_queries=share_queries, formulation=formulation,
            seed=seed, return_stats=return_stats, process_group=process_group, check_inputs=check_inputs)
    options = dict(delta=delta, sigma=sigma, tau_easy=tau_easy, tau_hard=tau_hard, hard_sqdist=hard_sqdist,
                   min_keys=min_keys, share_queries=share_queries, formulation=formulation, seed=seed,
                   return_stats=return_stats)
    group = _validation.process_group_param(process_group)
    if group is not None:
        return global_batch.kernel_global_loss(_ops, group, z, masks, cams, is_novel, valid, options, check_inputs)
    plan, params = _validation.pipeline_args(z, masks, cams, is_novel, valid, **options)
    check_inputs = _validation.flag("check_inputs", check_inputs)
    seed = seed_or_draw(plan.seed)
    labels, keys, keep = seeded_overload(_ops.roi_plan, seed)(masks, cams, is_novel, valid, plan.delta, plan.sigma,
                                                              plan.hard_sqdist, plan.min_keys, seed, 0, check_inputs)
    _validation.check_cam_values_after_kernel(cams, is_novel, check_inputs)
    loss, queries, _, _ = _ops.contrastive_loss(z, labels, keys, keep, *params)
    if return_stats:
        return loss, loss_stats(keys, keep, queries, params.share_queries)
    return loss
