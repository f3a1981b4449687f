"""Argument validation, one copy for the compiled path (functional.py, global_batch.py, fake_kernels.py) and
the reference, so the two paths accept and reject the same calls with the same messages.

Validation here reads only metadata (types, shapes, dtypes, devices) and Python scalars: it costs no
host sync and runs under torch.compile and on fake tensors. The two checks that read tensor values (masks
hold only 0/1; cams present when some ROI is novel) are the kernels' job on the compiled path (DESIGN,
"Validation cost") and `check_mask_values` / `check_cams_present` on the reference's; the NaN test of
novel ROIs' CAMs, which the kernels do not make, is `check_cam_values` on both.

Every message starts with the name of the argument at fault and describes a bad value briefly (a list or
an array is named by its type and shape, never printed); Python numbers are printed with repr(), i.e. in
full precision. The value checks use the kernels' own wording (csrc/ops/checks.h, raise_plan_errors), so
the two paths raise the same message for the same bad values.
"""
import math
import operator
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ._seed import Seed

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_PIXELS = 4096  # H * W limit of the kernels (SPEC)
# Smallest temperature accepted: the logits s / t reach 1 / t, which must stay far inside float32's
# range for finite inputs to give a finite loss (DESIGN, "Numerics"); kMinTemperature in csrc/ops/checks.h.
MIN_TEMPERATURE = 1e-4
FORMULATIONS = ("paper", "released")
Z_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def describe(value) -> str:
    """A short description of a value for an error message: repr() of a Python or numpy scalar or a
    short string; type and shape of anything larger (never its data)."""
    if isinstance(value, (bool, int, float, complex, str, np.generic)) or value is None:
        text = repr(value)
        if len(text) <= 80:
            return text
        return f"a {type(value).__name__} of {len(text)} characters"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype} on {value.device}"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"an object of type {type(value).__name__}"


def _require(cond, error_type, message) -> None:
    """Raise error_type(message()) unless cond. cond may be a SymBool (fake kernels under dynamic
    shapes): then torch._check_with records it as a runtime assertion instead of specialising."""
    if cond is True:  # the common case, first: this runs some twenty times per call
        return
    if isinstance(cond, bool):
        if not cond:
            raise error_type(message())
    else:
        torch._check_with(error_type, cond, message)


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape)


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------

def check_tensor(name: str, x, ndim: int, shape_text: str) -> None:
    """x is a torch.Tensor with ndim dimensions (shape_text: the expected shape, e.g. "(N, H, W)")."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {describe(x)}")
    _require(x.dim() == ndim, ValueError, lambda: f"{name} must have shape {shape_text}, got shape {_shape(x)}")


def check_dtype(name: str, x: Tensor, dtypes, what: str) -> None:
    _require(x.dtype in dtypes, ValueError, lambda: f"{name} must be {what}, got {x.dtype}")


def check_same_device(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    _require(x.device == ref.device, ValueError,
             lambda: f"{name} is on {x.device} but {ref_name} is on {ref.device}; they must be on the same device")


def check_grid(name: str, x: Tensor) -> None:
    """x is (N, H, W) with H, W >= 1 and H * W <= MAX_PIXELS."""
    h, w = x.shape[1], x.shape[2]
    _require(h >= 1, ValueError, lambda: f"{name}: H and W must be at least 1, got shape {_shape(x)}")
    _require(w >= 1, ValueError, lambda: f"{name}: H and W must be at least 1, got shape {_shape(x)}")
    _require(h * w <= MAX_PIXELS, ValueError,
             lambda: f"{name}: H*W = {h * w} exceeds the limit of {MAX_PIXELS} pixels per ROI")


def check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    _require(_shape(x) == _shape(ref), ValueError,
             lambda: f"{name} has shape {_shape(x)} but {ref_name} has shape {_shape(ref)}; they must match")


def check_roi_flags(name: str, x, ref_name: str, ref: Tensor) -> None:
    """x: (N,) bool on ref's device, N = ref.shape[0]."""
    check_tensor(name, x, 1, "(N,)")
    check_dtype(name, x, (torch.bool,), "bool")
    _require(x.shape[0] == ref.shape[0], ValueError,
             lambda: f"{name} has {x.shape[0]} entries but {ref_name} has N = {ref.shape[0]} ROIs")
    check_same_device(name, x, ref_name, ref)


def check_masks(masks) -> None:
    """masks: (N, H, W), bool/uint8/floating (values are checked by check_mask_values or the kernels)."""
    check_tensor("masks", masks, 3, "(N, H, W)")
    check_dtype("masks", masks, MASK_DTYPES, "bool, uint8 or floating point")
    check_grid("masks", masks)


def check_plan_tensors(masks, cams, is_novel, valid) -> None:
    """The tensors of partition / roi_plan / the whole pipeline."""
    check_masks(masks)
    if cams is not None:
        check_tensor("cams", cams, 3, "(N, H, W)")
        _require(cams.dtype.is_floating_point, ValueError, lambda: f"cams must be floating point, got {cams.dtype}")
        check_same_shape("cams", cams, "masks", masks)
        check_same_device("cams", cams, "masks", masks)
    check_roi_flags("is_novel", is_novel, "masks", masks)
    if valid is not None:
        check_roi_flags("valid", valid, "masks", masks)


def check_labels(labels) -> None:
    check_tensor("labels", labels, 3, "(N, H, W)")
    check_dtype("labels", labels, (torch.int8,), "int8")
    check_grid("labels", labels)


def check_per_pixel(name: str, x, dtype: torch.dtype, labels: Tensor) -> None:
    """x: a per-pixel tensor of dtype beside labels, of its shape and on its device."""
    check_tensor(name, x, 3, "(N, H, W)")
    check_dtype(name, x, (dtype,), str(dtype).removeprefix("torch."))
    check_same_shape(name, x, "labels", labels)
    check_same_device(name, x, "labels", labels)


def check_sample_tensors(labels, sqdist, is_novel) -> None:
    check_labels(labels)
    check_per_pixel("sqdist", sqdist, torch.int32, labels)
    check_roi_flags("is_novel", is_novel, "labels", labels)


def check_z(z, n, h, w, ref_name: str, ref: Tensor) -> None:
    """z: (N, C, H, W) float16/bfloat16/float32/float64 matching ref's N, H, W and device. Messages blame
    z: it is the tensor the user passes beside the masks (or labels)."""
    check_tensor("z", z, 4, "(N, C, H, W)")
    check_dtype("z", z, Z_DTYPES, "float16, bfloat16, float32 or float64")
    _require(z.shape[0] == n, ValueError, lambda: f"z has N = {z.shape[0]} ROIs but {ref_name} has N = {n}")
    _require(z.shape[1] >= 1, ValueError, lambda: f"z must have at least one channel (C >= 1), got shape {_shape(z)}")
    _require(z.shape[2] == h, ValueError,
             lambda: f"z has H, W = {_shape(z)[2:]} but {ref_name} has H, W = {(h, w)}")
    _require(z.shape[3] == w, ValueError,
             lambda: f"z has H, W = {_shape(z)[2:]} but {ref_name} has H, W = {(h, w)}")
    check_same_device("z", z, ref_name, ref)


def check_loss_tensors(z, labels, keys, keep) -> None:
    """The tensors of contrastive_loss_from_keys. z is checked against labels first where labels
    itself is well-formed, so a z of the wrong N/H/W is blamed, not labels."""
    check_labels(labels)
    n, h, w = labels.shape
    check_z(z, n, h, w, "labels", labels)
    check_per_pixel("keys", keys, torch.uint8, labels)
    check_roi_flags("keep", keep, "labels", labels)


# Tensor values (reference path only: the kernels check these themselves, without a separate pass).
# The messages are the kernels' (csrc/ops/checks.h, raise_plan_errors), word for word.
MASKS_NOT_BINARY = "masks: expected values 0 or 1 only"
MISSING_CAMS = "cams: required when some ROI is novel (is_novel has a True entry)"


def check_mask_values(masks: Tensor) -> None:
    """masks hold only 0 and 1 (DESIGN, "Masks": every row, novel and invalid ones included). Reads the data."""
    if masks.dtype != torch.bool and bool(((masks != 0) & (masks != 1)).any()):
        raise ValueError(MASKS_NOT_BINARY)


def check_cams_present(cams, is_novel: Tensor) -> None:
    """cams may be None only when no ROI is novel. Reads is_novel."""
    if cams is None and bool(is_novel.any()):
        raise ValueError(MISSING_CAMS)


# Not a kernel check: both paths run this one (DESIGN, "NaN" and "Validation cost").
NAN_IN_CAMS = "cams: expected no NaN in the CAM of a novel ROI, got NaN in ROI {}"


def check_cam_values(cams, is_novel: Tensor) -> None:
    """No NaN in the CAM of a novel ROI: such a pixel would be neither foreground nor background, and left out
    without a word. Rows of base ROIs are never read, so they are not checked. Reads the data."""
    if cams is None:
        return
    nan_rows = torch.isnan(cams).flatten(1).any(dim=1) & is_novel
    if bool(nan_rows.any()):
        raise ValueError(NAN_IN_CAMS.format(int(nan_rows.nonzero()[0, 0])))


def check_cam_values_after_kernel(cams, is_novel: Tensor, check_inputs: bool) -> None:
    """check_cam_values on the compiled path, whose kernels do not make it. Run after the kernel, so that bad
    masks or missing CAMs are reported first, as the reference does. Left out under torch.compile (it reads
    values on the host, which a graph cannot do; DESIGN, "Validation cost") and for meta and fake tensors,
    which hold no values."""
    if not check_inputs or cams is None or torch.compiler.is_compiling():
        return
    if cams.device.type == "meta" or is_fake(cams):
        return
    check_cam_values(cams, is_novel)


# ---------------------------------------------------------------------------------------------
# Python scalars: checked, then returned in the form the kernels take
# ---------------------------------------------------------------------------------------------

def _as_real(name: str, value) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (bool, np.bool_)):  # float(True) is 1.0: a bool is a caller's slip, not a number
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if isinstance(value, (Tensor, np.ndarray)) and value.ndim != 0:
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got {describe(value)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {describe(value)}") from None


def real_in(name: str, value, lo: float, hi: float, *, lo_open: bool, hi_open: bool = False) -> float:
    """value as a float in the interval [lo, hi] (ends open as asked); NaN is rejected."""
    v = _as_real(name, value)
    ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:  # also catches NaN
        interval = ("(" if lo_open else "[") + f"{lo!r}, {hi!r}" + (")" if hi_open else "]")
        raise ValueError(f"{name} must lie in {interval}, got {describe(value)}")
    return v


def temperature(name: str, value, *, finite: bool = True) -> float:
    """A temperature: a number >= MIN_TEMPERATURE, finite unless finite=False (the raw ops accept inf)."""
    v = _as_real(name, value)
    if not (v >= MIN_TEMPERATURE and (v < math.inf or not finite)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number >= {MIN_TEMPERATURE!r}, "
                         f"got {describe(value)}")
    return v


def integer(name: str, value, minimum: Optional[int] = None) -> int:
    """value as a Python int (an int, a numpy integer or anything with __index__; not a float)."""
    if type(value) is int:
        v = value
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {describe(value)}")
    else:
        try:
            v = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an integer, got {describe(value)}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {describe(value)}")
    return v


def flag(name: str, value) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return bool(value)


def delta_param(delta) -> float:
    return real_in("delta", delta, 0.0, 0.5, lo_open=False)


def sigma_param(sigma) -> float:
    return real_in("sigma", sigma, 0.0, 1.0, lo_open=True)


def hard_sqdist_param(hard_sqdist) -> int:
    """Any integer; clamped to [-1, INT32_MAX], which gives the same sets (squared distances are
    >= 0 and <= INT32_MAX) and fits the kernels' int64 (so 2**63 is accepted, as in the reference)."""
    return min(max(integer("hard_sqdist", hard_sqdist), -1), INT32_MAX)


def min_keys_param(min_keys) -> int:
    """Any integer >= 0; clamped to INT32_MAX (no set has more than MAX_PIXELS pixels)."""
    return min(integer("min_keys", min_keys, minimum=0), INT32_MAX)


def seed_param(seed):
    """None; a 0-dim int64 tensor, returned as it is (its 64 bits are the seed, read where the tensor lives:
    a compiled graph takes a new seed each call without recompiling, and a CUDA seed costs no host sync);
    or any integer, returned as its 64 bits in a signed int64 (SPEC: the seed is taken mod 2^64)."""
    if seed is None:
        return None
    if isinstance(seed, Tensor):
        _require(seed.dim() == 0, ValueError,
                 lambda: f"seed must be an integer or a 0-dim int64 tensor, got {describe(seed)}")
        _require(seed.dtype == torch.int64, ValueError,
                 lambda: f"seed must be an integer or a 0-dim int64 tensor, got {describe(seed)}")
        return seed
    # Branch-free, so that under torch.compile a symbolic seed gets no guard on its sign (one graph for all seeds).
    return (integer("seed", seed) + 2**63) % 2**64 - 2**63


def check_seed_device(seed, ref_name: str, ref: Tensor) -> None:
    """A tensor seed lives on the CPU or on ref's device (the kernels read it there)."""
    if isinstance(seed, Tensor):
        _require(seed.device.type == "cpu" or seed.device == ref.device, ValueError,
                 lambda: f"seed is on {seed.device} but {ref_name} is on {ref.device}; a tensor seed must be on "
                         f"the CPU or on the device of {ref_name}")


def roi_offset_param(roi_offset, n) -> int:
    """The index of the first of the call's n ROIs in the whole batch (batches split across processes): an
    integer >= 0 such that every ROI's index roi_offset + i, i < n, fits in int64, the operators' integer
    type (the kernels add them in int64): at most 2**63 - max(n, 1). n may be symbolic (fake kernels)."""
    v = integer("roi_offset", roi_offset, minimum=0)

    def message():
        return (f"roi_offset must lie in [0, 2**63 - max(N, 1)] (every ROI's index roi_offset + n, n < N, fits in "
                f"int64), got {describe(roi_offset)} with N = {n}")

    _require(v <= INT64_MAX, ValueError, message)
    if v > 0:  # n - 1 <= INT64_MAX - v; at roi_offset 0 no batch comes near it
        _require(n - 1 <= INT64_MAX - v, ValueError, message)
    return v


def formulation_param(formulation) -> str:
    if not isinstance(formulation, str) or formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {describe(formulation)}")
    return formulation


def process_group_param(process_group):
    """None, or a torch.distributed ProcessGroup of an initialised torch.distributed."""
    if process_group is None:
        return None
    import torch.distributed as dist  # only here: most calls never need it

    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError("process_group must be None or a torch.distributed ProcessGroup, got "
                        + describe(process_group))
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (call init_process_group first)")
    return process_group


class PlanParams(NamedTuple):
    delta: float
    sigma: float
    hard_sqdist: int
    min_keys: int
    seed: Seed  # seed_param's result


class LossParams(NamedTuple):
    tau_easy: float
    tau_hard: float
    share_queries: bool
    formulation: str


def sampling_params(*, sigma=0.3, hard_sqdist=2, min_keys=5, seed=None):
    """(sigma, hard_sqdist, min_keys, seed) checked and normalised."""
    return sigma_param(sigma), hard_sqdist_param(hard_sqdist), min_keys_param(min_keys), seed_param(seed)


def loss_params(*, tau_easy=0.7, tau_hard=0.3, share_queries=True, formulation="paper") -> LossParams:
    return LossParams(temperature("tau_easy", tau_easy), temperature("tau_hard", tau_hard),
                      flag("share_queries", share_queries), formulation_param(formulation))


def plan_params(*, delta=0.1, sigma=0.3, hard_sqdist=2, min_keys=5, seed=None) -> PlanParams:
    return PlanParams(delta_param(delta), *sampling_params(sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys,
                                                           seed=seed))


def loss_module_params(*, delta, sigma, tau_easy, tau_hard, hard_sqdist, min_keys, share_queries, formulation):
    """The parameters QuerySharingContrastiveLoss holds, checked at construction."""
    plan_params(delta=delta, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys)
    loss_params(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries, formulation=formulation)


# ---------------------------------------------------------------------------------------------
# Whole calls (the public functions of functional.py and reference.py)
# ---------------------------------------------------------------------------------------------

def partition_args(masks, cams, is_novel, valid, delta) -> float:
    check_plan_tensors(masks, cams, is_novel, valid)
    return delta_param(delta)


def sample_keys_args(labels, sqdist, is_novel, *, sigma, hard_sqdist, min_keys, seed, roi_offset=0):
    """(sigma, hard_sqdist, min_keys, seed, roi_offset) checked and normalised."""
    check_sample_tensors(labels, sqdist, is_novel)
    params = (*sampling_params(sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed),
              roi_offset_param(roi_offset, labels.shape[0]))
    check_seed_device(seed, "labels", labels)
    return params


def loss_from_keys_args(z, labels, keys, keep, *, tau_easy, tau_hard, share_queries, formulation) -> LossParams:
    check_loss_tensors(z, labels, keys, keep)
    return loss_params(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries, formulation=formulation)


def pipeline_args(z, masks, cams, is_novel, valid, *, delta, sigma, tau_easy, tau_hard, hard_sqdist, min_keys,
                  share_queries, formulation, seed, return_stats=False):
    """(PlanParams, LossParams) of query_sharing_contrastive_loss. z is checked against masks; return_stats
    must be a bool (it is only checked)."""
    check_plan_tensors(masks, cams, is_novel, valid)
    check_z(z, masks.shape[0], masks.shape[1], masks.shape[2], "masks", masks)
    params = (plan_params(delta=delta, sigma=sigma, hard_sqdist=hard_sqdist, min_keys=min_keys, seed=seed),
              loss_params(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share_queries, formulation=formulation))
    check_seed_device(seed, "masks", masks)
    flag("return_stats", return_stats)
    return params
