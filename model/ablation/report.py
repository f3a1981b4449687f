"""The results file (JSON: protocol, arms, runs, summary, decisions), its table (.md) and its bar plot
(.png), rewritten atomically; and the runs a results file already records for the same protocol."""
import json
import os

from .decide import decide_all, summarize
from .protocol import ARMS, METRICS


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
