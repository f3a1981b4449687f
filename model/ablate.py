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
"""
import argparse
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass, field

from .config import load_config, load_or_exit

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# arm -> (config overrides, what it is). Table 2's rows, plus the arm that separates the CL head's
# architecture (its Y fused into the mask head) from the loss (lambda = 0), and both loss presets.
ARMS = {
    "baseline": (["model.use_cam=false", "model.use_cl=false"], "partially-supervised Mask R-CNN, class-agnostic"),
    "cam": (["model.use_cl=false"], "+ CAM added to the mask head's input"),
    "cam_clhead": (["contrast.lambda_start=0", "contrast.lambda_end=0"],
                   "+ CAM + CL head fused into the mask head, contrastive loss weight 0"),
    "cam_cl_paper": (["preset=paper"], "+ CAM + CL, the paper's loss (text: tau 0.7/0.3, lambda 0.25->1)"),
    "cam_cl_released": (["preset=released"], "+ CAM + CL, the authors' released code's loss and mask-loss ROIs"),
    "cam_cl_base": (["contrast.supervision=base"], "+ CAM + CL on base ROIs only (Table 6)"),
    "cam_gtrois": (["model.use_cl=false", "model.mask_loss_rois=gt"],
                   "+ CAM, mask loss on ground-truth-box ROIs only (the released arm's control)"),
}


@dataclass(frozen=True)
class Study:
    config: str
    arms: list
    results: str  # file stem under RESULTS_DIR
    arm_overrides: dict = field(default_factory=dict)  # arm -> overrides replacing ARMS[arm]'s in this study


STUDIES = {
    # From scratch (ResNet-18, GroupNorm, AdamW). Its released arm predates enhance_op and the projector's
    # BatchNorm in the `released` preset, so it turns both off: the study stays what was run.
    "v2": Study("ablation.json", ["baseline", "cam", "cam_clhead", "cam_cl_paper", "cam_cl_released"],
                "ablation-shapes-category-v2",
                {"cam_cl_released": ["preset=released", "model.cl_enhance=false", "model.cl_projector_norm=null"]}),
    # ImageNet-pretrained MobileNetV2 (frozen BN, first stages frozen), the authors' model in `released`
    "v3": Study("ablation_pretrained.json",
                ["baseline", "cam", "cam_clhead", "cam_cl_paper", "cam_cl_released", "cam_gtrois"],
                "ablation-shapes-category-v3"),
}
DEFAULT_STUDY = "v3"
DEFAULT_SEEDS = [0, 1, 2]
# (label, path into a run's metrics) of the numbers the table and plot show, in percent
METRICS = [
    ("novel mask AP", ("detected", "novel", "segm", "mAP")),
    ("base mask AP", ("detected", "base", "segm", "mAP")),
    ("novel box AP", ("detected", "novel", "bbox", "mAP")),
    ("base box AP", ("detected", "base", "bbox", "mAP")),
    ("novel mask AP, gt boxes", ("gt_boxes", "novel", "mask_ap")),
    ("base mask AP, gt boxes", ("gt_boxes", "base", "mask_ap")),
    ("novel mIoU, gt boxes", ("gt_boxes", "novel", "mean_iou")),
    ("novel CAM AUC", ("gt_boxes", "novel", "cam_auc")),
]
# the comparisons the decision rule is applied to: (better?, than)
# (a comparison whose arms a study lacks is left out of its report)
COMPARISONS = [("cam", "baseline"), ("cam_clhead", "cam"), ("cam_cl_paper", "cam_clhead"),
               ("cam_cl_released", "cam_clhead"), ("cam_cl_paper", "cam"), ("cam_cl_released", "cam"),
               ("cam_gtrois", "cam"), ("cam_cl_released", "cam_gtrois")]


def run_config(base_config, arm, seed, out_root, extra=(), study=None):
    overrides = (study.arm_overrides if study else {}).get(arm, ARMS[arm][0])
    cfg = load_config(base_config, [*overrides, f"seed={seed}", *extra])
    cfg["output_dir"] = os.path.join(out_root, arm, f"seed{seed}")
    return cfg


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(out):
    """Takes out/running.lock for this process; False when a live process holds it (stale locks of dead
    processes are taken over)."""
    os.makedirs(out, exist_ok=True)
    lock = os.path.join(out, "running.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            os.remove(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def folder_holds(out, cfg):
    """Whether the run folder out holds this run: its config.json (written when training starts) has the
    same seed and config digest. A folder without one has nothing to reuse."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return True
    with open(path) as f:
        saved = json.load(f)
    return saved.get("seed") == cfg["seed"] and config_digest(saved) == config_digest(cfg)


def run_one(cfg, device=None, progress=False):
    """Trains (or resumes) and evaluates one run; writes and returns its result.json record, or None
    when another process is running it. A folder left by another config is an error, never reused."""
    from .evaluate import evaluate
    from .train import train

    out = cfg["output_dir"]
    if not folder_holds(out, cfg):
        raise RuntimeError(f"{out} holds a run of another config or seed (its config.json differs from this "
                           f"run's, digest {config_digest(cfg)}): move it away, or pass --out-dir")
    result_path = os.path.join(out, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    if not claim(out):
        return None
    try:
        return _train_and_evaluate(cfg, device, progress, evaluate, train)
    finally:
        os.remove(os.path.join(out, "running.lock"))


def _train_and_evaluate(cfg, device, progress, evaluate, train):
    out = cfg["output_dir"]
    result_path = os.path.join(out, "result.json")
    resume = "auto" if os.path.exists(os.path.join(out, "checkpoint.pt")) else None
    start = time.time()
    final = train(cfg, resume=resume, device=device, progress=progress)
    train_seconds = time.time() - start
    start = time.time()
    record = evaluate(cfg, device=device, progress=progress, gt_boxes=True)
    result = {"iterations": final["iteration"], "contrast_backend": final["contrast_backend"],
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.time() - start, 1),
              "images": record["images"], "detected": record["metrics"], "gt_boxes": record["gt_boxes"]}
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(result_path + ".tmp", result_path)
    return result


def metric(run, path):
    value = run
    for key in path:
        if value is None:
            return None
        value = value.get(key)
    return None if value is None or value < 0 else 100 * value


def summarize(runs, arms):
    """{arm: {label: {"mean", "std", "values": {seed: v}}}} over the finished runs."""
    out = {}
    for arm in arms:
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if not mine:
            continue
        out[arm] = {}
        for label, path in METRICS:
            values = {r["seed"]: metric(r["metrics"], path) for r in mine}
            got = [v for v in values.values() if v is not None]
            out[arm][label] = {"mean": statistics.fmean(got) if got else None,
                               "std": statistics.stdev(got) if len(got) > 1 else None, "values": values}
    return out


def decide(summary, better, than, label):
    """The protocol's decision rule for "better > than" on one metric: holds / reversed / not shown."""
    a, b = summary.get(better, {}).get(label), summary.get(than, {}).get(label)
    if not a or not b:
        return None
    seeds = sorted(set(a["values"]) & set(b["values"]))
    pairs = [(a["values"][s], b["values"][s]) for s in seeds
             if a["values"][s] is not None and b["values"][s] is not None]
    if len(pairs) < 2:
        return {"seeds": len(pairs), "verdict": "too few seeds"}
    gaps = [x - y for x, y in pairs]
    gap = statistics.fmean(gaps)
    spread = max(statistics.stdev([x for x, _ in pairs]), statistics.stdev([y for _, y in pairs]))
    if all(g > 0 for g in gaps) or gap > 2 * spread:
        verdict = "holds"
    elif all(g < 0 for g in gaps) or -gap > 2 * spread:
        verdict = "reversed"
    else:
        verdict = "not shown"
    return {"seeds": len(pairs), "mean_gap": round(gap, 2), "spread": round(spread, 2), "verdict": verdict}


def format_report(summary, decisions, arms, protocol):
    fmt = lambda s: "-" if s is None or s["mean"] is None else (  # noqa: E731
        f"{s['mean']:.1f} ± {s['std']:.1f}" if s["std"] is not None else f"{s['mean']:.1f}")
    labels = [label for label, _ in METRICS]
    lines = [f"Protocol: {protocol}", "",
             "| arm | seeds | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for arm in arms:
        if arm not in summary:
            continue
        n = len(next(iter(summary[arm].values()))["values"])
        lines.append(f"| {arm} | {n} | " + " | ".join(fmt(summary[arm][label]) for label in labels) + " |")
    lines += ["", "Per seed (seed: value):", ""]
    for arm in arms:
        if arm not in summary:
            continue
        cells = []
        for label in labels:
            values = summary[arm][label]["values"]
            cells.append(f"{label} " + ", ".join(f"{s}: {v:.1f}" if v is not None else f"{s}: -"
                                                 for s, v in sorted(values.items())))
        lines.append(f"- {arm}: " + "; ".join(cells))
    lines += ["", "Decision rule (holds: better in every seed pair, or mean gap > 2 x the larger std):", "",
              "| comparison | metric | seeds | mean gap | spread | verdict |", "|---|---|---|---|---|---|"]
    for d in decisions:
        lines.append(f"| {d['better']} > {d['than']} | {d['metric']} | {d['seeds']} | {d.get('mean_gap', '-')} | "
                     f"{d.get('spread', '-')} | {d['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(summary, arms, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in METRICS]
    arms = [a for a in arms if a in summary]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for ax, label in zip(axes.flat, labels):
        for i, arm in enumerate(arms):
            s = summary[arm][label]
            if s["mean"] is None:
                continue
            ax.bar(i, s["mean"], yerr=s["std"] or 0, capsize=4, color=f"C{i}", alpha=0.7)
            vals = [v for v in s["values"].values() if v is not None]
            ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=35, ha="right", fontsize=8)
    fig.suptitle("Ablation on the built-in shapes data: mean ± std over seeds (dots: single seeds)")
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def decide_all(summary):
    """The decision rule's verdict for every comparison and metric the summary covers."""
    decisions = []
    for better, than in COMPARISONS:
        for label, _ in METRICS:
            d = decide(summary, better, than, label)
            if d:
                decisions.append({"better": better, "than": than, "metric": label, **d})
    return decisions


def write_report(runs, arms, results_path, protocol):
    summary = summarize(runs, arms)
    decisions = decide_all(summary)
    os.makedirs(os.path.dirname(os.path.abspath(results_path)), exist_ok=True)
    record = {"protocol": protocol, "arms": {a: ARMS[a][1] for a in arms}, "runs": runs,
              "summary": summary, "decisions": decisions}
    _write_atomic(results_path, json.dumps(record, indent=2))
    stem = os.path.splitext(results_path)[0]
    _write_atomic(stem + ".md", format_report(summary, decisions, arms, protocol))
    if summary:
        plot(summary, arms, stem + ".png")
    return record


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def config_digest(cfg):
    """Short hash of a resolved config less what differs between runs (seed, output folder): a results
    file recorded under another model, data or schedule is not carried over, even from the same file.
    Keys set to null are left out: a new config key's null default means "as before it existed" (the
    rule of model/config.py), so adding one does not orphan results recorded before it."""
    shared = {k: v for k, v in cfg.items() if k not in ("seed", "output_dir")}
    return hashlib.sha256(json.dumps(_without_nulls(shared), sort_keys=True).encode()).hexdigest()[:12]


def describe_protocol(config_path, sets, probe, arms, seeds):
    m, t = probe["model"], probe["train"]
    lr = t["base_lr"] * t["images_per_batch"] / t["base_batch"]
    return (f"config {os.path.relpath(config_path)} {' '.join(sets)}; arms {arms}; seeds {seeds}; "
            f"backbone {m['backbone']} ({m['backbone_weights'] or 'from scratch'}, {m['backbone_norm']}, "
            f"{m['trainable_layers']} stages train); optimizer {t['optimizer']} lr {lr:g}; "
            f"{probe['train']['length']} {probe['train']['unit']}s of batch {probe['train']['images_per_batch']}; "
            f"data {probe['data']['kind']} {json.dumps(probe['data']['shapes'], sort_keys=True)}; "
            f"validation images: {probe['eval']['max_images'] or 'all'}; config digest {config_digest(probe)}")


def recorded_runs(results_path, protocol):
    """{(arm, seed): metrics} of the runs already in the results file, when it holds the same protocol:
    a committed results file carries finished runs over to a fresh checkout (runs/ is not kept)."""
    try:
        with open(results_path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    if record.get("protocol") != protocol:
        return {}
    return {(r["arm"], r["seed"]): r["metrics"] for r in record.get("runs", [])}


def collect(base_config, arms, seeds, out_root, extra=(), recorded=None, study=None):
    """The finished runs: each run folder's result.json (when the folder holds this run), else the results
    file's record of that run."""
    runs = []
    for seed in seeds:
        for arm in arms:
            cfg = run_config(base_config, arm, seed, out_root, extra, study)
            path = os.path.join(cfg["output_dir"], "result.json")
            if os.path.exists(path) and folder_holds(cfg["output_dir"], cfg):
                with open(path) as f:
                    runs.append({"arm": arm, "seed": seed, "metrics": json.load(f)})
            elif recorded and (arm, seed) in recorded:
                runs.append({"arm": arm, "seed": seed, "metrics": recorded[(arm, seed)]})
    return runs


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
