"""Query sharing across processes (docs/DESIGN.md, "Global query sharing").

The loss of a batch split over the ranks of a torch.distributed process group, equal to the loss of the
whole batch (all ranks' ROIs concatenated in rank order). Everything in the loss that crosses ROIs is a
sum of O(C) numbers, so each rank computes its partial sums and a *reducer* turns them into the sums over
the whole batch. The compiled path runs the fused kernels' stage operators with these sums in between
(GlobalLoss); the PyTorch loss of the reference (torch_loss.loss_and_queries) takes a reducer as an argument:
`LOCAL` (every reduction is the identity) gives the single-process loss, bit for bit.

Determinism: a cross-rank sum is an all_gather of the partials followed by a left-to-right sum in rank
order, the same code on every rank, so every rank holds the same bits whatever the order in which the
processes arrive (an all_reduce's summation order is the backend's choice).

Errors: a rank that raised alone would leave the others waiting in a collective (gloo aborts the process,
NCCL hangs). A rank whose arguments or input values fail its checks therefore still takes part in the join
(fail_together) or in the check after the plan (raise_together), and every rank raises together: the
failing rank its own error, the others a ValueError that names it and quotes its message.
"""
import zlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.function import once_differentiable

from . import _autocast, _validation
from ._seed import draw_seed, seeded_overload
from .stats import loss_stats


class LocalReducer:
    """The whole batch is in this process: every reduction is the identity."""

    def sum(self, *partials: Tensor):
        return partials

    def max(self, *partials: Tensor):
        return partials

    def total(self, share: Tensor) -> Tensor:
        return share


LOCAL = LocalReducer()


def _gather(x: Tensor, group) -> list:
    """x of every rank of the group, in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _rank_ordered_sum(x: Tensor, group) -> Tensor:
    parts = _gather(x, group)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's x. Backward: the sum of every rank's gradient, because each rank
    back-propagates only its own share of the loss (see ProcessGroupReducer.total), so the gradient of
    the whole loss with respect to the sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return _rank_ordered_sum(x, group)

    @staticmethod
    @once_differentiable  # the all_gather in the backward is not differentiated: refuse a second order
    def backward(ctx, grad):
        return None, _rank_ordered_sum(grad.contiguous(), ctx.group)


class _TotalOverRanks(torch.autograd.Function):
    """Forward: the loss, i.e. the sum of every rank's share. Backward: the gradient goes to this rank's
    share only; the shares of the others reach this rank's rows through _SumOverRanks."""

    @staticmethod
    def forward(ctx, group, share):
        return _rank_ordered_sum(share, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return None, grad


class ProcessGroupReducer:
    """Reductions over the ranks of a process group. Each call is one collective, whatever the number of
    tensors (they travel as one flat buffer); all tensors share one dtype and device."""

    def __init__(self, group):
        self.group = group

    def sum(self, *partials: Tensor):
        flat = torch.cat([p.reshape(-1) for p in partials])
        summed = _SumOverRanks.apply(self.group, flat)
        return tuple(s.view(p.shape) for s, p in zip(summed.split([p.numel() for p in partials]), partials))

    def max(self, *partials: Tensor):
        """Elementwise maxima, detached: they are only the log-sum-exp's shift."""
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in partials])
            parts = _gather(flat, self.group)
            top = parts[0]
            for part in parts[1:]:
                top = torch.maximum(top, part)  # NaN-propagating, like amax
        return tuple(m.view(p.shape) for m, p in zip(top.split([p.numel() for p in partials]), partials))

    def total(self, share: Tensor) -> Tensor:
        return _TotalOverRanks.apply(self.group, share)


# ---------------------------------------------------------------------------------------------
# Joining: one all_gather of what every rank must agree on, and each rank's ROI offset
# ---------------------------------------------------------------------------------------------

class Membership(NamedTuple):
    reducer: ProcessGroupReducer
    roi_offset: object  # this rank's first ROI in the whole batch: an int, or a 0-dim int64 tensor on z's device
    seed: object        # the key sampler's seed, the same on every rank: an int, or the callers' tensor seed


# Configurations already joined (see join): (group, C, H, W, float64, parameters' digest, device) of calls with a
# tensor seed and check_inputs=False whose agreement check passed once.
_AGREED = set()


def parameters_fingerprint(*params) -> int:
    """A 32-bit digest of the loss's parameters, compared across ranks (the collectives of the loss differ
    with share_queries, so ranks that disagree would otherwise wait on each other forever)."""
    return zlib.crc32(repr(params).encode())


def collective_device(process_group, z) -> torch.device:
    """Where this rank's collective buffers live: z's device, else (z unusable) the backend's."""
    if isinstance(z, Tensor) and z.device.type != "meta":
        return z.device
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_with_the_others(process_group, failed, error):
    """Every rank, once any failed (failed: a flag per rank): shares the failing ranks' messages and raises."""
    messages = [None] * len(failed)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                           group=process_group)
    if error is not None:
        raise error
    first = failed.index(True)
    raise ValueError(f"process_group: rank {first} raised {messages[first]} (every rank raises with it)")


def fail_together(process_group, z, error: Exception):
    """This rank's checks raised `error` before the join: joins as failed, so that every rank raises."""
    row = torch.zeros(9, dtype=torch.int64, device=collective_device(process_group, z))
    row[0] = 1
    rows = torch.stack(_gather(row, process_group)).tolist()
    _raise_with_the_others(process_group, [bool(r[0]) for r in rows], error)


def raise_together(process_group, device, error: Exception = None):
    """After this rank's plan: one all_gather of whether it raised; raises on every rank when any did."""
    flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=device)
    failed = [bool(f) for f in torch.stack(_gather(flag, process_group)).view(-1).tolist()]
    if any(failed):
        _raise_with_the_others(process_group, failed, error)


def join(process_group, z: Tensor, plan, params, check_inputs: bool = True) -> Membership:
    """One all_gather of (N, C, H, W, accumulation dtype, seed, parameters) from every rank (plan and params:
    _validation.PlanParams and LossParams). Returns the reducer, this rank's ROI offset (the ROIs of the ranks
    before it) and the seed: the callers' seed when every rank passes the same one, else (seed=None on every
    rank) the draw_seed() of the group's first rank.
    Raises on every rank when the ranks disagree or one of them failed its checks (fail_together).

    No host read per step: with a tensor seed (on the CPU or z's device) and check_inputs=False, a configuration
    whose agreement was checked once (the host-known key: group, C, H, W, accumulation dtype, parameters,
    device) is not read back again: the gathered rows stay on the device, the ROI offset is computed there (a
    0-dim tensor, which the plan kernel reads), and the seed is the callers' tensor as it is. Then a rank that
    alone changes its seed or fails its checks is not seen by the others (DESIGN, "Global query sharing")."""
    n, c, h, w = z.shape
    seed = plan.seed
    given = seed is not None
    fingerprint = parameters_fingerprint(plan._replace(seed=None), params)
    seed_is_tensor = isinstance(seed, Tensor)
    mine = [0, n, c, h, w, int(z.dtype == torch.float64), int(given),
            0 if seed_is_tensor else seed if given else draw_seed(), fingerprint]
    if z.device.type == "cuda":  # filled on the device: a copy from the host would be a synchronising memcpy
        row = torch.empty(len(mine), dtype=torch.int64, device=z.device)
        for i, value in enumerate(mine):
            row[i].fill_(value)
    else:
        row = torch.tensor(mine, dtype=torch.int64, device=z.device)
    if seed_is_tensor:
        row[7] = seed  # a copy on the device; the one host read below brings it back with the rest
    rank = dist.get_rank(process_group)
    key = (process_group, c, h, w, z.dtype == torch.float64, fingerprint, z.device) \
        if seed_is_tensor and not check_inputs else None
    gathered = torch.stack(_gather(row, process_group))
    if key is not None and key in _AGREED:
        offset = gathered[:rank, 1].sum()
        return Membership(ProcessGroupReducer(process_group), offset, seed)
    rows = gathered.tolist()
    if any(r[0] for r in rows):
        _raise_with_the_others(process_group, [bool(r[0]) for r in rows], None)
    rows = [r[1:] for r in rows]
    for r, row in enumerate(rows):
        if row[1:5] != rows[0][1:5]:
            raise ValueError(f"process_group: rank {r} has z of shape (N, {row[1]}, {row[2]}, {row[3]}) "
                             f"{'float64' if row[4] else 'float32 or lower'}, rank 0 has (N, {rows[0][1]}, "
                             f"{rows[0][2]}, {rows[0][3]}) {'float64' if rows[0][4] else 'float32 or lower'}; "
                             "C, H, W and the accumulation dtype must agree")
        if row[7] != rows[0][7]:
            raise ValueError(f"process_group: rank {r} passed other loss parameters than rank 0; every rank "
                             "must pass the same delta, sigma, tau_easy, tau_hard, hard_sqdist, min_keys, "
                             "share_queries and formulation")
        if row[5] != rows[0][5] or (row[5] and row[6] != rows[0][6]):
            seeds = [other[6] if other[5] else None for other in rows]
            raise ValueError(f"seed: every rank of the process group must pass the same seed (or every rank "
                             f"None), got {seeds} on ranks 0..{len(rows) - 1}")
    offset = sum(row[0] for row in rows[:rank])
    if key is not None:
        _AGREED.add(key)
    return Membership(ProcessGroupReducer(process_group), offset, rows[0][6])


def plan_together(process_group, z, masks, cams, is_novel, valid, options: dict, check_inputs, plan):
    """The steps of a global loss call before its loss math, shared by the compiled path and the reference:
    validate the arguments (an error joins as failed: every rank raises), join (every rank's ROI offset and the
    seed), plan this rank's ROIs (plan(plan_params, check_inputs, seed, roi_offset) -> (labels, keys, keep),
    raising a ValueError for bad input values), and with check_inputs one flag per rank (every rank raises when
    one plan did). Meta and fake tensors hold no data to share: no collective, ROI offset 0.
    Returns (loss params, Membership or None for meta tensors, labels, keys, keep)."""
    try:
        plan_params, params = _validation.pipeline_args(z, masks, cams, is_novel, valid, **options)
        check_inputs = _validation.flag("check_inputs", check_inputs)
    except (TypeError, ValueError) as error:
        fail_together(process_group, z, error)
    if z.device.type == "meta" or is_fake(z):
        membership, roi_offset, seed = None, 0, 0 if plan_params.seed is None else plan_params.seed
    else:
        membership = join(process_group, z, plan_params, params, check_inputs)
        roi_offset, seed = membership.roi_offset, membership.seed
    error = planned = None
    try:
        planned = plan(plan_params, check_inputs, seed, roi_offset)
    except ValueError as e:
        error = e
    if check_inputs and membership is not None:
        raise_together(process_group, z.device, error)
    elif error is not None:
        raise error
    return (params, membership, *planned)


# ---------------------------------------------------------------------------------------------
# The global loss on the fused kernels: their stage operators, with the collectives in between
# ---------------------------------------------------------------------------------------------

_POS_RATIO = 1  # pos_sums[..., 1]: sum over the positives of exp(lse - L_p) (csrc/contrastmask/loss_math.h, PosStat)
_RATIO, _INV_POSITIVES = 1, 2  # termstats[..., 1] R, termstats[..., 2] 1/|P| (TermStat)


def _sum_over_ranks(group, *tensors: Tensor):
    """Each tensor summed over the ranks, left to right in rank order; one all_gather for all of them (one
    dtype)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    total = _rank_ordered_sum(flat, group)
    return tuple(s.view(t.shape) for s, t in zip(total.split([t.numel() for t in tensors]), tensors))


def _merge_lse_over_ranks(group, lse: Tensor) -> Tensor:
    """Log-sum-exp pairs (max, sum of exp(x - max)) merged over the ranks: the maximum over ranks as the shift,
    then the sum in rank order of each rank's sum rescaled to it (exact for one rank: exp(0) = 1). A NaN
    maximum poisons the pair, as LseAcc::merge does; an empty pair (-inf, 0) adds nothing."""
    parts = _gather(lse, group)
    top = parts[0][..., 0]
    for part in parts[1:]:
        top = torch.maximum(top, part[..., 0])  # NaN-propagating
    total = torch.zeros_like(top)
    for part in parts:
        m, s = part[..., 0], part[..., 1]
        total = total + torch.where(s == 0, torch.zeros_like(s), s * torch.exp(m - top))
    total = torch.where(torch.isnan(top), top, total)
    return torch.stack((top, total), dim=-1)


class GlobalLoss(torch.autograd.Function):
    """The loss of every rank's ROIs on the fused kernels' stage operators (ops: torch.ops.contrastmask, or the
    tests' emulation namespace). Forward: query sums and counts -> [sum over ranks] -> queries, cosines and the
    negatives' log-sum-exp pairs -> [merge over ranks] -> the positives' sums -> [sum over ranks] -> termstats and
    loss (without shared queries only the counts and the loss cross ranks). Backward: the upstream gradient
    times each rank's positive ratio sums -> [sum over ranks] -> per-pixel coefficients and dL/dq partials ->
    [sum over ranks] -> dz. Returns (loss in z's dtype, queries)."""

    @staticmethod
    def forward(ctx, z, labels, keys, keep, params, ops, group):
        p = tuple(params)
        share = params.share_queries
        args = (z, labels, keys, keep)
        sums, counts = ops.contrastive_loss_query_sums(*args, *p)
        if share:
            sums, counts = _sum_over_ranks(group, sums, counts)
        else:
            (counts,) = _sum_over_ranks(group, counts)
        queries, pixstats, lse = ops.contrastive_loss_cosines(*args, sums, counts, *p)
        if share:
            lse = _merge_lse_over_ranks(group, lse)
        termstats, pos_sums = ops.contrastive_loss_terms(*args, pixstats, lse, *p)
        own_pos = pos_sums
        if share:
            (pos_sums,) = _sum_over_ranks(group, pos_sums)
        loss, termstats = ops.contrastive_loss_finish(*args, termstats, pos_sums, counts, *p)
        if not share:  # this rank's ROIs' share of the mean over every rank's kept ROIs
            (loss,) = _sum_over_ranks(group, loss)
        ctx.save_for_backward(z, labels, keys, keep, queries, pixstats, termstats, counts, own_pos)
        ctx.params, ctx.ops, ctx.group = params, ops, group
        ctx.mark_non_differentiable(queries)
        return loss.to(z.dtype), queries

    @staticmethod
    def backward(ctx, grad, _):
        with torch.no_grad():
            dz = GlobalLoss._dz(ctx, grad)
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient raises
            dz = _RefuseSecondOrder.apply(ctx.saved_tensors[0], dz)
        return dz, None, None, None, None, None, None

    @staticmethod
    def _dz(ctx, grad):
        z, labels, keys, keep, queries, pixstats, termstats, counts, own_pos = ctx.saved_tensors
        params, ops, group = ctx.params, ctx.ops, ctx.group
        p = tuple(params)
        args = (z, labels, keys, keep)
        grad = grad.to(termstats.dtype)
        neg_grad = None
        if params.share_queries:
            # A negative's gradient comes through every rank's positives of its term (lse), each rank's share
            # weighted by its own upstream gradient: R = (sum_r g_r sum_{p of r} exp(lse - L_p)) / |P|.
            (ratio,) = _sum_over_ranks(group, grad * own_pos[..., _POS_RATIO])
            termstats = termstats.clone()
            termstats[..., _RATIO] = ratio * termstats[..., _INV_POSITIVES]
            neg_grad = torch.ones_like(grad)
        coef, dq, beta = ops.contrastive_loss_query_grads(grad, neg_grad, *args, queries, pixstats, termstats, counts,
                                                          *p)
        if params.share_queries:
            dq64, beta = _sum_over_ranks(group, dq.to(torch.float64), beta)
            dq = dq64.to(dq.dtype)
        return ops.contrastive_loss_dz(*args, queries, coef, dq, beta, counts, *p)


class _RefuseSecondOrder(torch.autograd.Function):
    """dz as it is, with a backward that raises: the collectives of the global loss's backward are not
    differentiated, so a second-order gradient would silently miss terms (as with once_differentiable)."""

    @staticmethod
    def forward(ctx, z, dz):
        return dz.view_as(dz)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("process_group: the global loss's gradient is not differentiable (its backward is "
                           "once_differentiable: the collectives in it are not differentiated); use "
                           "contrastmask_ops.reference without process_group for gradients of gradients")


def kernel_loss(group, ops, z, labels, keys, keep, params):
    """(loss, queries) of every rank's ROIs on the kernels, with the autocast rule of DESIGN, "Autocast"."""
    z = _autocast.autocast_z(z)
    with _autocast.autocast_disabled(z.device.type):
        loss, queries = GlobalLoss.apply(z, labels, keys, keep, params, ops, group)
    return loss, queries


# Outside any compiled graph (a graph break; fullgraph=True refuses it): the collectives run eagerly (README,
# "Several processes").
@torch.compiler.disable(reason="process_group: the global loss runs eagerly, outside the graph (its collectives "
                               "and the join's host read); compile without fullgraph=True to use it")
def kernel_global_loss(ops, group, z, masks, cams, is_novel, valid, options: dict, check_inputs):
    """query_sharing_contrastive_loss over the ROIs of every rank of group, on the operators of ops (the
    package's namespace, or the tests' emulation). The plan is per ROI (the kernels, at this rank's ROI
    offset); the loss runs the fused kernels' stages with sums over the ranks in between (GlobalLoss). An error
    of one rank is raised on every rank ("Errors" above). Meta and fake tensors hold no data to share: they get
    the local loss's shapes, without collectives."""

    def plan(plan_params, check_inputs, seed, roi_offset):
        # A tensor offset (join's no-sync path, whose seed is a tensor too) is read where it lives.
        op = ops.roi_plan.offset_tensor if isinstance(roi_offset, Tensor) else seeded_overload(ops.roi_plan, seed)
        labels, keys, keep = op(masks, cams, is_novel, valid, plan_params.delta, plan_params.sigma,
                                plan_params.hard_sqdist, plan_params.min_keys, seed, roi_offset, check_inputs)
        _validation.check_cam_values_after_kernel(cams, is_novel, check_inputs)
        return labels, keys, keep

    params, membership, labels, keys, keep = plan_together(group, z, masks, cams, is_novel, valid, options,
                                                           check_inputs, plan)
    if membership is None:  # meta or fake tensors
        loss, queries, _, _ = ops.contrastive_loss(z, labels, keys, keep, *params)
    else:
        loss, queries = kernel_loss(group, ops, z, labels, keys, keep, params)
    if options["return_stats"]:
        return loss, loss_stats(keys, keep, queries, params.share_queries)
    return loss
