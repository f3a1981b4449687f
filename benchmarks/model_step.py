"""The loss's share of one training step of the reference model (model/: Mask R-CNN R50-FPN + CL head,
2 images): step time with the contrastive loss, and with the loss replaced by a free stub.

    python -m benchmarks.model_step [--device cuda] [--image-size 800]

share = (step with the loss - step with the stub) / step with the loss; the stub returns 0 * z.sum(), so
the CL head's projector still runs and only the loss (plan + loss forward + backward) is left out.
Skips cleanly, with the reason, while model/ does not exist or offers no model builder.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Builders model/ may offer (first found wins): a callable returning a torchvision-style detector that, in
# train mode, maps (images, targets) to a dict of losses.
BUILDER_NAMES = ("build_model", "contrastmask_resnet50_fpn", "build_contrastmask")


def maybe_measure(mode: str, device: torch.device, **kwargs):
    """For run.py. mode 'off': None; 'auto': measure on CUDA only; 'on': measure on any device."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    try:
        return measure(device, **kwargs)
    except Exception as exc:  # never lose a finished sweep to the optional model step
        return {"skipped": f"model step failed: {type(exc).__name__}: {exc}"}


def _find_builder():
    if not (REPO_ROOT / "model" / "__init__.py").exists():
        return None, "model/ does not exist yet"
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    package = importlib.import_module("model")
    for name in BUILDER_NAMES:
        if callable(getattr(package, name, None)):
            return getattr(package, name), None
    return None, f"model/ offers none of {BUILDER_NAMES}"


def synthetic_targets(device, image_size: int, num_classes: int, objects: int = 8, seed: int = 0):
    """Two images with `objects` boxes and masks each (ellipses), labels in 1..num_classes-1."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    ys = torch.arange(image_size).view(-1, 1)
    xs = torch.arange(image_size).view(1, -1)
    for _ in range(2):
        images.append(torch.rand(3, image_size, image_size, generator=gen).to(device))
        centres = torch.randint(image_size // 8, image_size * 7 // 8, (objects, 2), generator=gen)
        sizes = torch.randint(image_size // 16, image_size // 4, (objects, 2), generator=gen)
        boxes = torch.cat([centres - sizes, centres + sizes], dim=1).clamp(0, image_size - 1).float()
        masks = torch.stack([(((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2 <= 1).to(torch.uint8)
                             for (cx, cy), (sx, sy) in zip(centres.tolist(), sizes.tolist())])
        labels = torch.randint(1, num_classes, (objects,), generator=gen)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


@contextmanager
def loss_stubbed(model):
    """Replace every QuerySharingContrastiveLoss inside the model by a free stub (keeps z in the graph)."""
    import contrastmask_ops as cm

    losses = [m for m in model.modules() if isinstance(m, cm.QuerySharingContrastiveLoss)]
    saved = [m.forward for m in losses]
    for m in losses:
        m.forward = lambda z, *args, **kwargs: z.sum() * 0.0
    try:
        yield len(losses)
    finally:
        for m, forward in zip(losses, saved):
            m.forward = forward


def _time_steps(step, device, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def measure(device: torch.device, image_size: int = 800, num_classes: int = 81, warmup: int = 3, reps: int = 10):
    builder, reason = _find_builder()
    if builder is None:
        return {"skipped": reason}
    model = builder(num_classes=num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    images, targets = synthetic_targets(device, image_size, num_classes)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    with_loss = _time_steps(step, device, warmup, reps)
    with loss_stubbed(model) as found:
        if not found:
            return {"skipped": "no QuerySharingContrastiveLoss module found inside the model"}
        without_loss = _time_steps(step, device, warmup, reps)
    step_s, stub_s = statistics.median(with_loss), statistics.median(without_loss)
    return {"step_ms": step_s * 1e3, "step_without_loss_ms": stub_s * 1e3, "loss_ms": (step_s - stub_s) * 1e3,
            "loss_share": max(step_s - stub_s, 0.0) / step_s, "images": 2, "image_size": image_size,
            "reps": reps, "device": str(device)}


def summary(result: dict) -> str:
    if "skipped" in result:
        return "skipped: " + result["skipped"]
    return (f"loss share {result['loss_share']:.1%} of a {result['step_ms']:.1f} ms step "
            f"({result['loss_ms']:.2f} ms for the loss, 2 images of {result['image_size']} px)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=800)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(summary(measure(torch.device(args.device), image_size=args.image_size, reps=args.reps)))
