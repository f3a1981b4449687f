"""Benchmark sweep: fused operators vs pure-PyTorch reference vs per-ROI pipeline.

    python -m benchmarks.run            # full sweep on the default device (CUDA if present, else CPU)
    python -m benchmarks.run --quick    # N in {32, 128}, C=256, float32, short budgets (about a minute)

Prints a table of times and ratios and the speed targets (targets.py), and writes
benchmarks/results/<device>-<date>.json plus two PNG plots next to it (see benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import model_step
from .implementations import IMPLEMENTATIONS, make
from .inputs import make_batch
from .measure import Policy, Timer, copy_bandwidth, measure_interleaved
from .report import times_table, targets_table
from .results import DTYPES, STAGES, Results
from .targets import evaluate

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
H = W = 28
# From this N on, the slow columns (reference, per-ROI) time only the plan and the whole pipeline, unless
# --all-stages: their loss stages cost tens of seconds a call on a 2-core CPU and add nothing to the targets.
LARGE_N = 2048
SLOW_IMPLS = ("reference", "per_roi")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep with short budgets (smoke run)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sizes", type=int, nargs="+", help="N values (default 32 128 512 2048)")
    p.add_argument("--channels", type=int, nargs="+", help="C values (default 128 256)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default float32 bfloat16")
    p.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    p.add_argument("--budget", type=float, help="seconds of timed calls per measurement (default 0.5, quick 0.3)")
    p.add_argument("--all-stages", action="store_true",
                   help=f"also time the loss stages of the reference and per-ROI columns at N >= {LARGE_N} "
                        "(left out by default: each call takes tens of seconds on a 2-core CPU)")
    p.add_argument("--model-step", choices=["auto", "on", "off"], default="auto",
                   help="measure the loss's share of a training step (auto: on CUDA only, when model/ exists)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true", help="print only; write no JSON or plots")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([32, 128] if args.quick else [32, 128, 512, 2048])
    args.channels = args.channels or ([256] if args.quick else [128, 256])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    args.budget = args.budget if args.budget is not None else (0.3 if args.quick else 0.5)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _git(*cmd):
    try:
        done = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_GiB": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}", "threads": torch.get_num_threads()}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def build_info() -> dict:
    try:
        import contrastmask_ops
    except ImportError as exc:  # the comparison columns that need it will fail; the per-ROI baseline still runs
        return {"error": f"contrastmask_ops not importable: {exc}"}
    return contrastmask_ops.build_info()


def metadata_git() -> dict:
    """The commit benchmarked and whether tracked files differed from it."""
    return {"git_commit": _git("rev-parse", "HEAD") or None,
            "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def metadata(args, device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        # Other processes on the machine distort CPU timings; a load above the thread count means contention.
        "load_average_before": os.getloadavg(),
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        **metadata_git(),
        "build_info": build_info(),
        "settings": {"quick": args.quick, "sizes": args.sizes, "channels": args.channels, "dtypes": args.dtypes,
                     "impls": args.impls, "budget_s": args.budget, "H": H, "W": W,
                     "loss_stages_of_slow_impls_up_to_N": None if args.all_stages else LARGE_N - 1,
                     "params": "SPEC defaults: delta 0.1, sigma 0.3, tau 0.7/0.3, hard_sqdist 2, min_keys 5"},
        "memory_method": ("torch.cuda.max_memory_allocated minus allocated before the call" if device.type == "cuda"
                          else "PyTorch profiler allocation events (CPU tensor allocator running total); "
                               "per_roi also adds tracemalloc's peak of its numpy/Python work"),
    }


def stage_calls(impl, batch, plan) -> dict:
    """{stage: (fn, setup)}; setup clears z.grad so that every backward allocates dz as in training."""
    z = batch.z

    def clear_grad():
        z.grad = None

    return {
        "plan": (lambda: impl.plan(batch), None),
        "loss_fwd": (lambda: impl.loss(z, plan), None),
        "loss_fwd_bwd": (lambda: impl.loss(z, plan).backward(), clear_grad),
        "pipeline_fwd_bwd": (lambda: impl.pipeline(z, batch).backward(), clear_grad),
    }


def run_sweep(args, device: torch.device, results: Results, impls) -> None:
    """Every shape; per shape and stage, the implementations are timed in turns (see measure_interleaved)."""
    policy = Policy(budget_s=args.budget, max_reps=10 if args.quick else 30)
    for dtype in args.dtypes:
        for c in args.channels:
            for n in args.sizes:
                batch = make_batch(n, c, H, W, dtype=DTYPES[dtype], device=device)
                calls = {impl.name: stage_calls(impl, batch, impl.plan(batch)) for impl in impls}
                for stage in STAGES:
                    started = time.perf_counter()
                    timers = {}
                    for name, stages in calls.items():
                        if (n >= LARGE_N and name in SLOW_IMPLS and not args.all_stages
                                and stage not in ("plan", "pipeline_fwd_bwd")):
                            continue
                        fn, setup = stages[stage]
                        # The per-ROI plan works in numpy, which only tracemalloc sees; the fused op's memory
                        # is a target, so it is measured even where a call takes seconds.
                        timers[name] = Timer(fn, device, policy, setup=setup, python_heap=name == "per_roi",
                                             memory_when_slow=name == "fused")
                    measured = measure_interleaved(timers)
                    for name, m in measured.items():
                        results.add(name, stage, n, c, H, W, dtype, m.to_json())
                    print(f"  N={n:<5} C={c:<4} {dtype:<9} {stage:<17}"
                          + "".join(f" {name} {m.median_s * 1e3:.3f} ms x{m.reps}" for name, m in measured.items())
                          + f"  ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
                batch.z.grad = None
                del batch, calls
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def output_stem(args, meta) -> Path:
    # cpu-<date> or cuda-<gpu name>-<date>, e.g. cuda-nvidia-h100-80gb-hbm3-2026-11-25
    name = "cuda " + meta["device"]["name"] if meta["device"]["type"] == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return args.out_dir / f"{slug}-{meta['date'][:10]}{'-quick' if args.quick else ''}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    meta = metadata(args, device)
    info = meta["build_info"]
    compiled = info.get("cuda" if device.type == "cuda" else "cpu")
    print(f"device: {meta['device']}\ntorch {meta['torch']} (CUDA {meta['cuda']}), commit {meta['git_commit']}"
          f"{' (dirty)' if meta['git_dirty'] else ''}\nfused kernels compiled for {device.type}: {compiled}")
    names = list(args.impls)
    if not compiled and "fused" in names:
        if info.get("extension"):  # built, but not for this device: the public API would refuse these tensors
            print(f"WARNING: the extension has no {device.type} kernels; the 'fused' column is left out.")
            names.remove("fused")
        else:
            print("WARNING: the extension is not built; the 'fused' column runs the pure-PyTorch fallback.")
    impls = [make(name) for name in names]

    started = time.perf_counter()
    results = Results(meta=meta, copy_bandwidth=copy_bandwidth(device))
    print(f"copy bandwidth (read + write): {results.copy_bandwidth / 1e9:.1f} GB/s", flush=True)
    run_sweep(args, device, results, impls)
    results.model_step = model_step.maybe_measure(args.model_step, device)
    meta["sweep_seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_after"] = os.getloadavg()

    print(times_table(results))
    print(targets_table(results))
    if results.model_step:
        print(f"\nmodel step: {model_step.summary(results.model_step)}")
    print(f"\nsweep took {meta['sweep_seconds']:.0f} s; load average before {meta['load_average_before'][0]:.1f}, "
          f"after {meta['load_average_after'][0]:.1f} ({os.cpu_count()} CPUs)")
    meta["targets"] = evaluate(results)

    if not args.no_save:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(args, meta)
        json_path = stem.with_suffix(".json")
        json_path.write_text(json.dumps(results.to_json(), indent=1) + "\n")
        try:
            from .plots import write_plots
        except ImportError as exc:  # matplotlib missing: the numbers are saved, the plots are not
            print(f"plots not drawn ({exc}); redraw later with python -m benchmarks.plots {json_path}")
            written = [json_path]
        else:
            written = [json_path, *write_plots(results, stem)]
        print("wrote " + ", ".join(str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(p)
                                   for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
