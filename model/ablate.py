"""Ablation runner (paper Table 2 on the built-in data): named arms x seeds, each trained, evaluated on
detected boxes and on ground-truth boxes, then one JSON, a table and a bar plot.

    python -m model.ablate                                   # study v3: the pretrained backbone (6 arms)
    python -m model.ablate --study v2                        # the from-scratch study (5 arms)
    python -m model.ablate --arms baseline cam --seeds 0     # a subset
    python -m model.ablate --report-only                     # rebuild JSON/table/plot from finished runs
    python -m model.ablate --threads 1 --seeds 0 1 2 &  python -m model.ablate --threads 1 --seeds 1 2 0
                                                             # two processes share the work (run locks)

Each study fixes its config, arms and results file (STUDIES); --config runs the study's arms on another
config, with results in its runs folder unless --results says where.

Resumable: a run recorded in the results file (same protocol) or whose result.json exists is not
rerun, so a committed results file carries finished runs over to a fresh checkout; a run with a
checkpoint continues from it (training resume is exact). Results go to --results (default model/results/ablation-<data>.json) with
the table (.md) and plot (.png) beside it, rewritten after every finished run. The report always
covers the protocol's arms and seeds (plus any asked for), whichever process finished them, so several
processes may run disjoint seeds side by side (e.g. one per core with --threads 1).

The protocol, fixed before any number was seen: every arm trains the same iterations on the same data
with seeds 0, 1, 2; validation on 500 images; the protocol line names the backbone and optimizer. An ordering between two arms "holds" if it holds in every
seed-paired comparison, or if the mean gap exceeds twice the larger of the two arms' standard
deviations across seeds; otherwise it is "not shown".

This file is the entry point; the parts are in model/ablation/ (protocol.py: arms, studies, metrics,
comparisons; digest.py: the config digest; runner.py: runs and run locks; decide.py: statistics and the
decision rule; report.py: results file, table and plot), and every name of theirs is importable from here.
"""
import argparse
import os

from .ablation.decide import decide, decide_all, metric, summarize
from .ablation.digest import config_digest
from .ablation.protocol import (ARMS, COMPARISONS, CONFIG_DIR, DEFAULT_SEEDS, DEFAULT_STUDY, METRICS, RESULTS_DIR,
                                STUDIES, Study, describe_protocol)
from .ablation.report import format_report, plot, recorded_runs, write_report
from .ablation.runner import collect, folder_holds, run_config, run_one
from .config import load_or_exit

__all__ = ["ARMS", "COMPARISONS", "CONFIG_DIR", "DEFAULT_SEEDS", "DEFAULT_STUDY", "METRICS", "RESULTS_DIR", "STUDIES",
           "Study", "collect", "config_digest", "decide", "decide_all", "describe_protocol", "folder_holds",
           "format_report", "main", "metric", "plot", "recorded_runs", "run_config", "run_one", "summarize",
           "write_report"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=DEFAULT_STUDY, choices=sorted(STUDIES))
    p.add_argument("--config", help="default: the study's")
    p.add_argument("--arms", nargs="*", choices=sorted(ARMS), help="default: the study's")
    p.add_argument("--seeds", nargs="*", type=int, default=DEFAULT_SEEDS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--out-dir", help="one folder per arm and seed under this (default: runs/ablation-<data>)")
    p.add_argument("--results", help="default: model/results/ablation-<data>.json")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    study = STUDIES[args.study]
    study_config = os.path.join(CONFIG_DIR, study.config)
    own_config = args.config is None or os.path.abspath(args.config) == os.path.abspath(study_config)
    args.config = args.config or study_config
    args.arms = study.arms if args.arms is None else args.arms
    probe = load_or_exit(args.config, args.set)
    name = study.results if own_config else f"ablation-{os.path.splitext(os.path.basename(args.config))[0]}"
    args.out_dir = args.out_dir or os.path.join("runs", name)
    results = args.results or (os.path.join(RESULTS_DIR, name + ".json") if own_config
                               else os.path.join(args.out_dir, name + ".json"))
    report_arms = [a for a in ARMS if a in set(study.arms) | set(args.arms)]
    report_seeds = sorted(set(DEFAULT_SEEDS) | set(args.seeds))
    protocol = describe_protocol(args.config, args.set, probe, report_arms, report_seeds)
    recorded = recorded_runs(results, protocol)
    if not args.report_only:
        for seed in args.seeds:  # seed-major, in the order given: each arm's first seed before any second
            for arm in args.arms:
                if (arm, seed) in recorded:
                    print(f"[ablate] {arm} seed {seed}: finished (in {os.path.relpath(results)})", flush=True)
                    continue
                cfg = run_config(args.config, arm, seed, args.out_dir, args.set, study)
                print(f"[ablate] {arm} seed {seed} -> {cfg['output_dir']}", flush=True)
                result = run_one(cfg, args.device)
                if result is None:
                    print(f"[ablate] {arm} seed {seed}: another process is running it", flush=True)
                    continue
                print(f"[ablate] {arm} seed {seed}: " + ", ".join(
                    f"{label} {metric(result, path):.1f}" for label, path in METRICS
                    if metric(result, path) is not None), flush=True)
                write_report(collect(args.config, report_arms, report_seeds, args.out_dir, args.set, recorded, study),
                             report_arms, results, protocol)
    record = write_report(collect(args.config, report_arms, report_seeds, args.out_dir, args.set, recorded, study),
                          report_arms, results, protocol)
    print(open(os.path.splitext(results)[0] + ".md").read())
    return record


if __name__ == "__main__":
    main()
