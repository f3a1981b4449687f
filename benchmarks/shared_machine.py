"""Training speed on a shared machine: seconds per iteration of the demo config, alone and beside a process that
keeps one core busy, for each way of running the CPU threads.

    python -m benchmarks.shared_machine                 # 30 iterations per run, 2 repeats: a few minutes
    python -m benchmarks.shared_machine --iters 20 --repeats 1

Threads that wait at the end of a parallel region spin (libgomp's default) until the slowest one arrives; with
another process on a core, the one that was descheduled keeps every other waiting. OMP_WAIT_POLICY=PASSIVE
makes waiting threads sleep instead. Each run is a fresh `python -m model.train` (the policy is read when the
OpenMP runtime starts), timed from its metrics.jsonl after a warm-up. Results: results/cpu-<date>-shared-machine.json.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from .results import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "model", "configs", "demo.json")
WARMUP = 10
# (label, threads, environment: OMP_WAIT_POLICY / GOMP_SPINCOUNT; nothing for the runtime's default)
SETTINGS = [("2 threads, default wait", 2, {}), ("2 threads, passive wait", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
            ("2 threads, short spin", 2, {"GOMP_SPINCOUNT": "10000"}), ("1 thread", 1, {})]


def train_seconds_per_iter(threads, wait_env, iters, out_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(wait_env)
    env["CONTRASTMASK_KEEP_WAIT_POLICY"] = "1"  # model/__init__.py leaves the environment as given
    cmd = [sys.executable, "-m", "model.train", "--config", CONFIG, "--threads", str(threads), "--no-progress",
           "--output-dir", out_dir, "--set", f"train.length={iters}", "train.log_every=1",
           f"train.checkpoint_every={iters * 10}"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return statistics.median(r["sec_per_iter"] for r in rows if r["iter"] > WARMUP)


def busy_core():
    """A process that keeps one core busy (what a compiler or another training run does to ours)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="default: benchmarks/results/cpu-<date>-shared-machine.json")
    p.add_argument("--settings", nargs="*", type=int, help="indices into SETTINGS (default: all)")
    args = p.parse_args(argv)
    if args.iters <= WARMUP:
        p.error(f"--iters must exceed the {WARMUP} warm-up iterations")
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-c", "from model.config import load_config; from model.data.build import "
                        f"prepare_data; prepare_data(load_config({CONFIG!r})['data'])"], cwd=ROOT, check=True)
        for index, (label, threads, wait_env) in enumerate(SETTINGS):
            if args.settings is not None and index not in args.settings:
                continue
            for beside in (0, 1):
                times = []
                for repeat in range(args.repeats):
                    other = busy_core() if beside else None
                    try:
                        times.append(train_seconds_per_iter(threads, wait_env, args.iters,
                                                            os.path.join(tmp, f"{index}-{beside}-{repeat}")))
                    finally:
                        if other:
                            other.kill()
                            other.wait()
                rows.append({"setting": label, "threads": threads, "environment": wait_env,
                             "busy_processes_beside": beside, "sec_per_iter": times})
                print(f"{label:26s} beside {beside} busy: {min(times):.2f}-{max(times):.2f} s/iter", flush=True)
    record = {"date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "config": os.path.relpath(CONFIG, ROOT), "iters": args.iters, "warmup": WARMUP,
              "load_before": load_before, "load_after": os.getloadavg(), "runs": rows}
    write_json(record, args.out or os.path.join(ROOT, "benchmarks", "results",
                                                f"cpu-{record['date']}-shared-machine.json"), indent=2)
    return record


if __name__ == "__main__":
    main()
