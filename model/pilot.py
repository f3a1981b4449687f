"""The optimizer pilot for the pretrained backbone: which optimizer and learning rate the demo (and ablation
v3) train with. Trains each variant of a config for its full length and compares training losses only.

    python -m model.pilot                                     # the committed pilot, 3 variants, seed 0
    python -m model.pilot --variants adamw sgd --threads 1    # a subset (two processes can share the work)

The rule, fixed before any run: the variant with the lowest total training loss, averaged over the last 100
iterations, wins; one within 2% of the lowest loses to the authors' optimizer (SGD) when that is among them.
No validation image is looked at, so the pilot cannot tune on the ablation's validation numbers.
Results: model/results/pilot-optimizer-<backbone>.{json,md}.
"""
import argparse
import json
import os
import statistics

from .config import load_config, load_or_exit

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.json")
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")
# name -> overrides. sgd: the authors' regime (lr 0.02 for 16 images, scaled linearly to the batch);
# sgd_x4: four times that lr; adamw: the from-scratch demo's optimizer.
VARIANTS = {
    "adamw": ["train.optimizer=adamw", "train.base_lr=0.001", "train.base_batch=4"],
    "sgd": ["train.optimizer=sgd", "train.base_lr=0.02", "train.base_batch=16"],
    "sgd_x4": ["train.optimizer=sgd", "train.base_lr=0.02", "train.base_batch=4"],
}
TAIL = 100  # iterations averaged at the end
TIE = 0.02


def tail_means(metrics_path, length):
    """Mean of every loss over the log windows that end in the last TAIL iterations."""
    from .engine.metrics import read_metrics

    rows = [r for r in read_metrics(metrics_path) if r["iter"] > length - TAIL]
    names = sorted(k for k in rows[0] if k.startswith("loss"))
    out = {k: statistics.fmean(r[k] for r in rows) for k in names}
    out["sec_per_iter"] = statistics.fmean(r["sec_per_iter"] for r in rows)
    return out


def decide(results):
    """The pilot's rule (module doc) over {variant: {"loss": ...}}: the winner's name."""
    best = min(results, key=lambda v: results[v]["loss"])
    lowest = results[best]["loss"]
    close = [v for v in results if results[v]["loss"] <= lowest * (1 + TIE)]
    authors = [v for v in close if v.startswith("sgd")]
    return min(authors, key=lambda v: results[v]["loss"]) if authors else best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join("runs", "pilot"))
    p.add_argument("--threads", type=int)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .train import train

    probe = load_or_exit(args.config)
    stem = os.path.join(RESULTS_DIR, f"pilot-optimizer-{probe['model']['backbone']}")
    results = {}
    for name in VARIANTS:
        cfg = load_config(args.config, [*VARIANTS[name], f"seed={args.seed}"])
        cfg["output_dir"] = os.path.join(args.out_dir, name)
        final_path = os.path.join(cfg["output_dir"], "final.json")
        if name in args.variants and not args.report_only and not os.path.exists(final_path):
            print(f"[pilot] {name}: {' '.join(VARIANTS[name])}", flush=True)
            train(cfg, progress=False)
        if os.path.exists(final_path):
            results[name] = {"overrides": VARIANTS[name],
                             **tail_means(os.path.join(cfg["output_dir"], "metrics.jsonl"), cfg["train"]["length"])}
    if not results:
        return None
    winner = decide(results)
    record = {"config": os.path.relpath(args.config), "seed": args.seed, "length": probe["train"]["length"],
              "rule": f"lowest total training loss over the last {TAIL} iterations; within {TIE:.0%} of it the "
                      "authors' optimizer (SGD) is preferred", "variants": results, "winner": winner}
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=2)
    names = sorted({k for r in results.values() for k in r if k.startswith("loss")})
    lines = [f"Pilot: {record['config']}, seed {args.seed}, {record['length']} iterations; rule: {record['rule']}.",
             "", "| variant | overrides | " + " | ".join(names) + " | s/iter |", "|---" * (len(names) + 3) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {' '.join(r['overrides'])} | " + " | ".join(f"{r[k]:.4f}" for k in names)
                     + f" | {r['sec_per_iter']:.2f} |")
    lines += ["", f"Winner: **{winner}**" + ("" if len(results) == len(VARIANTS) else " (not every variant ran)")]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
