"""The autocast rule of the loss, on both paths (DESIGN, "Autocast"): like PyTorch's own losses (autocast policy
"fp32"), a float16/bfloat16 z is cast to float32, so the loss is computed and returned in float32; float32
and float64 z are left as they are."""
import contextlib

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _autocast_enabled(device_type: str) -> bool:
    return torch._C._is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_z(z: Tensor) -> Tensor:
    """z as the loss takes it under torch.autocast for z's device (the reference and the global loss; the
    compiled op has the autocast kernel that register() adds)."""
    if z.dtype in LOW_PRECISION and _autocast_enabled(z.device.type):
        return z.float()
    return z


def autocast_disabled(device_type: str):
    """A context that turns autocast off for device_type if it is on (the reference's matmuls must
    not drop to float16/bfloat16 inside the loss)."""
    if _autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def register(namespace: str = "contrastmask"):
    """The autocast kernel of torch.ops.<namespace>.contrastive_loss on every device type that has autocast."""
    for device_type in ("cpu", "cuda"):
        if torch._C._is_autocast_available(device_type):
            torch.library.register_autocast(namespace + "::contrastive_loss", device_type, torch.float32)
