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



def has_kernel(device_type: str) -> bool:
    """True if the compiled library holds kernels for this device type ("cpu", "cuda", or the dispatch
    key's name "CPU", "CUDA")."""
    if not HAS_EXTENSION:
        return False
    key = device_type if device_type[:1].isupper() else torch._C._dispatch_key_for_device(device_type)
    return torch._C._dispatch_has_kernel_for_dispatch_key("contrastmask::roi_plan", key)


# Device types whose tensors the compiled operators take. The public API's dispatch
# (functional._use_kernels) and build_info() both read this one set, so the model's backend() and the
# dispatch agree. "meta" (shapes only) is served by the fake kernels of ops.py, which the package
# registers whenever the extension loads.
KERNEL_DEVICE_TYPES = frozenset([t for t in ("cpu", "cuda") if has_kernel(t)] + (["meta"] if HAS_EXTENSION else []))

_warned = set()


def warn_fallback_once(device_type: str = "cpu"):
    """One warning per device type that the reference runs instead of the compiled kernels."""
    if device_type in _warned:
        return
    _warned.add(device_type)
    if HAS_EXTENSION:
        reason = f"this build has no {device_type} kernels (it holds kernels for: {sorted(KERNEL_DEVICE_TYPES)})"
    else:
        reason = f"the compiled extension is not available ({_IMPORT_ERROR})"
    warnings.warn(
        f"contrastmask_ops: {reason}; using the pure-PyTorch reference implementation for {device_type} tensors, "
        "which is much slower. Build it with `pip install --no-build-isolation .` or `make build`.",
        RuntimeWarning,
        stacklevel=4,
    )


def build_info() -> dict:
    """What was compiled (CPU, CUDA, arch list), with which CUDA toolkit and why (cuda_toolkit_reason: found by
    torch, found by the search, or none and why), and which versions it was built and runs with."""
    return {
        "extension": HAS_EXTENSION,
        "extension_error": None if HAS_EXTENSION else str(_IMPORT_ERROR),
        "cpu": "cpu" in KERNEL_DEVICE_TYPES,
        "cuda": "cuda" in KERNEL_DEVICE_TYPES,
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
