"""Loads the compiled operators (contrastmask_ops._C) once, and says what was compiled."""
import warnings

import torch

try:
    from ._build_config import BUILD_CONFIG
except ImportError:  # not built (or built by something other than setup.py)
    BUILD_CONFIG = {}


class TorchVersionMismatch(ImportError):
    """The extension was compiled against another torch than the one running: its C++ ABI is not stable
    across torch versions, so loading it could fail on missing symbols or, worse, load and misbehave."""


def _load():
    built_with = BUILD_CONFIG.get("built_with_torch")
    if built_with is not None and built_with != torch.__version__:
        raise TorchVersionMismatch(
            f"it was built with torch {built_with} but torch {torch.__version__} is running; rebuild it "
            "with `pip install --no-build-isolation .` in this environment")
    from . import _C  # noqa: F401  (importing registers torch.ops.contrastmask.*)


try:
    _load()
    HAS_EXTENSION = True
    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built for another torch: the public API falls back to the reference
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc

_warned = False


def fallback_warning() -> str:
    """One line: why the compiled extension is not used."""
    if isinstance(_IMPORT_ERROR, TorchVersionMismatch):
        return (f"contrastmask_ops: the compiled extension is not used: {_IMPORT_ERROR}; using the pure-PyTorch "
                "reference implementation, which is much slower.")
    error = " ".join(str(_IMPORT_ERROR).split())
    return ("contrastmask_ops: the compiled extension is not available (%s); using the pure-PyTorch "
            "reference implementation, which is much slower. Build it with `pip install --no-build-isolation .` "
            "or `make build`." % (error,))


def warn_fallback_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(fallback_warning(), RuntimeWarning, stacklevel=3)


def has_kernel(device_type: str) -> bool:
    """True if the compiled library holds kernels for this device type ("CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("contrastmask::roi_plan", device_type)


def build_info() -> dict:
    """What was compiled (CPU, CUDA, arch list), with which CUDA toolkit and why (cuda_toolkit_reason: found by
    torch, found by the search, or none and why), and which versions it was built and runs with."""
    return {
        "extension": HAS_EXTENSION,
        "extension_error": None if HAS_EXTENSION else str(_IMPORT_ERROR),
        "cpu": has_kernel("CPU"),
        "cuda": has_kernel("CUDA"),
        "cuda_arch_list": BUILD_CONFIG.get("cuda_arch_list"),
        "built_with_torch": BUILD_CONFIG.get("built_with_torch"),
        "built_with_cuda": BUILD_CONFIG.get("built_with_cuda"),
        "cuda_toolkit": (BUILD_CONFIG.get("cuda_toolkit") or {}).get("home"),
        "cuda_toolkit_reason": BUILD_CONFIG.get("cuda_toolkit_reason"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
