"""Measured beside predicted, per kernel: run on a GPU by `make gpu-check` so that the memory-traffic model
(benchmarks/gpu_model.py) is calibrated the first time a GPU appears.

    python -m benchmarks.gpu_measure                  # the newest benchmarks/results/gpu-model-*.json
    python -m benchmarks.gpu_measure --model FILE

Times one plan + loss forward + backward at the model's table shape (float32) under torch.profiler, a few
iterations after a warm-up, and pairs each predicted launch with the measured launch of the same kernel in
the same order. Kernels that are not ours (torch's fills and copies around the ops) are summed apart.
Prints the table and writes benchmarks/results/cuda-<gpu>-<date>-kernels.json.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


def kernel_short_name(name: str) -> str:
    """`cosines_kernel<float, float>` from a demangled kernel name: our namespaces, the return type and the
    parameter list dropped (the profiler's names and the traced build's, tests/emulator/gpu_trace.py, both go
    through it)."""
    for prefix in ("contrastmask::(anonymous namespace)::", "contrastmask::cuda::", "(anonymous namespace)::"):
        name = name.replace(prefix, "")
    depth, out = 0, []
    for ch in name:  # drop the parameter list, keep template arguments
        if ch == "(" and depth == 0:
            break
        depth += ch == "<"
        depth -= ch == ">"
        out.append(ch)
    name = "".join(out)
    return name[len("void "):] if name.startswith("void ") else name  # template instances print their return type


def latest_model(results_dir: str = RESULTS_DIR) -> str:
    found = sorted(glob.glob(os.path.join(results_dir, "gpu-model-*.json")))
    if not found:
        raise FileNotFoundError("no benchmarks/results/gpu-model-*.json: run `make gpu-model` first")
    return found[-1]


def pair(predicted_rows, measured):
    """Each predicted launch (in order) with the next measured launch of the same kernel; measured launches
    of our kernels left over, and the rest (not ours), reported apart. `measured`: [(short name, us)]."""
    queues = collections.defaultdict(collections.deque)
    for name, us in measured:
        queues[name].append(us)
    ours = {r["kernel"] for r in predicted_rows}
    rows = []
    for r in predicted_rows:
        us = queues[r["kernel"]].popleft() if queues[r["kernel"]] else None
        rows.append({"phase": r["phase"], "kernel": r["kernel"], "predicted_us": r["predicted_us"], "measured_us": us})
    unmatched = {name: sum(q) for name, q in queues.items() if q and name in ours}
    others = {name: sum(q) for name, q in queues.items() if q and name not in ours}
    return rows, unmatched, others


def measure(n, c, h, w, iters=5, warmup=3):
    """[(short kernel name, mean us per iteration, in launch order)] of plan + loss forward + backward on cuda."""
    import contrastmask_ops as cm
    from torch.profiler import ProfilerActivity, profile

    from .inputs import KEY_SEED, make_batch

    batch = make_batch(n, c, h, w, device="cuda")

    def step():
        labels, keys, keep = torch.ops.contrastmask.roi_plan(batch.masks, batch.cams, batch.is_novel, None, 0.1, 0.3,
                                                             2, 5, KEY_SEED)
        batch.z.grad = None
        cm.contrastive_loss_from_keys(batch.z, labels, keys, keep).backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: e.time_range.start)
    names = [kernel_short_name(e.name) for e in events]
    per_iter = len(names) // iters
    if per_iter * iters != len(names):
        raise RuntimeError(f"{len(names)} kernel events over {iters} iterations: not the same launches each time")
    out = []
    for i in range(per_iter):
        durations = [events[k * per_iter + i].time_range.elapsed_us() for k in range(iters)]
        out.append((names[i], sum(durations) / iters))
    return out


def table(rows, gpu_key, unmatched, others) -> str:
    lines = [f"| phase | kernel | predicted {gpu_key} us | measured us | measured / predicted |", "|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted_us"][gpu_key]
        m = r["measured_us"]
        lines.append(f"| {r['phase']} | `{r['kernel']}` | {p:.1f} | {'-' if m is None else f'{m:.1f}'} | "
                     f"{'-' if m is None else f'{m / p:.2f}'} |")
    tp = sum(r["predicted_us"][gpu_key] for r in rows)
    tm = sum(r["measured_us"] or 0 for r in rows)
    lines.append(f"| all | (our kernels) | {tp:.1f} | {tm:.1f} | {tm / tp:.2f} |")
    if unmatched:
        lines.append(f"our launches not predicted: {unmatched}")
    if others:
        lines.append(f"other kernels (torch), us per iteration: {sum(others.values()):.1f} ({len(others)} kinds)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a gpu-model JSON (default: the newest in benchmarks/results/)")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: the measurement needs one (the prediction does not: make gpu-model)")
    path = args.model or latest_model()
    with open(path) as f:
        model = json.load(f)
    m = model["meta"]
    n = max(r["N"] for r in model["pipeline"] if r["N"] <= 512)
    predicted = model["kernels"]["float32"]
    device_name = torch.cuda.get_device_name(0)
    gpu_key = "H200" if "H200" in device_name else "H100"
    measured = measure(n, m["C"], m["H"], m["W"], iters=args.iters)
    rows, unmatched, others = pair(predicted, measured)
    print(f"{device_name}: N={n}, C={m['C']}, {m['H']}x{m['W']}, float32; predicted by {os.path.relpath(path, REPO_ROOT)} "
          f"(model of {gpu_key})\n")
    print(table(rows, gpu_key, unmatched, others))
    safe = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    out = os.path.join(RESULTS_DIR, f"cuda-{safe}-{datetime.date.today().isoformat()}-kernels.json")
    with open(out, "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "model": os.path.relpath(path, REPO_ROOT),
                   "model_gpu": gpu_key, "N": n, "rows": rows, "unmatched": unmatched, "others": others}, f, indent=1)
    print(f"\nwrote {os.path.relpath(out, REPO_ROOT)}")


if __name__ == "__main__":
    main()
