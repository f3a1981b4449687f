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

from . import common
from . import global_batch
from .global_batch import LOCAL
from .common import FORMULATIONS, INT32_MAX, MAX_PIXELS, Z_DTYPES, LossStats, loss_stats  # noqa: F401 (re-exported)

NORM_EPS = 1e-8  # the cosine's clamp of each norm (SPEC step 6)
SCALE_EXP = {torch.float32: 32, torch.float64: 256}  # large features are rescaled above 2**SCALE_EXP (_feature_scale)

# (query side, positive set, negative set, uses tau_hard) of the terms A, B, C, D of L (DESIGN).
# Set ids: 0 easy-fg, 1 hard-fg, 2 easy-bg, 3 hard-bg; side 0 = q+, 1 = q-.
TERMS = ((0, 0, 2, False), (0, 1, 3, True), (1, 2, 0, False), (1, 3, 1, True))

# Input validation: contrastmask_ops.common, shared with the compiled path. The reference adds the two
# checks that read values (masks 0/1, cams present for novel ROIs), which the kernels do themselves, and
# then the NaN test of novel ROIs' CAMs, which the compiled path makes after its kernel.


# ---------------------------------------------------------------------------------------------
# Step 1: partition
# ---------------------------------------------------------------------------------------------

def _check_plan_values(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor) -> None:
    common.check_mask_values(masks)
    common.check_cams_present(cams, is_novel)
    common.check_cam_values(cams, is_novel)


def partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *, delta: float = 0.1,
              valid: Optional[Tensor] = None, check_inputs: bool = True) -> Tensor:
    """Label per pixel: 1 foreground, 0 background, -1 ignored. int8 (N, H, W). check_inputs=False skips the
    checks that read values (bad values give unspecified labels)."""
    delta = common.partition_args(masks, cams, is_novel, valid, delta)
    if common.flag("check_inputs", check_inputs):
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
    common.check_masks(masks)
    if common.flag("check_inputs", check_inputs):
        common.check_mask_values(masks)
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


def draw_seed() -> int:
    """DESIGN, "Seed": seed=None draws from torch's default CPU generator. Not under torch.compile: the draw
    is a host read, which would break the graph (or fail with fullgraph=True inside dynamo)."""
    if torch.compiler.is_compiling():
        from ._compile_checks import refuse_drawing_a_seed

        refuse_drawing_a_seed()
    return int(torch.randint(0, 2**63 - 1, ()).item())


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
                min_keys: int = 5, seed: common.Seed = None, roi_offset: int = 0):
    """Deterministic key sample. Returns (keys uint8 (N, H, W) with bit s set for set s, keep bool (N,)).
    ROI n hashes as n + roi_offset (its index in a batch split across processes)."""
    sigma, hard_sqdist, min_keys, seed, roi_offset = common.sample_keys_args(
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
                 seed: common.Seed, roi_offset: int = 0):
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
# Steps 5-6: queries and loss
# ---------------------------------------------------------------------------------------------

def _masked_max(x: Tensor, mask: Tensor, dim) -> Tensor:
    """The exact maximum of x over mask along dim (kept), detached; -inf where mask is empty."""
    xm = torch.where(mask, x, torch.full_like(x, -math.inf))
    if xm.numel() == 0:  # N = 0: amax has nothing to reduce
        shape = [1 if d in ((dim,) if isinstance(dim, int) else dim) else size for d, size in enumerate(x.shape)]
        return x.new_full(shape, -math.inf).detach()
    return xm.detach().amax(dim=dim, keepdim=True)


def _masked_exp_sum(x: Tensor, mask: Tensor, m: Tensor, dim) -> Tensor:
    """sum over mask of exp(x - m) along dim (kept). A NaN in a masked-in entry gives NaN; masked-out
    entries take part in nothing."""
    xm = torch.where(mask, x, torch.full_like(x, -math.inf))
    return torch.where(mask, torch.exp(xm - m), torch.zeros_like(x)).sum(dim=dim, keepdim=True)


def _feature_scale(max_abs: Tensor) -> Tensor:
    """The power of two c that brings max_abs (a vector's largest |component|) to [2**(top-1), 2**top) when it
    is above 2**top, else 1 (top = 32 for float32, 256 for float64; csrc/contrastmask/loss_math.h,
    feature_scale). Each cosine takes its query and its key vector on such scales: exact, and cosines do
    not change when one of their vectors is scaled."""
    top = SCALE_EXP[max_abs.dtype]
    big = (max_abs > 2.0 ** top) & torch.isfinite(max_abs)
    _, exponent = torch.frexp(torch.where(big, max_abs, torch.ones_like(max_abs)))  # max_abs = f * 2**e
    # 2**(top - e) built from its float64 bits: exact, where pow or exp2 might round.
    power = ((top - exponent.to(torch.int64) + 1023) << 52).view(torch.float64).to(max_abs.dtype)
    return torch.where(big, power, torch.ones_like(max_abs))


def _finite_shift(m: Tensor) -> Tensor:
    """The log-sum-exp's shift: the maximum, or 0 where there is none (empty set) or it is not finite."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _loss_and_queries(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, tau_easy: float, tau_hard: float,
                      share_queries: bool, formulation: str, reducer=LOCAL):
    """The loss in z's dtype and the queries (G, 2, C) in the accumulation dtype (G = 1 or N).

    Every quantity that pools ROIs is formed from this process's partial sums through `reducer`
    (contrastmask_ops.global_batch): LOCAL for a batch held by one process, or a process group's reducer,
    with which the loss is that of all ranks' ROIs together (DESIGN, "Global query sharing")."""
    n, c, h, w = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    keep_ = keep[:, None]
    labels = labels.reshape(n, h * w)
    pos_part = (labels == 1) & keep_  # (N, P) partitions of kept ROIs
    neg_part = (labels == 0) & keep_
    bits = torch.arange(4, device=keys.device, dtype=torch.uint8).view(1, 4, 1)
    in_set = (((keys.reshape(n, 1, h * w) >> bits) & 1) != 0) & keep_[:, :, None]  # (N, 4, P)

    # Pixels that take part in nothing are zeroed, so a NaN there has no effect (DESIGN, "NaN").
    # Channels last (N, P, C): the reductions below are then plain matrix products.
    used = pos_part | neg_part | in_set.any(dim=1)
    zt = z.reshape(n, c, h * w).transpose(1, 2).to(acc)
    zf = torch.where(used[:, :, None], zt, torch.zeros((), dtype=acc, device=z.device)).contiguous()

    # Step 5: partition means, then (share_queries) their mean over the ROIs that have that partition, in
    # float64 whatever z's dtype; the query is that rounded to acc, and q_lo what the rounding dropped (0 for
    # float64 z): a "released" key is formed as (z - q) - q_lo, z - q to acc's precision of the key itself
    # (DESIGN, "Collapsed features"; csrc/contrastmask/loss_math.h, split_query). q_lo is a constant correction
    # (detached): the gradient reaches the float64 means through q.
    parts = torch.stack((pos_part, neg_part), dim=1).to(torch.float64)  # (N, 2, P)
    part_count = parts.sum(dim=2)  # (N, 2)
    mu = torch.bmm(parts, zf.to(torch.float64)) / part_count.clamp_min(1)[:, :, None]  # (N, 2, C); 0 if empty
    if share_queries:
        has = (part_count > 0).to(torch.float64)
        mu_sum, has_count = reducer.sum((mu * has[:, :, None]).sum(dim=0, keepdim=True), has.sum(dim=0))
        q64 = mu_sum / has_count.clamp_min(1)[None, :, None]
    else:
        q64 = mu
    queries = q64.to(acc)
    queries_lo = (q64.detach() - queries.detach().to(torch.float64)).to(acc)
    q_per_roi = queries.expand(n, 2, c)
    q_lo_per_roi = queries_lo.expand(n, 2, c)

    # Cosines s[n, side, p] of each pixel with the ROI's two queries. A cosine does not change when one of
    # its vectors is scaled: each query is taken as q * cq and each pixel's key vector (z, or z - q) as
    # k * ck, powers of two from the vector's own largest component that are 1 unless it is beyond 2**32 in
    # float32 (2**256 in float64), so that squares and products stay finite (DESIGN, "Numerics"); the norm
    # clamp scales with them. The same scales as the kernels' rescaled pixels.
    with torch.no_grad():
        z_max = zf.abs().amax(dim=2)  # (N, P) largest |z| of each pixel
        q_max = q_per_roi.abs().amax(dim=2)  # (N, 2)
        cq = _feature_scale(q_max)
    q_norm = torch.linalg.vector_norm(q_per_roi * cq[:, :, None], dim=2)  # (N, 2)
    if formulation == "paper":
        with torch.no_grad():
            ck = _feature_scale(z_max)[:, None, :]  # (N, 1, P)
        zs = zf * ck[:, 0, :, None]
        if share_queries:  # one query pair, one scale
            dots = (zs @ (queries[0] * _feature_scale(queries[0].abs().amax(dim=1))[:, None]).T).transpose(1, 2)
        else:
            dots = torch.bmm(queries * cq[:, :, None], zs.transpose(1, 2))
        pix_norm = torch.linalg.vector_norm(zs, dim=2)[:, None, :]  # (N, 1, P)
    else:
        # "released": keys centred on the query, s = cos(q, z - q). z - q is formed first, as (z - q) - q_lo
        # (exact for z near q, and q's float64 digits kept), and both the dot and the norm are taken of it:
        # q.z - |q|^2 would cancel for z near q. Its scale comes from z - q itself (a key whose large
        # components cancel keeps its digits), or from |z| + |q| where z - q overflows; z and q are scaled
        # before the subtraction, which is exact either way.
        with torch.no_grad():
            d_max = ((zf[:, None, :, :] - q_per_roi[:, :, None, :]).sub_(q_lo_per_roi[:, :, None, :])
                     .abs_().amax(dim=3))  # (N, 2, P)
            bound = torch.where(torch.isfinite(d_max), d_max, torch.maximum(z_max[:, None, :], q_max[:, :, None]))
            ck = _feature_scale(bound)
        centred = ((zf[:, None, :, :] * ck[..., None]).sub_(q_per_roi[:, :, None, :] * ck[..., None])
                   .sub_(q_lo_per_roi[:, :, None, :] * ck[..., None]))  # (N, 2, P, C)
        dots = torch.matmul(centred, (q_per_roi * cq[:, :, None])[:, :, :, None]).squeeze(3)  # (N, 2, P)
        pix_norm = torch.linalg.vector_norm(centred, dim=3)
    sims = dots / (torch.maximum(q_norm, NORM_EPS * cq)[:, :, None] * torch.maximum(pix_norm, NORM_EPS * ck))

    # Step 6: the four terms. Reduction dims: pooled over kept ROIs (and over ranks: `pooled`), or per ROI.
    red = (0, 1) if share_queries else 1
    pooled = reducer if share_queries else LOCAL  # an ROI's own keys all live in its process
    temps = [tau_hard if hard else tau_easy for _, _, _, hard in TERMS]
    sides = [sims[:, side] for side, _, _, _ in TERMS]
    negs = [in_set[:, neg_set] for _, _, neg_set, _ in TERMS]
    poss = [in_set[:, pos_set] for _, pos_set, _, _ in TERMS]
    # Negatives' log-sum-exp, shifted by their exact maximum; over ranks: the maximum, then the sum.
    # (Each use of s / t below is its own division, as the loss was first written: the gradients then
    # add up in the same order, which keeps the single-process loss and gradient bit for bit.)
    neg_logits = [s / t for s, t in zip(sides, temps)]
    shifts = [_finite_shift(m) for m in pooled.max(*[_masked_max(x, neg, red) for x, neg in zip(neg_logits, negs)])]
    sums = pooled.sum(*[_masked_exp_sum(x, neg, m, red) for x, neg, m in zip(neg_logits, negs, shifts)],
                      *[pos.sum(dim=red).to(acc) for pos in poss])
    exp_sums, n_poss = sums[:len(TERMS)], sums[len(TERMS):]
    total = torch.zeros((), dtype=acc, device=z.device) if share_queries else torch.zeros(n, dtype=acc,
                                                                                          device=z.device)
    for s, t, pos, m, exp_sum, n_pos in zip(sides, temps, poss, shifts, exp_sums, n_poss):
        lse_neg = m + torch.log(exp_sum)  # (1, 1) or (N, 1); -inf without negatives
        own = s / t if formulation == "paper" else s
        per_pos = torch.logaddexp(own, lse_neg) - s / t
        term_sum = torch.where(pos, per_pos, torch.zeros_like(per_pos)).sum(dim=red)
        total = total + term_sum / n_pos.clamp_min(1)
    if not share_queries:
        kept, = reducer.sum(keep.sum().to(acc))
        total = total.sum() / kept.clamp_min(1)  # dropped ROIs have no keys: their sum is 0
    # This process's share of the loss; the loss is the sum of the shares of all ranks.
    return reducer.total(total).to(z.dtype), queries


def contrastive_loss_from_keys(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, *, tau_easy: float = 0.7,
                               tau_hard: float = 0.3, share_queries: bool = True,
                               formulation: str = "paper") -> Tensor:
    """The query-sharing contrastive loss (Eqs. 1, 2, 4) from explicit key sets; 0-dim, z's dtype (float32
    for a float16/bfloat16 z under autocast), differentiable in z."""
    params = common.loss_from_keys_args(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard,
                                        share_queries=share_queries, formulation=formulation)
    return _loss(z, labels, keys, keep, params)[0]


def _loss(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, params: common.LossParams, reducer=LOCAL):
    """(loss, queries) with the autocast rule of DESIGN, "Autocast": a float16/bfloat16 z is taken as float32
    under autocast, and no op inside drops to a lower precision."""
    z = common.autocast_z(z)
    with common.autocast_disabled(z.device.type):
        return _loss_and_queries(z, labels, keys, keep, *params, reducer=reducer)


def query_sharing_contrastive_loss(z: Tensor, masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *,
                                   valid: Optional[Tensor] = None, delta: float = 0.1, sigma: float = 0.3,
                                   tau_easy: float = 0.7, tau_hard: float = 0.3, hard_sqdist: int = 2,
                                   min_keys: int = 5, share_queries: bool = True, formulation: str = "paper",
                                   seed: common.Seed = None, return_stats: bool = False, process_group=None,
                                   check_inputs: bool = True):
    """partition -> boundary_sqdist -> sample_keys -> loss. Returns the loss, or (loss, LossStats).
    With a process_group, the loss of all its ranks' ROIs together (see the compiled path's docstring)."""
    group = common.process_group_param(process_group)
    try:
        plan, params = common.pipeline_args(z, masks, cams, is_novel, valid, delta=delta, sigma=sigma,
                                            tau_easy=tau_easy, tau_hard=tau_hard, hard_sqdist=hard_sqdist,
                                            min_keys=min_keys, share_queries=share_queries, formulation=formulation,
                                            seed=seed, return_stats=return_stats)
        check_inputs = common.flag("check_inputs", check_inputs)
    except (TypeError, ValueError) as error:
        if group is None:
            raise
        global_batch.fail_together(group, z, error)  # every rank raises (global_batch, "Errors")
    reducer, roi_offset, seed = LOCAL, 0, plan.seed
    if group is not None:
        reducer, roi_offset, seed = global_batch.join(group, z, plan, params, draw_seed)
    error = None
    try:
        if check_inputs:
            _check_plan_values(masks, cams, is_novel)
    except ValueError as e:
        error = e
    if check_inputs and reducer is not LOCAL:
        global_batch.raise_together(group, z.device, error)
    elif error is not None:
        raise error
    labels = _partition(masks, cams, is_novel, plan.delta, valid)
    sqdist = _boundary_sqdist(masks)
    keys, keep = _sample_keys(labels, sqdist, is_novel, plan.sigma, plan.hard_sqdist, plan.min_keys, seed, roi_offset)
    loss, queries = _loss(z, labels, keys, keep, params, reducer)
    if return_stats:
        return loss, loss_stats(keys, keep, queries, params.share_queries)
    return loss
