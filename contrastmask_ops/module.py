"""nn.Module wrapper holding the loss's parameters."""
import copy
from typing import Optional

from torch import Tensor, nn

from . import _validation
from ._seed import Seed
from .functional import query_sharing_contrastive_loss


class QuerySharingContrastiveLoss(nn.Module):
    """ContrastMask's query-sharing pixel-level contrastive loss (CVPR 2022, Eqs. 1-4).

    forward(z, masks, cams, is_novel, valid=None, seed=None) -> 0-dim loss, see
    contrastmask_ops.query_sharing_contrastive_loss for the arguments (seed: an integer, a 0-dim int64 tensor, which
    a compiled step can change every call without recompiling, or None). process_group: the loss over the ROIs
    of all its ranks (under DistributedDataParallel, multiply it by the world size; see there). check_inputs=False:
    no value checks of masks and CAMs, and no host sync on CUDA (CUDA graphs); bad values give unspecified keys.
    """

    def __init__(self, *, delta: float = 0.1, sigma: float = 0.3, tau_easy: float = 0.7, tau_hard: float = 0.3,
                 hard_sqdist: int = 2, min_keys: int = 5, share_queries: bool = True, formulation: str = "paper",
                 process_group=None, check_inputs: bool = True):
        super().__init__()
        _validation.loss_module_params(delta=delta, sigma=sigma, tau_easy=tau_easy, tau_hard=tau_hard,
                                       hard_sqdist=hard_sqdist, min_keys=min_keys, share_queries=share_queries,
                                       formulation=formulation)  # bad parameters fail here, not at the first forward
        self.process_group = _validation.process_group_param(process_group)
        self.check_inputs = _validation.flag("check_inputs", check_inputs)
        self.delta, self.sigma = delta, sigma
        self.tau_easy, self.tau_hard = tau_easy, tau_hard
        self.hard_sqdist, self.min_keys = hard_sqdist, min_keys
        self.share_queries, self.formulation = share_queries, formulation

    def forward(self, z: Tensor, masks: Tensor, cams: Optional[Tensor], is_novel: Tensor,
                valid: Optional[Tensor] = None, seed: Seed = None, return_stats: bool = False):
        return query_sharing_contrastive_loss(
            z, masks, cams, is_novel, valid=valid, delta=self.delta, sigma=self.sigma, tau_easy=self.tau_easy,
            tau_hard=self.tau_hard, hard_sqdist=self.hard_sqdist, min_keys=self.min_keys,
            share_queries=self.share_queries, formulation=self.formulation, seed=seed, return_stats=return_stats,
            process_group=self.process_group, check_inputs=self.check_inputs)

    # A process group is this process's handle on a communicator: a deep copy shares it (as a copy of a model
    # under DDP shares the default group), and pickling refuses with the remedy instead of pickle's own error.
    def __deepcopy__(self, memo):
        group, self.process_group = self.process_group, None
        try:
            clone = _plain_deepcopy(self, memo)
        finally:
            self.process_group = group
        clone.process_group = group
        return clone

    def __getstate__(self):
        if self.process_group is not None:
            raise TypeError("QuerySharingContrastiveLoss: a module holding a process_group cannot be pickled (the "
                            "group is this process's communicator); pickle one built with process_group=None and "
                            "set its process_group after loading, or rebuild it in each process")
        return super().__getstate__()

    def extra_repr(self) -> str:
        return (f"delta={self.delta}, sigma={self.sigma}, tau_easy={self.tau_easy}, tau_hard={self.tau_hard}, "
                f"hard_sqdist={self.hard_sqdist}, min_keys={self.min_keys}, share_queries={self.share_queries}, "
                f"formulation={self.formulation!r}" + (", process_group=set" if self.process_group is not None else "")
                + ("" if self.check_inputs else ", check_inputs=False"))


def _plain_deepcopy(module, memo):
    """copy.deepcopy's default for an object, for a class that defines __deepcopy__ itself."""
    cls = module.__class__
    clone = cls.__new__(cls)
    memo[id(module)] = clone
    clone.__dict__.update({key: copy.deepcopy(value, memo) for key, value in module.__dict__.items()})
    return clone
