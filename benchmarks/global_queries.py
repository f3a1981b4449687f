"""The time global query sharing adds to a training step: 2 processes on the CPU (gloo), each with its own
batch of N ROIs, loss forward + backward with per-process queries (today's default, the fused kernels)
against global queries (process_group=...).

    python -m benchmarks.global_queries                   # N = 128, C = 256 per process, 28x28, float32
    python -m benchmarks.global_queries --n 32 --steps 5  # a quick look (not committed)

Three columns, timed in turns so that load from other processes falls on all of them alike:
- per_process: query_sharing_contrastive_loss without a process group (fused plan and loss kernels);
- global_1rank: the global path with a group of one rank (the same kernels, run as the loss's stage ops, with
  its collectives, which then have nobody to wait for): the cost of the global path's own work;
- global: the global path over both processes: the above plus the collectives with the other process.
A step's time is the slower rank's (the step ends when both have their gradient); each step starts after
a barrier. Prints the medians and writes benchmarks/results/cpu-<date>-global-queries.json (device,
versions, commit, load average, every step's time).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .inputs import KEY_SEED, make_batch
from .run import RESULTS_DIR, build_info, describe_device, metadata_git

WORLD = 2
MODES = ("per_process", "global_1rank", "global")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="ROIs per process")
    p.add_argument("--c", type=int, default=256, help="channels")
    p.add_argument("--steps", type=int, default=15, help="timed steps per column")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per column first")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def _step(batch, group):
    import contrastmask_ops as cm

    batch.z.grad = None
    loss = cm.query_sharing_contrastive_loss(batch.z, batch.masks, batch.cams, batch.is_novel, seed=KEY_SEED,
                                             process_group=group)
    loss.backward()


def _worker(rank, init_file, args, out_file):
    torch.set_num_threads(1)  # two processes on the 2-core machine: one core each
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD)
    own_groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
    groups = {"per_process": None, "global_1rank": own_groups[rank], "global": dist.group.WORLD}
    batch = make_batch(args.n, args.c, seed=1000 + rank)  # each process its own ROIs
    times = {mode: [] for mode in MODES}
    for step in range(args.warmup + args.steps):
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            _step(batch, groups[mode])
            if step >= args.warmup:
                times[mode].append(time.perf_counter() - start)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, times)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_before": os.getloadavg(),
        "device": describe_device(torch.device("cpu")) | {"threads": 1, "processes": WORLD},
        "torch": torch.__version__,
        "python": platform.python_version(),
        **metadata_git(),
        "build_info": build_info(),
        "settings": {"N_per_process": args.n, "C": args.c, "H": 28, "W": 28, "dtype": "float32",
                     "steps": args.steps, "warmup": args.warmup, "backend": "gloo",
                     "params": "SPEC defaults: delta 0.1, sigma 0.3, tau 0.7/0.3, hard_sqdist 2, min_keys 5"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), args, out_file), nprocs=WORLD)
        with open(out_file) as f:
            per_rank = json.load(f)
    meta["load_average_after"] = os.getloadavg()
    # a step ends when the slower rank is done
    steps = {mode: [max(ts) for ts in zip(*(r[mode] for r in per_rank))] for mode in MODES}
    medians = {mode: statistics.median(ts) * 1e3 for mode, ts in steps.items()}
    added = {"global - per_process": medians["global"] - medians["per_process"],
             "of which the global path's own work (global_1rank - per_process)":
                 medians["global_1rank"] - medians["per_process"],
             "of which communication (global - global_1rank)": medians["global"] - medians["global_1rank"]}

    print(f"{WORLD} processes x N = {args.n} ROIs, C = {args.c}, 28x28, float32, gloo, 1 thread each; "
          f"loss forward + backward, median of {args.steps} steps (the slower rank's time)")
    for mode in MODES:
        print(f"  {mode:14s} {medians[mode]:9.1f} ms")
    for name, ms in added.items():
        print(f"  added: {name:60s} {ms:+9.1f} ms")
    print(f"  ratio global / per_process: {medians['global'] / medians['per_process']:.2f}")
    print(f"load average before {meta['load_average_before'][0]:.1f}, after {meta['load_average_after'][0]:.1f} "
          f"({os.cpu_count()} CPUs)")
    if not args.no_save:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"cpu-{meta['date'][:10]}-global-queries.json"
        path.write_text(json.dumps({"meta": meta, "median_ms": medians, "added_ms": added,
                                    "ratio_global_per_process": medians["global"] / medians["per_process"],
                                    "step_ms": {m: [t * 1e3 for t in ts] for m, ts in steps.items()},
                                    "rank_step_ms": [{m: [t * 1e3 for t in r[m]] for m in MODES} for r in per_rank]},
                                   indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
