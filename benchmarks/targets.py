"""The library's speed targets (benchmarks/README.md, "Targets"), evaluated on a finished sweep (never by a
timed test).

Each target names the shape it is judged at, how its figure is computed from the results, and the bar.
A target whose device or inputs were not part of the run reads "n/a".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Bytes of the fused loss's math: forward reads z twice, backward reads z twice and writes dz once.
BYTE_FLOOR_PASSES = 5
# Peak extra memory allowed to the fused op: |z| (dz) plus this many bytes per ROI pixel (labels, keys,
# per-pixel statistics: the O(N*H*W) part).
BYTES_PER_PIXEL_ALLOWANCE = 64


@dataclass
class Target:
    device: str  # "cpu" or "cuda"
    description: str
    bar: float
    kind: str  # "min": figure >= bar; "max": figure <= bar
    unit: str
    figure: Callable  # (Results) -> float | None


def _ratio(slow_impl, stage, n, c=256, dtype="float32"):
    def figure(results):
        slow = results.time(slow_impl, stage, n, c, dtype)
        fast = results.time("fused", stage, n, c, dtype)
        return None if slow is None or fast is None else slow / fast
    return figure


def _bandwidth_fraction(n, c=256, dtype="float32"):
    def figure(results):
        achieved = results.fused_bandwidth(n, c, dtype)
        return None if achieved is None or not results.copy_bandwidth else achieved / results.copy_bandwidth
    return figure


def _memory_over_allowance(n, c=256, dtype="float32", h=28, w=28):
    def figure(results):
        peak = results.peak("fused", "pipeline_fwd_bwd", n, c, dtype)
        if peak is None:
            return None
        z_bytes = n * c * h * w * results.element_size(dtype)
        return peak / (z_bytes + BYTES_PER_PIXEL_ALLOWANCE * n * h * w)
    return figure


def _model_share(results):
    return results.model_step_share()


SLOW_IMPL_NAMES = {"per_roi": "per-ROI pipeline", "reference": "reference"}


def _speedup(device, what, slow_impl, stage, n, bar):
    """The target: slow_impl's time over the fused one's for stage, at N = n, C = 256, float32, at least bar."""
    return Target(device, f"{what}, {SLOW_IMPL_NAMES[slow_impl]} / fused (N={n}, C=256, fp32)", bar, "min", "x",
                  _ratio(slow_impl, stage, n))


TARGETS = [
    _speedup("cpu", "plan", "per_roi", "plan", 128, 50),
    _speedup("cpu", "pipeline fwd+bwd", "reference", "pipeline_fwd_bwd", 128, 5),
    _speedup("cpu", "loss alone fwd+bwd", "reference", "loss_fwd_bwd", 128, 2),
    _speedup("cuda", "pipeline fwd+bwd", "reference", "pipeline_fwd_bwd", 512, 10),
    _speedup("cuda", "pipeline fwd+bwd", "per_roi", "pipeline_fwd_bwd", 512, 200),
    Target("cuda", "fused loss fwd+bwd bandwidth over 5|z| / copy bandwidth (N=2048, C=256, fp32)", 0.5, "min",
           "", _bandwidth_fraction(2048)),
    Target("cuda", "fused pipeline fwd+bwd peak extra memory / (|z| + 64 B*N*H*W) (N=2048, C=256, fp32)", 1.0,
           "max", "", _memory_over_allowance(2048)),
    Target("cuda", "loss share of a training step (R50-FPN, 2 images)", 0.03, "max", "", _model_share),
]

# Informative figures printed next to the targets (no bar).
INFO = [
    ("cpu", "loss forward alone, reference / fused (N=128, C=256, fp32)", _ratio("reference", "loss_fwd", 128)),
    ("cpu", "fused loss fwd+bwd bandwidth / copy bandwidth (N=2048, C=256, fp32)", _bandwidth_fraction(2048)),
    ("cpu", "fused pipeline peak extra memory / (|z| + 64 B*N*H*W) (N=2048, C=256, fp32)",
     _memory_over_allowance(2048)),
]


def evaluate(results) -> list[dict]:
    """One row per target: figure, bar, and 'met' / 'MISSED' / 'n/a'."""
    rows = []
    for target in TARGETS:
        figure = target.figure(results) if results.device_type == target.device else None
        if figure is None:
            verdict = "n/a"
        elif target.kind == "min":
            verdict = "met" if figure >= target.bar else "MISSED"
        else:
            verdict = "met" if figure <= target.bar else "MISSED"
        rows.append({"device": target.device, "target": target.description,
                     "bar": ("≥ " if target.kind == "min" else "≤ ") + f"{target.bar:g}{target.unit}",
                     "figure": figure, "unit": target.unit, "verdict": verdict})
    for device, description, figure_fn in INFO:
        figure = figure_fn(results) if results.device_type == device else None
        if figure is not None:
            rows.append({"device": device, "target": description, "bar": "(info)", "figure": figure,
                         "unit": "", "verdict": "info"})
    return rows
