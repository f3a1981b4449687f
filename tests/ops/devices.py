"""The devices the op tests run on (the `device` fixture of conftest.py):

- "cpu": the CPU kernels (torch.ops.contrastmask on CPU tensors);
- "cuda-emu-fwd", "cuda-emu-rev", "cuda-emu-rand": the CUDA kernels compiled by the host compiler and
  emulated on the CPU (tests/emulator/cuda_emu.py; torch.ops.contrastmask_emu on CPU tensors), under the
  forward, reverse and seeded random fiber orders; always run;
- "cuda": the CUDA kernels on a GPU, when one is present.
"""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import contrastmask_ops as cm

EMU_ORDERS = ("fwd", "rev", "rand")


def has_gpu() -> bool:
    return torch.cuda.is_available() and cm.build_info()["cuda"]


@dataclass(frozen=True)
class Device:
    name: str                     # the test id: "cpu", "cuda-emu-fwd", ..., "cuda"
    kind: str                     # "cpu", "cuda-emu" or "cuda"
    order: Optional[str] = None   # fiber order of cuda-emu

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.kind == "cuda" else "cpu")

    @property
    def cuda_kernels(self) -> bool:
        """Runs the CUDA kernels (on a GPU or emulated)."""
        return self.kind != "cpu"

    @property
    def ops(self):
        """The operator namespace whose kernels this device runs."""
        return torch.ops.contrastmask_emu if self.kind == "cuda-emu" else torch.ops.contrastmask

    def to(self, t):
        """A tensor (or None) moved to this device."""
        return None if t is None else t.to(self.torch_device)

    def batch(self, b: dict) -> dict:
        """A blobs.blob_batch dict moved to this device."""
        return {k: self.to(v) for k, v in b.items()}

    def __str__(self):
        return self.name


def all_devices():
    """pytest params: cpu, the three cuda-emu orders (marked cuda_emu) and cuda (marked cuda)."""
    params = [pytest.param(Device("cpu", "cpu"), id="cpu")]
    for order in EMU_ORDERS:
        params.append(pytest.param(Device("cuda-emu-" + order, "cuda-emu", order), id="cuda-emu-" + order,
                                   marks=pytest.mark.cuda_emu))
    params.append(pytest.param(Device("cuda", "cuda"), id="cuda",
                               marks=[pytest.mark.cuda, pytest.mark.skipif(not has_gpu(), reason="needs a GPU")]))
    return params


def activate(device: Device, monkeypatch):
    """Routes the public API (contrastmask_ops.functional) to the device's kernels for one test."""
    if device.kind != "cuda-emu":
        return
    import cuda_emu
    from contrastmask_ops import functional

    ops = cuda_emu.load()
    cuda_emu.set_order(device.order)
    monkeypatch.setattr(functional, "_ops", ops)
