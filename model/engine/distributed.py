"""Single process or torchrun (DistributedDataParallel): gloo on CPU, nccl on GPU."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device=None):
    """Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); picks the GPU when there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def barrier(info):
    if info.distributed:
        dist.barrier()


def all_gather_object(info, obj):
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(info, values):
    """{name: float tensor} -> {name: float}, averaged over ranks (for logging only)."""
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[n].detach().float() for n in names])
    if info.distributed:
        dist.all_reduce(stacked)
        stacked /= info.world_size
    return dict(zip(names, stacked.tolist()))


def global_queries_enabled(info, global_queries):
    """config contrast.global_queries resolved: None means "when there are several processes"."""
    return info.distributed if global_queries is None else bool(global_queries)


def contrast_process_group(info, global_queries):
    """The process group the contrastive loss pools its queries and keys over, or None (this process's
    ROIs only, or a single process, whose batch is already the global one). Every rank must call this.
    A group of its own: the loss's collectives run inside forward and backward, while DDP's gradient
    all-reduces run asynchronously on the default group, and the two must not interleave on one group."""
    if not (info.distributed and global_queries_enabled(info, global_queries)):
        return None
    return dist.new_group(ranks=list(range(info.world_size)))


def cleanup(info):
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
