"""Pure-PyTorch reference of the query-sharing contrastive loss (the test oracle and the fallback).

Semantics: docs/SPEC.md and docs/DESIGN.md ("Decisions"). Every step is vectorised over ROIs;
the key sampler's hash runs in numpy uint64 (torch has no full uint64 arithmetic on every device).
Where precision is a choice, the reference takes the most exact one: it is the oracle the kernels are
tested against.
"""
import math
import operator
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _validation, global_batch
from ._seed import Seed, draw_seed
from ._validation import INT32_MAX
from .global_batch import LOCAL
from .stats import loss_stats
from .torch_loss import loss as _loss

# Input validation: contrastmask_ops._validation, shared with the compiled path. The reference adds the two
# checks that read values (masks 0/1, cams present for novel ROIs), which the kernels do themselves, and
# then the NaN test of novel ROIs' CAMs, which the compiled path makes after its kernel.


# ---------------------------------------------------------------------------------------------
# Step 1: partition
# ---------------------------------------------------------------------------------------------

def _check_plan_values(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor) -> None:
    _validation.check_mask_values(masks)
    _validation.check_cams_present(cams, is_novel)
    _validation.check_cam_values(cams, is_novel)


def partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *, delta: float = 0.1,
              valid: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """Label per pixel: 1 foreground, 0 background, -1 ignored. int8 (N, H, W). check_inputs=False skips the
    checks that read values (bad values give unspecified labels)."""
    delta = _validation.partition_args(masks, cams, is_novel, valid, delta)
    if _validation.flag("check_inputs", check_inputs):
        _check_plan_values(masks, cams, is_novel)
    return _partition(masks, cams, is_novel, delta, valid)


def _partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, delta: float,
               valid: Optional[Tensor]) -> Tensor:
    labels = (masks != 0).to(torch.int8)
    if cams is not None:
        # DESIGN, "Thresholds in the CAM's dtype": thresholds rounded to cams.dtype; foreground tested first.
        hi = torch.tensor(1.0 - delta, dtype=cams.dtype, device=cams.device)
        lo = torch.tensor(delta, dtype=cams.dtype, device=cams.device)
        minus_one = torch.full_like(labels, -1)
        novel_labels = torch.where(cams >= hi, torch.ones_like(labels),
                                   torch.where(cams <= lo, torch.zeros_like(labels), minus_one))
        labels = torch.where(is_novel[:, None, None], novel_labels, labels)
    if valid is not None:
        labels = labels.masked_fill(~valid[:, None, None], -1)
    return labels


# ---------------------------------------------------------------------------------------------
# Step 2: exact squared distance to the boundary
# ---------------------------------------------------------------------------------------------

def boundary_pixels(masks: Tensor) -> Tensor:
    """bool (N, H, W): pixels with a 4-neighbour inside the grid of a different mask value."""
    m = masks != 0
    b = torch.zeros_like(m)
    dv = m[:, 1:, :] != m[:, :-1, :]
    b[:, 1:, :] |= dv
    b[:, :-1, :] |= dv
    dh = m[:, :, 1:] != m[:, :, :-1]
    b[:, :, 1:] |= dh
    b[:, :, :-1] |= dh
    return b


_FAR = 1 << 15  # a position far off the grid (H, W <= 4096); its square still fits int32
_NONE = 1 << 30  # squared distances at or over this mean "no boundary pixel" (real ones are < 2^25)


def _sqdist_to_set(b: Tensor) -> Tensor:
    """Exact squared EDT to the True pixels of b (N, L1, L2), int32; >= _NONE where b is empty.

    Separable: g = squared distance along dim 1 to the nearest set pixel of the same column (linear,
    via cummax/cummin), then d(r, c) = min over c' of (c - c')^2 + g(r, c') (brute force over dim 2,
    which the caller makes the shorter axis). int32 throughout: g <= 2^30 and (c - c')^2 < 2^24."""
    n, l1, l2 = b.shape
    idx = torch.arange(l1, device=b.device, dtype=torch.int32).view(1, l1, 1)
    above = torch.where(b, idx, -_FAR).cummax(dim=1).values
    below = torch.where(b, idx, _FAR).flip(1).cummin(dim=1).values.flip(1)
    g = torch.minimum(idx - above, below - idx).square()  # >= (2^15 - 2^12)^2 > 2^29 for an empty column
    g = torch.where(g > 1 << 29, _NONE, g)
    cols = torch.arange(l2, device=b.device, dtype=torch.int32)
    dc2 = (cols[:, None] - cols[None, :]).square()  # [c, c']
    out = torch.empty((n, l1, l2), dtype=torch.int32, device=b.device)
    chunk = max(1, (1 << 23) // (l1 * l2 * l2))  # bounds the (chunk, L1, L2, L2) temporary
    for start in range(0, n, chunk):
        out[start:start + chunk] = (g[start:start + chunk, :, None, :] + dc2).amin(dim=-1)
    return out


def boundary_sqdist(masks: Tensor, *, check_inputs: bool = True) -> Tensor:
    """Exact squared Euclidean distance of every pixel to its mask's boundary set. int32 (N, H, W);
    INT32_MAX where the mask has no boundary (all 0 or all 1)."""
    _validation.check_masks(masks)
    if _validation.flag("check_inputs", check_inputs):
        _validation.check_mask_values(masks)
    return _boundary_sqdist(masks)


def _boundary_sqdist(masks: Tensor) -> Tensor:
    b = boundary_pixels(masks)
    transpose = b.shape[2] > b.shape[1]  # brute-force pass over the shorter axis
    if transpose:
        b = b.transpose(1, 2)
    d = _sqdist_to_set(b.contiguous())
    if transpose:
        d = d.transpose(1, 2)
    return torch.where(d >= _NONE, INT32_MAX, d).contiguous()


# ---------------------------------------------------------------------------------------------
# Steps 3-4: candidate sets and deterministic sampling
# ---------------------------------------------------------------------------------------------

_U64 = np.uint64


def splitmix64(x) -> np.ndarray:
    """SPEC step 4's splitmix64 finaliser on uint64 arrays (arithmetic wraps mod 2^64 on purpose)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _U64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
        return x ^ (x >> _U64(31))


def key_hash(seed: int, n, s, i) -> np.ndarray:
    """r(i) = splitmix64(splitmix64(seed) ^ ((n * 4 + s) << 20 | i)), broadcast over n, s, i."""
    seed_hash = splitmix64(_U64(operator.index(seed) % 2**64))
    n = np.asarray(n, dtype=np.uint64)
    s = np.asarray(s, dtype=np.uint64)
    i = np.asarray(i, dtype=np.uint64)
    with np.errstate(over="ignore"):
        salt = ((n * _U64(4) + s) << _U64(20)) | i
    return splitmix64(seed_hash ^ salt)


def candidate_sets(labels: Tensor, sqdist: Tensor, is_novel: Tensor, hard_sqdist: int) -> Tensor:
    """bool (N, 4, H*W): membership of each pixel in EF, HF, EB, HB (SPEC step 3)."""
    n, h, w = labels.shape
    fg = (labels == 1).reshape(n, h * w)
    bg = (labels == 0).reshape(n, h * w)
    hard_sqdist = min(max(hard_sqdist, -1), INT32_MAX)  # same sets, and fits sqdist's int32
    near = (sqdist <= hard_sqdist).reshape(n, h * w)
    novel = is_novel[:, None]  # novel ROIs: easy and hard sets are both the whole partition
    hard = near | novel
    easy = ~near | novel
    return torch.stack((fg & easy, fg & hard, bg & easy, bg & hard), dim=1)


def sample_counts(counts: Tensor, sigma: float, max_count: int) -> Tensor:
    """k = min(c, ceil(sigma * c)) with the product in double, exactly as Python computes it."""
    table = torch.tensor([min(c, math.ceil(sigma * c)) for c in range(max_count + 1)], dtype=torch.int64)
    return table[counts]


def sample_keys(labels: Tensor, sqdist: Tensor, is_novel: Tensor, *, sigma: float = 0.3, hard_sqdist: int = 2,
                min_keys: int = 5, seed: Seed = None, roi_offset: int = 0):
    """Deterministic key sample. Returns (keys uint8 (N, H, W) with bit s set for set s, keep bool (N,)).
    ROI n hashes as n + roi_offset (its index in a batch split across processes)."""
    sigma, hard_sqdist, min_keys, seed, roi_offset = _validation.sample_keys_args(
        labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed,
        roi_offset=roi_offset)
    return _sample_keys(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed, roi_offset)


def _host_array(t: Tensor) -> np.ndarray:
    """t's values as a numpy array. Under torch.func's transforms every tensor made inside is wrapped and has
    no storage for numpy to read: those are copied through Python lists (the sampler's integer sets and counts,
    which nothing differentiates; a slow path for torch.func.grad only)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return np.asarray(t.tolist(), dtype=np.dtype(str(t.dtype).removeprefix("torch.")))
    return t.numpy()


def _sample_keys(labels: Tensor, sqdist: Tensor, is_novel: Tensor, sigma: float, hard_sqdist: int, min_keys: int,
                 seed: Seed, roi_offset: int = 0):
    seed = draw_seed() if seed is None else int(seed)  # a tensor seed is read here: the hash runs in numpy
    n, h, w = labels.shape
    p = h * w
    device = labels.device

    cand = candidate_sets(labels, sqdist, is_novel, int(hard_sqdist)).cpu()
    counts = cand.sum(dim=2)  # (N, 4)
    fg_any = (labels == 1).reshape(n, p).any(dim=1).cpu()
    bg_any = (labels == 0).reshape(n, p).any(dim=1).cpu()
    keep = (counts >= int(min_keys)).all(dim=1) & fg_any & bg_any
    k = sample_counts(counts, float(sigma), p) * keep[:, None]  # dropped ROIs sample nothing

    rois = np.arange(roi_offset, roi_offset + n, dtype=np.uint64)
    r = key_hash(seed, rois.reshape(n, 1, 1), np.arange(4).reshape(1, 4, 1), np.arange(p).reshape(1, 1, p))
    # Candidates first, then by hash; lexsort is stable, so equal hashes stay in pixel-index order.
    order = np.lexsort((r, ~_host_array(cand)), axis=-1)
    rank_picked = np.arange(p).reshape(1, 1, p) < _host_array(k)[:, :, None]
    picked = np.zeros((n, 4, p), dtype=bool)
    np.put_along_axis(picked, order, rank_picked, axis=-1)

    bits = torch.from_numpy(picked).to(torch.uint8) << torch.arange(4, dtype=torch.uint8).view(1, 4, 1)
    keys = bits.sum(dim=1, dtype=torch.uint8).reshape(n, h, w)
    return keys.to(device), keep.to(device)


# ---------------------------------------------------------------------------------------------
# Steps 5-6: queries and loss (contrastmask_ops.torch_loss, the PyTorch loss shared with the global path)
# ---------------------------------------------------------------------------------------------

def contrastive_loss_from_keys(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, *, tau_easy: float = 0.7,
                               tau_hard: float = 0.3, share_queries: bool = True,
                               formulation: str = "paper") -> Tensor:
    """The query-sharing contrastive loss (Eqs. 1, 2, 4) from explicit key sets; 0-dim, z's dtype (float32
    for a float16/bfloat16 z under autocast), differentiable in z."""
    params = _validation.loss_from_keys_args(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard,
                                             share_queries=share_queries, formulation=formulation)
    return _loss(z, labels, keys, keep, params)[0]


# A deliberate twin of functional.py's: the two paths keep one public signature (tests/ops/test_dispatch.py,
# test_both_paths_keep_one_public_signature holds them to it).
def query_sharing_contrastive_loss(z: Tensor, masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *,
                                   valid: Optional[Tensor] = None, delta: float = 0.1, sigma: float = 0.3,
                                   tau_easy: float = 0.7, tau_hard: float = 0.3, hard_sqdist: int = 2,
                                   min_keys: int = 5, share_queries: bool = True, formulation: str = "paper",
                                   seed: Seed = None, return_stats: bool = False, process_group=None,
                                   check_inputs: bool = True):
    """partition -> boundary_sqdist -> sample_keys -> loss. Returns the loss, or (loss, LossStats).
    With a process_group, the loss of all its ranks' ROIs together (see the compiled path's docstring)."""
    group = _validation.process_group_param(process_group)
    options = dict(delta=delta, sigma=sigma, tau_easy=tau_easy, tau_hard=tau_hard, hard_sqdist=hard_sqdist,
                   min_keys=min_keys, share_queries=share_queries, formulation=formulation, seed=seed,
                   return_stats=return_stats)

    def plan(plan_params, check_inputs, seed, roi_offset):
        if check_inputs:
            _check_plan_values(masks, cams, is_novel)
        labels = _partition(masks, cams, is_novel, plan_params.delta, valid)
        sqdist = _boundary_sqdist(masks)
        keys, keep = _sample_keys(labels, sqdist, is_novel, plan_params.sigma, plan_params.hard_sqdist,
                                  plan_params.min_keys, seed, int(roi_offset))  # a tensor offset: read here
        return labels, keys, keep

    if group is None:
        plan_params, params = _validation.pipeline_args(z, masks, cams, is_novel, valid, **options)
        labels, keys, keep = plan(plan_params, _validation.flag("check_inputs", check_inputs), plan_params.seed, 0)
        reducer = LOCAL
    else:  # every rank's ROIs (global_batch; an error of one rank is raised on every rank)
        params, membership, labels, keys, keep = global_batch.plan_together(
            group, z, masks, cams, is_novel, valid, options, check_inputs, plan)
        reducer = LOCAL if membership is None else membership.reducer
    loss, queries = _loss(z, labels, keys, keep, params, reducer)
    if return_stats:
        return loss, loss_stats(keys, keep, queries, params.share_queries)
    return loss
