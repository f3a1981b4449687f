"""Query sharing across processes (docs/DESIGN.md, "Global query sharing").

The loss of a batch split over the ranks of a torch.distributed process group, equal to the loss of the
whole batch (all ranks' ROIs concatenated in rank order). Everything in the loss that crosses ROIs is a
sum of O(C) numbers, so each rank computes its partial sums and a *reducer* turns them into the sums over
the whole batch. The loss math (reference._loss_and_queries) takes the reducer as an argument:
`LOCAL` (every reduction is the identity) gives today's single-process loss, bit for bit.

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
from torch.autograd.function import once_differentiable


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
    roi_offset: int  # this rank's first ROI in the whole batch
    seed: int        # the key sampler's seed, the same on every rank (a tensor seed is read by the join)


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


def join(process_group, z: Tensor, plan, params, draw_seed) -> Membership:
    """One all_gather of (N, C, H, W, accumulation dtype, seed, parameters) from every rank (plan and params:
    common.PlanParams and LossParams). Returns the reducer, this rank's ROI offset (the ROIs of the ranks
    before it) and the seed: the callers' seed when every rank passes the same one, else (seed=None on every
    rank) the draw_seed() of the group's first rank.
    Raises on every rank when the ranks disagree or one of them failed its checks (fail_together)."""
    n, c, h, w = z.shape
    seed = plan.seed
    given = seed is not None
    fingerprint = parameters_fingerprint(plan._replace(seed=None), params)
    seed_is_tensor = isinstance(seed, Tensor)
    mine = [0, n, c, h, w, int(z.dtype == torch.float64), int(given),
            0 if seed_is_tensor else seed if given else draw_seed(), fingerprint]
    row = torch.tensor(mine, dtype=torch.int64, device=z.device)
    if seed_is_tensor:
        row[7] = seed  # a copy on the device; the one host read below brings it back with the rest
    rows = torch.stack(_gather(row, process_group)).tolist()
    if any(r[0] for r in rows):
        _raise_with_the_others(process_group, [bool(r[0]) for r in rows], None)
    rows = [r[1:] for r in rows]
    rank = dist.get_rank(process_group)
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
    return Membership(ProcessGroupReducer(process_group), offset, rows[0][6])
