"""The query-sharing contrastive loss (SPEC steps 5-6) in PyTorch ops: the loss of the reference (the test oracle
and the fallback where the extension has no kernels), with its reductions over ROIs written against a reducer
(contrastmask_ops.global_batch): LOCAL for a batch held by one process, or a process group's reducer, with which
the loss is that of every rank's ROIs (the reference's process_group path). The compiled path's global loss runs
the fused kernels' stages instead (global_batch.GlobalLoss)."""
import math

import torch
from torch import Tensor

from . import _autocast, _validation
from .global_batch import LOCAL

NORM_EPS = 1e-8  # the cosine's clamp of each norm (SPEC step 6)
SCALE_EXP = {torch.float32: 32, torch.float64: 256}  # large features are rescaled above 2**SCALE_EXP (_feature_scale)

# (query side, positive set, negative set, uses tau_hard) of the terms A, B, C, D of L (DESIGN).
# Set ids: 0 easy-fg, 1 hard-fg, 2 easy-bg, 3 hard-bg; side 0 = q+, 1 = q-.
TERMS = ((0, 0, 2, False), (0, 1, 3, True), (1, 2, 0, False), (1, 3, 1, True))


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


def loss_and_queries(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, tau_easy: float, tau_hard: float,
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
    # (Each use of s / t below is its own division: one shared quotient would change the order in which
    # autograd adds up the gradients, and with it the single-process loss and gradient in their last bits.)
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


def loss(z: Tensor, labels: Tensor, keys: Tensor, keep: Tensor, params: _validation.LossParams, reducer=LOCAL):
    """(loss, queries) with the autocast rule of DESIGN, "Autocast": a float16/bfloat16 z is taken as float32
    under autocast, and no op inside drops to a lower precision."""
    z = _autocast.autocast_z(z)
    with _autocast.autocast_disabled(z.device.type):
        return loss_and_queries(z, labels, keys, keep, *params, reducer=reducer)
