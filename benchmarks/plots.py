"""Plots of a run: time against N for each implementation, and time split by stage.

`python -m benchmarks.plots results/<file>.json` redraws them from a saved run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .results import Results  # noqa: E402

COLORS = {"fused": "tab:blue", "reference": "tab:orange", "per_roi": "tab:red"}
LABELS = {"fused": "fused ops", "reference": "pure-PyTorch reference", "per_roi": "per-ROI pipeline"}
LINES = {"pipeline_fwd_bwd": "-", "loss_fwd_bwd": "--", "plan": ":"}
DPI = 72  # keeps each PNG well under 200 KB


def _title(results: Results) -> str:
    device = results.meta["device"]
    return f"{device['name']} ({device['type']}, {device.get('threads', '?')} threads), {results.meta['date']}"


def plot_time_vs_n(results: Results, path: Path) -> None:
    """Log-log time against N: one panel per (C, dtype), one colour per implementation, one style per stage."""
    panels = sorted({(c, dtype) for _, c, dtype in results.shapes()}, key=lambda p: (p[1] != "float32", p[0]))
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols + 1.5, 3.8 * rows + 0.8), squeeze=False)
    for ax, (c, dtype) in zip(axes.flat, panels):
        ns = sorted({n for n, cc, dt in results.shapes() if (cc, dt) == (c, dtype)})
        for impl, color in COLORS.items():
            for stage, style in LINES.items():
                points = [(n, results.time(impl, stage, n, c, dtype)) for n in ns]
                points = [(n, t * 1e3) for n, t in points if t is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o", markersize=3)
        ax.set(xscale="log", yscale="log", xlabel="N (ROIs)", ylabel="median time (ms)", title=f"C={c}, {dtype}")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [Line2D([], [], color=color, label=LABELS[impl]) for impl, color in COLORS.items()]
    handles += [Line2D([], [], color="black", linestyle=style, label=stage) for stage, style in LINES.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Time against N, 28x28 ROIs — " + _title(results), fontsize=9)
    fig.tight_layout(rect=(0, 0.12 / rows, 1, 0.97))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_stages(results: Results, path: Path) -> None:
    """Stacked bars per implementation: plan, loss forward, loss backward (fwd+bwd minus fwd), at the
    largest C in float32 (else the first dtype measured)."""
    shapes = results.shapes()
    if not shapes:
        return
    dtype = "float32" if any(dt == "float32" for _, _, dt in shapes) else shapes[0][2]
    c = max(cc for _, cc, dt in shapes if dt == dtype)
    ns = sorted({n for n, cc, dt in shapes if (cc, dt) == (c, dtype)})
    fig, axes = plt.subplots(1, len(ns), figsize=(3.2 * len(ns), 3.8), squeeze=False)
    parts = (("plan", "tab:green"), ("loss forward", "tab:purple"), ("loss backward", "tab:gray"))
    for ax, n in zip(axes.flat, ns):
        # Only implementations with every stage measured (the slow ones skip the loss stages at large N).
        impls = [i for i in COLORS if all(results.time(i, stage, n, c, dtype) is not None
                                          for stage in ("plan", "loss_fwd", "loss_fwd_bwd"))]
        bottoms = [0.0] * len(impls)
        for part, color in parts:
            heights = []
            for impl in impls:
                plan = results.time(impl, "plan", n, c, dtype) or 0.0
                fwd = results.time(impl, "loss_fwd", n, c, dtype) or 0.0
                fwd_bwd = results.time(impl, "loss_fwd_bwd", n, c, dtype) or 0.0
                value = {"plan": plan, "loss forward": fwd, "loss backward": max(fwd_bwd - fwd, 0.0)}[part]
                heights.append(value * 1e3)
            ax.bar(range(len(impls)), heights, bottom=bottoms, color=color, label=part)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(impls)), [LABELS[i].replace(" ", "\n", 1) for i in impls], fontsize=7)
        ax.set(title=f"N={n}", ylabel="ms" if n == ns[0] else None)
        ax.grid(True, axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Time by stage, C={c}, {dtype} — " + _title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_plots(results: Results, stem: Path) -> list[Path]:
    """Both plots next to the JSON: <stem>-time-vs-n.png and <stem>-stages.png."""
    paths = [stem.with_name(stem.name + "-time-vs-n.png"), stem.with_name(stem.name + "-stages.png")]
    plot_time_vs_n(results, paths[0])
    plot_stages(results, paths[1])
    return [p for p in paths if p.exists()]


if __name__ == "__main__":
    for name in sys.argv[1:]:
        json_path = Path(name)
        print(*write_plots(Results.load(json_path), json_path.with_suffix("")), sep="\n")
