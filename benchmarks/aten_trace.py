"""The aten operator sequence of a PyTorch function, with the bytes each operator would move on a GPU:
what the memory-traffic model (benchmarks/gpu_model.py) needs to predict the pure-PyTorch reference on
equal terms with the fused kernels, recorded on the CPU.

Each operator that is not a view, a shape query or an allocation is one kernel launch that reads each
input tensor's memory span once and writes each output once (an elementwise op or a reduction of a
memory-bound loss moves no more than that; nothing is assumed to stay in cache between launches). Host
reads (`.item()`, `.tolist()`) are counted: on a GPU each is a synchronisation.
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Operators that launch nothing: metadata, allocation without initialisation, and host reads (counted apart).
_NO_LAUNCH = {"empty", "empty_like", "empty_strided", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
              "is_same_size", "_local_scalar_dense", "resize_", "set_", "lift_fresh", "detach", "alias",
              "_to_copy_meta", "is_nonzero"}


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory a tensor's elements occupy (an expanded or broadcast tensor counts its storage once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 1)
    return min(span, t.numel()) * t.element_size()


def _is_view(func) -> bool:
    schema = func._schema
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _launches(func) -> bool:
    name = func._schema.name.split("::")[-1]
    return name not in _NO_LAUNCH and not _is_view(func)


class AtenRecorder(TorchDispatchMode):
    """Records (op name, input bytes, output bytes) of every launching aten op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if name == "_local_scalar_dense":
            self.host_reads += 1
        elif _launches(func):
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            # An in-place or out= op writes a tensor it was given: its bytes count as written, not read twice.
            out_ids = {id(o) for o in outputs}
            read = sum(span_bytes(t) for t in inputs if id(t) not in out_ids)
            written = sum(span_bytes(t) for t in outputs)
            self.ops.append((name, read, written))
        return out


def record(fn):
    """Runs fn() under the recorder (and counts Tensor.tolist calls as host reads); returns the recorder."""
    recorder = AtenRecorder()
    tolist = torch.Tensor.tolist
    counter = collections.Counter()

    def counting_tolist(self, *a, **k):
        counter["tolist"] += 1
        return tolist(self, *a, **k)

    torch.Tensor.tolist = counting_tolist
    try:
        with recorder:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    recorder.host_reads += counter["tolist"]
    return recorder
