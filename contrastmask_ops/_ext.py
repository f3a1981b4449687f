"""Loads the compiled operators (contrastmask_ops._C) once, and says what was compiled."""
import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.contrastmask.*)

    HAS_EXTENSION = True
    _IMPORT_ERROR = None
except ImportError as exc:  # not built: the public API falls back to contrastmask_ops.reference
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc

_warned = False


def warn_fallback_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "contrastmask_ops: the compiled extension is not available (%s); using the pure-PyTorch "
            "reference implementation, which is much slower. Build it with `pip install --no-build-isolation .` "
            "or `make build`." % (_IMPORT_ERROR,),
            RuntimeWarning,
            stacklevel=3,
        )


def has_kernel(device_type: str) -> bool:
    """True if the compiled library holds kernels for this device type ("CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("contrastmask::roi_plan", device_type)


def build_info() -> dict:
    """What was compiled (CPU, CUDA, arch list) and which versions it was built and runs with."""
    try:
        from ._build_config import BUILD_CONFIG
    except ImportError:
        BUILD_CONFIG = {}
    return {
        "extension": HAS_EXTENSION,
        "extension_error": None if HAS_EXTENSION else str(_IMPORT_ERROR),
        "cpu": has_kernel("CPU"),
        "cuda": has_kernel("CUDA"),
        "cuda_arch_list": BUILD_CONFIG.get("cuda_arch_list"),
        "built_with_torch": BUILD_CONFIG.get("built_with_torch"),
        "built_with_cuda": BUILD_CONFIG.get("built_with_cuda"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
