"""The loss's share of one training step of the reference model (model/: Mask R-CNN R50-FPN + CL head,
2 images): step time with the contrastive loss, and with the loss replaced by a free stub.

    python -m benchmarks.model_step [--device cuda] [--image-size 800]

share = (step with the loss - step with the stub) / step with the loss; the stub returns 0 * z.sum(), so
the CL head's projector still runs and only the loss (plan + loss forward + backward) is left out. The step
of the model without the CL head (use_cl off) is reported too. The images are synthetic (uniform noise,
16 elliptic instances each, half of them box-only = novel), the model randomly initialised: the step's
cost does not depend on what the pixels show, only on the image size and the number of ROIs.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch

NUM_CLASSES = 81  # COCO: 80 categories + background


def maybe_measure(mode: str, device: torch.device, **kwargs):
    """For run.py. mode 'off': None; 'auto': measure on CUDA only; 'on': measure on any device."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    try:
        return measure(device, **kwargs)
    except Exception as exc:  # never lose a finished sweep to the optional model step
        return {"skipped": f"model step failed: {type(exc).__name__}: {exc}"}


def synthetic_batch(device, image_size: int, objects: int = 16, seed: int = 0):
    """Two images with `objects` elliptic instances each; half of them box-only (novel: has_mask False)."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.arange(image_size).view(-1, 1)
    xs = torch.arange(image_size).view(1, -1)
    images, targets = [], []
    for _ in range(2):
        images.append(torch.rand(3, image_size, image_size, generator=gen).to(device))
        centres = torch.randint(image_size // 8, image_size * 7 // 8, (objects, 2), generator=gen)
        half_sizes = torch.randint(max(2, image_size // 24), max(3, image_size // 5), (objects, 2), generator=gen)
        boxes = torch.cat([centres - half_sizes, centres + half_sizes], dim=1).clamp(0, image_size - 1).float()
        masks = torch.stack([(((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2 <= 1).to(torch.uint8)
                             for (cx, cy), (sx, sy) in zip(centres.tolist(), half_sizes.tolist())])
        has_mask = torch.arange(objects) % 2 == 0
        masks[~has_mask] = 0
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, NUM_CLASSES, (objects,),
                                                                           generator=gen).to(device),
                        "masks": masks.to(device), "has_mask": has_mask.to(device)})
    return images, targets


@contextmanager
def patched_loss(roi_heads, replacement):
    """Swap the loss function the model's RoI heads call (module attribute) for `replacement`."""
    original = roi_heads.query_sharing_contrastive_loss
    roi_heads.query_sharing_contrastive_loss = replacement(original)
    try:
        yield
    finally:
        roi_heads.query_sharing_contrastive_loss = original


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


def _train_step(model, images, targets):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def measure(device: torch.device, image_size: int = 800, warmup: int = 3, reps: int = 10):
    """Median step times (ms) with the loss, with the loss stubbed out, and without the CL head at all."""
    # imported here: model/ needs torchvision, which the operator benchmarks do not
    from model import contrastmask
    from model.config import load_config
    from model.contrastmask import roi_heads

    cfg = load_config(overrides=[{"model": {"min_size": [image_size], "max_size": image_size}}])
    torch.manual_seed(0)
    model = contrastmask.build_model(cfg["model"], cfg["contrast"], NUM_CLASSES).to(device).train()
    images, targets = synthetic_batch(device, image_size)
    rois = []

    def counting(loss):
        def wrapper(z, *args, **kwargs):
            rois.append(z.shape[0])
            return loss(z, *args, **kwargs)
        return wrapper

    def stub(_loss):
        return lambda z, *args, **kwargs: z.sum() * 0.0  # keeps the CL head in the graph, drops the loss

    step = _train_step(model, images, targets)
    with patched_loss(roi_heads, counting):
        with_loss = _time_steps(step, device, warmup, reps)
    with patched_loss(roi_heads, stub):
        stubbed = _time_steps(step, device, warmup, reps)
    del model, step
    cfg["model"]["use_cl"] = False
    torch.manual_seed(0)
    plain = contrastmask.build_model(cfg["model"], cfg["contrast"], NUM_CLASSES).to(device).train()
    without_head = _time_steps(_train_step(plain, images, targets), device, warmup, reps)

    step_s, stub_s = statistics.median(with_loss), statistics.median(stubbed)
    return {"step_ms": step_s * 1e3, "step_loss_stubbed_ms": stub_s * 1e3,
            "step_without_cl_head_ms": statistics.median(without_head) * 1e3,
            "loss_ms": (step_s - stub_s) * 1e3, "loss_share": max(step_s - stub_s, 0.0) / step_s,
            "rois_per_step": statistics.median(rois) if rois else 0, "images": 2, "image_size": image_size,
            "reps": reps, "device": str(device), "backbone": cfg["model"]["backbone"]}


def summary(result: dict) -> str:
    if "skipped" in result:
        return "skipped: " + result["skipped"]
    return (f"loss share {result['loss_share']:.1%} of a {result['step_ms']:.1f} ms training step "
            f"(loss {result['loss_ms']:.2f} ms at N={result['rois_per_step']:.0f} ROIs; step without the CL head "
            f"{result['step_without_cl_head_ms']:.1f} ms; {result['backbone']}-FPN, 2 images of "
            f"{result['image_size']} px)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    print(summary(measure(torch.device(args.device), image_size=args.image_size, warmup=args.warmup,
                          reps=args.reps)))
