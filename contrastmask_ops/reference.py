"""Pure-PyTorch reference of the query-sharing contrastive loss (the test oracle and the fallback).

Semantics: ../shared/SPEC.md and docs/DESIGN.md ("Decisions"). Every step is vectorised over ROIs;
the key sampler's hash runs in numpy uint64 (torch has no full uint64 arithmetic on every device).
"""
import math
import operator
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

INT32_MAX = 2**31 - 1
MAX_PIXELS = 4096  # H * W limit of the kernels (SPEC)
NORM_EPS = 1e-8  # the cosine's clamp of each norm (SPEC step 6)
FORMULATIONS = ("paper", "released")
Z_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (query side, positive set, negative set, uses tau_hard) of the terms A, B, C, D of L (DESIGN).
# Set ids: 0 easy-fg, 1 hard-fg, 2 easy-bg, 3 hard-bg; side 0 = q+, 1 = q-.
TERMS = ((0, 0, 2, False), (0, 1, 3, True), (1, 2, 0, False), (1, 3, 1, True))


class LossStats(NamedTuple):
    """Detached statistics of one loss call (DESIGN: public API)."""

    kept: Tensor  # int64 0-dim: number of kept ROIs
    keys_per_set: Tensor  # int64 (4,): EF, HF, EB, HB key counts over kept ROIs
    q_pos: Tensor  # (C,) with share_queries, else (N, C) (zero rows for dropped ROIs)
    q_neg: Tensor


# ---------------------------------------------------------------------------------------------
# Input validation (shared with the public Python API)
# ---------------------------------------------------------------------------------------------

def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _check_dtype(name: str, x: Tensor, dtypes, what: str) -> None:
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must be {what}, got {x.dtype}")


def _check_grid(name: str, h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"{name}: H and W must be at least 1, got H={h}, W={w}")
    if h * w > MAX_PIXELS:
        raise ValueError(f"{name}: H*W = {h * w} exceeds the limit of {MAX_PIXELS} pixels per ROI")


def _check_roi_vector(name: str, x, n: int, ref_name: str, ref: Tensor) -> None:
    """A (N,) bool tensor on ref's device."""
    _check_tensor(name, x, 1)
    _check_dtype(name, x, (torch.bool,), "bool")
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} entries but {ref_name} has N = {n} ROIs")
    _check_same_device(name, x, ref_name, ref)


def _check_real(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:  # also catches NaN
        interval = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def _check_int(name: str, value, minimum: Optional[int] = None) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_masks(masks) -> None:
    """masks: (N, H, W), bool/uint8/float, values 0 or 1 (DESIGN decision 2: every row is checked)."""
    _check_tensor("masks", masks, 3)
    if not (masks.dtype in (torch.bool, torch.uint8) or masks.dtype.is_floating_point):
        raise ValueError(f"masks must be bool, uint8 or floating point, got {masks.dtype}")
    _check_grid("masks", masks.shape[1], masks.shape[2])
    if masks.dtype != torch.bool and bool(((masks != 0) & (masks != 1)).any()):
        raise ValueError("masks must hold only 0 and 1")


def check_plan_inputs(masks, cams, is_novel, valid=None, *, delta=0.1, sigma=None, hard_sqdist=None,
                      min_keys=None, seed=None) -> None:
    """Validates the inputs of partition / the whole pipeline. Parameters left None are not checked."""
    check_masks(masks)
    n = masks.shape[0]
    _check_roi_vector("is_novel", is_novel, n, "masks", masks)
    if valid is not None:
        _check_roi_vector("valid", valid, n, "masks", masks)
    if cams is None:
        if bool(is_novel.any()):
            raise ValueError("cams is None but some ROI is novel (is_novel has a True entry)")
    else:
        _check_tensor("cams", cams, 3)
        if not cams.dtype.is_floating_point:
            raise ValueError(f"cams must be floating point, got {cams.dtype}")
        if cams.shape != masks.shape:
            raise ValueError(f"cams has shape {tuple(cams.shape)} but masks has shape {tuple(masks.shape)}")
        _check_same_device("cams", cams, "masks", masks)
    _check_real("delta", delta, 0.0, 0.5, lo_open=False)
    check_sampling_params(sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed)


def check_sampling_params(*, sigma=None, hard_sqdist=None, min_keys=None, seed=None) -> None:
    if sigma is not None:
        _check_real("sigma", sigma, 0.0, 1.0, lo_open=True)
    if hard_sqdist is not None:
        _check_int("hard_sqdist", hard_sqdist)
    if min_keys is not None:
        _check_int("min_keys", min_keys, minimum=0)
    if seed is not None:
        _check_int("seed", seed)


def check_sample_inputs(labels, sqdist, is_novel, *, sigma=0.3, hard_sqdist=2, min_keys=5, seed=None) -> None:
    _check_tensor("labels", labels, 3)
    _check_dtype("labels", labels, (torch.int8,), "int8")
    _check_grid("labels", labels.shape[1], labels.shape[2])
    _check_tensor("sqdist", sqdist, 3)
    _check_dtype("sqdist", sqdist, (torch.int32,), "int32")
    if sqdist.shape != labels.shape:
        raise ValueError(f"sqdist has shape {tuple(sqdist.shape)} but labels has shape {tuple(labels.shape)}")
    _check_same_device("sqdist", sqdist, "labels", labels)
    _check_roi_vector("is_novel", is_novel, labels.shape[0], "labels", labels)
    check_sampling_params(sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed)


def check_loss_params(*, tau_easy=0.7, tau_hard=0.3, share_queries=True, formulation="paper") -> None:
    _check_real("tau_easy", tau_easy, 0.0, math.inf, lo_open=True, hi_open=True)
    _check_real("tau_hard", tau_hard, 0.0, math.inf, lo_open=True, hi_open=True)
    if not isinstance(share_queries, (bool, np.bool_)):
        raise TypeError(f"share_queries must be a bool, got {share_queries!r}")
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def check_z(z, n: int, h: int, w: int, ref_name: str, ref: Tensor) -> None:
    """z: (N, C, H, W) float16/bfloat16/float32/float64 matching ref's N, H, W and device."""
    _check_tensor("z", z, 4)
    _check_dtype("z", z, Z_DTYPES, "float16, bfloat16, float32 or float64")
    if z.shape[0] != n:
        raise ValueError(f"z has N = {z.shape[0]} ROIs but {ref_name} has N = {n}")
    if z.shape[1] < 1:
        raise ValueError("z must have at least one channel (C >= 1)")
    if tuple(z.shape[2:]) != (h, w):
        raise ValueError(f"z has H, W = {tuple(z.shape[2:])} but {ref_name} has H, W = {(h, w)}")
    _check_same_device("z", z, ref_name, ref)


def check_loss_inputs(z, labels, keys, keep, *, tau_easy=0.7, tau_hard=0.3, share_queries=True,
                      formulation="paper") -> None:
    _check_tensor("labels", labels, 3)
    _check_dtype("labels", labels, (torch.int8,), "int8")
    n, h, w = labels.shape
    _check_grid("labels", h, w)
    check_z(z, n, h, w, "labels", labels)
    _check_tensor("keys", keys, 3)
    _check_dtype("keys", keys, (torch.uint8,), "uint8")
    if keys.shape != labels.shape:
        raise ValueError(f"keys has shape {tuple(keys.shape)} but labels has shape {tuple(labels.shape)}")
    _check_same_device("keys", keys, "labels", labels)
    _check_roi_vector("keep", keep, n, "labels", labels)
    check_loss_params(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries, formulation=formulation)


# ---------------------------------------------------------------------------------------------
# Step 1: partition
# ---------------------------------------------------------------------------------------------

def partition(masks: Tensor, cams: Optional[Tensor], is_novel: Tensor, *, delta: float = 0.1,
              valid: Optional[Tensor] = None) -> Tensor:
    """Label per pixel: 1 foreground, 0 background, -1 ignored. int8 (N, H, W)."""
    check_plan_inputs(masks, cams, is_novel, valid, delta=delta)
    labels = (masks != 0).to(torch.int8)
    if cams is not None:
        # DESIGN decision 1: thresholds rounded to cams.dtype; foreground tested first.
        hi = torch.tensor(1.0 - float(delta), dtype=cams.dtype, device=cams.device)
        lo = torch.tensor(float(delta), dtype=cams.dtype, device=cams.device)
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


def boundary_sqdist(masks: Tensor) -> Tensor:
    """Exact squared Euclidean distance of every pixel to its mask's boundary set. int32 (N, H, W);
    INT32_MAX where the mask has no boundary (all 0 or all 1)."""
    check_masks(masks)
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
    """DESIGN decision 3: seed=None draws from torch's default CPU generator."""
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
                min_keys: int = 5, seed: Optional[int] = None):
    """Deterministic key sample. Returns (keys uint8 (N, H, W) with bit s set for set s, keep bool (N,))."""
    check_sample_inputs(labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys,
                        seed=seed)
    seed = draw_seed() if seed is None else operator.index(seed)
    n, h, w = labels.shape
    p = h * w
    device = labels.device

    cand = candidate_sets(labels, sqdist, is_novel, int(hard_sqdist)).cpu()
    counts = cand.sum(dim=2)  # (N, 4)
    fg_any = (labels == 1).reshape(n, p).any(dim=1).cpu()
    bg_any = (labels == 0).reshape(n, p).any(dim=1).cpu()
    keep = (counts >= int(min_keys)).all(dim=1) & fg_any & bg_any
    k = sample_counts(counts, float(sigma), p) * keep[:, None]  # dropped ROIs sample nothing

    r = key_hash(seed, np.arange(n).reshape(n, 1, 1), np.arange(4).reshape(1, 4, 1), np.arange(p).reshape(1, 1, p))
    # Candidates first, then by hash; lexsort is stable, so equal hashes stay in pixel-index order.
    order = np.lexsort((r, ~cand.numpy()), axis=-1)
    rank_picked = np.arange(p).reshape(1, 1, p) < k.numpy()[:, :, None]
    picked = np.zeros((n, 4, p), dtype=bool)
    np.put_along_axis(picked, order, rank_picked, axis=-1)

    bits = torch.from_numpy(picked).to(torch.uint8) << torch.arange(4, dtype=torch.uint8).view(1, 4, 1)
    keys = bits.sum(dim=1, dtype=torch.uint8).reshape(n, h, w)
    return keys.to(device), keep.to(device)


# ---------------------------------------------------------------------------------------------
# Steps 5-6: queries and loss
# ---------------------------------------------------------------------------------------------

def _masked_logsumexp(x: Tensor, mask: Tensor, dim) -> Tensor:
    """log(sum over mask of exp(x)) along dim (kept), shifted by the exact maximum; -inf where mask is
    empty. A NaN in a masked-in entry gives NaN; masked-out entries take part in nothing."""
    xm = torch.where(mask, x, torch.full_like(x, -math.inf))
    if xm.numel() == 0:  # N = 0: amax has nothing to reduce
        return torch.log(xm.exp().sum(dim=dim, keepdim=True))
    m = xm.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.where(mask, torch.exp(xm - m), torch.zeros_like(x)).sum(dim=dim, keepdim=True)
    return m + torch.log(total)


def _loss_and_queries(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, tau_easy: float, tau_hard: float,
                      share_queries: bool, formulation: str):
    """The loss in z's dtype and the queries (G, 2, C) in the accumulation dtype (G = 1 or N)."""
    n, c, h, w = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    keep_ = keep[:, None]
    labels = labels.reshape(n, h * w)
    pos_part = (labels == 1) & keep_  # (N, P) partitions of kept ROIs
    neg_part = (labels == 0) & keep_
    bits = torch.arange(4, device=keys.device, dtype=torch.uint8).view(1, 4, 1)
    in_set = (((keys.reshape(n, 1, h * w) >> bits) & 1) != 0) & keep_[:, :, None]  # (N, 4, P)

    # Pixels that take part in nothing are zeroed, so a NaN there has no effect (DESIGN decision 9).
    # Channels last (N, P, C): the reductions below are then plain matrix products.
    used = pos_part | neg_part | in_set.any(dim=1)
    zt = z.reshape(n, c, h * w).transpose(1, 2).to(acc)
    zf = torch.where(used[:, :, None], zt, torch.zeros((), dtype=acc, device=z.device)).contiguous()

    # Step 5: partition means, then (share_queries) their mean over the ROIs that have that partition.
    parts = torch.stack((pos_part, neg_part), dim=1).to(acc)  # (N, 2, P)
    part_count = parts.sum(dim=2)  # (N, 2)
    mu = torch.bmm(parts, zf) / part_count.clamp_min(1)[:, :, None]  # (N, 2, C); 0 for an empty partition
    if share_queries:
        has = (part_count > 0).to(acc)
        queries = (mu * has[:, :, None]).sum(dim=0, keepdim=True) / has.sum(dim=0).clamp_min(1)[None, :, None]
        dots = (zf @ queries[0].T).transpose(1, 2)  # (N, 2, P)
        q_per_roi = queries.expand(n, 2, c)
    else:
        queries = mu
        q_per_roi = mu
        dots = torch.bmm(mu, zf.transpose(1, 2))

    # Cosines s[n, side, p] of each pixel with the ROI's two queries.
    q_norm = torch.linalg.vector_norm(q_per_roi, dim=2)  # (N, 2)
    if formulation == "paper":
        pix_norm = torch.linalg.vector_norm(zf, dim=2)[:, None, :]  # (N, 1, P)
    else:  # "released": keys centred on the query, s = cos(q, z - q)
        dots = dots - q_norm.square()[:, :, None]
        pix_norm = torch.cdist(zf, q_per_roi, compute_mode="donot_use_mm_for_euclid_dist").transpose(1, 2)
    sims = dots / (q_norm.clamp_min(NORM_EPS)[:, :, None] * pix_norm.clamp_min(NORM_EPS))

    # Step 6: the four terms. Reduction dims: pooled over kept ROIs, or per ROI.
    red = (0, 1) if share_queries else 1
    total = torch.zeros((), dtype=acc, device=z.device) if share_queries else torch.zeros(n, dtype=acc,
                                                                                          device=z.device)
    for side, pos_set, neg_set, hard in TERMS:
        t = tau_hard if hard else tau_easy
        s = sims[:, side]
        pos, neg = in_set[:, pos_set], in_set[:, neg_set]
        lse_neg = _masked_logsumexp(s / t, neg, red)  # (1, 1) or (N, 1)
        own = s / t if formulation == "paper" else s
        per_pos = torch.logaddexp(own, lse_neg) - s / t
        n_pos = pos.sum(dim=red).to(acc)
        term_sum = torch.where(pos, per_pos, torch.zeros_like(per_pos)).sum(dim=red)
        total = total + term_sum / n_pos.clamp_min(1)
    if not share_queries:
        total = total.sum() / keep.sum().to(acc).clamp_min(1)  # dropped ROIs have no keys: their sum is 0
    return total.to(z.dtype), queries


def contrastive_loss_from_keys(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, *, tau_easy: float = 0.7,
                               tau_hard: float = 0.3, share_queries: bool = True,
                               formulation: str = "paper") -> Tensor:
    """The query-sharing contrastive loss (Eqs. 1, 2, 4) from explicit key sets; 0-dim, z's dtype,
    differentiable in z."""
    check_loss_inputs(z, labels, keys, keep, tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries,
                      formulation=formulation)
    loss, _ = _loss_and_queries(z, labels, keys, keep, float(tau_easy), float(tau_hard), bool(share_queries),
                                formulation)
    return loss


def loss_stats(keys: Tensor, keep: Tensor, queries: Tensor, share_queries: bool) -> LossStats:
    bits = torch.arange(4, device=keys.device, dtype=torch.uint8).view(1, 4, 1)
    n = keys.shape[0]
    in_set = ((keys.reshape(n, 1, keys.shape[1] * keys.shape[2]) >> bits) & 1) * keep.view(n, 1, 1)
    per_set = in_set.sum(dim=(0, 2), dtype=torch.int64)
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
    """partition -> boundary_sqdist -> sample_keys -> loss. Returns the loss, or (loss, LossStats)."""
    check_plan_inputs(masks, cams, is_novel, valid, delta=delta, sigma=sigma, hard_sqdist=hard_sqdist,
                      min_keys=min_keys, seed=seed)
    check_z(z, masks.shape[0], masks.shape[1], masks.shape[2], "masks", masks)
    check_loss_params(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries, formulation=formulation)
    labels = partition(masks, cams, is_novel, delta=delta, valid=valid)
    sqdist = boundary_sqdist(masks)
    keys, keep = sample_keys(labels, sqdist, is_novel, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys,
                             seed=seed)
    loss, queries = _loss_and_queries(z, labels, keys, keep, float(tau_easy), float(tau_hard), bool(share_queries),
                                      formulation)
    if return_stats:
        return loss, loss_stats(keys, keep, queries, share_queries)
    return loss
