"""The sampler's seed (DESIGN, "Seed"): what the public functions take, the draw for seed=None, and the
overload of a seeded op that takes it."""
from typing import Union

import torch
from torch import Tensor

Seed = Union[int, Tensor, None]  # an integer, a 0-dim int64 tensor, or None (drawn)


def draw_seed() -> int:
    """seed=None draws from torch's default CPU generator, so torch.manual_seed makes the sampler
    reproducible. Not under torch.compile: the draw is a host read, which would break the graph (or fail with
    fullgraph=True inside dynamo)."""
    if torch.compiler.is_compiling():
        from ._compile_checks import refuse_drawing_a_seed

        refuse_drawing_a_seed()
    return int(torch.randint(0, 2**63 - 1, ()).item())


def seed_or_draw(seed: Seed):
    """The seed as the plan ops take it (after _validation.seed_param): a 0-dim int64 tensor as it is, else an
    int; None draws one."""
    return draw_seed() if seed is None else seed


def seeded_overload(op, seed):
    """The op's overload for this seed: the default one takes a tensor (read on its device), .int_seed an int.
    Chosen here, not by the dispatcher's overload resolution, which would turn a tensor into an int (a host
    read) for an int parameter."""
    return op.default if isinstance(seed, Tensor) else op.int_seed
