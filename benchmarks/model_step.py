"""Hook: the loss's share of one training step of the reference model (model/, ResNet-50-FPN, 2 images).

Skips cleanly (returns a dict saying why) until model/ exists and offers what is needed.
"""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def maybe_measure(mode: str, device):
    """mode 'off': None; 'auto': measure on CUDA only; 'on': measure on any device."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if not (REPO_ROOT / "model" / "__init__.py").exists():
        return {"skipped": "model/ does not exist yet"}
    return {"skipped": "model/ exists but the step measurement is not wired yet"}


def summary(result: dict) -> str:
    if "skipped" in result:
        return "skipped: " + result["skipped"]
    return f"loss share {result['loss_share']:.1%} of a {result['step_ms']:.1f} ms step"
