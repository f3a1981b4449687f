"""Text tables of a run: times and ratios per shape, bandwidth, and the targets."""
from __future__ import annotations

from .results import STAGES, Results
from .targets import evaluate

IMPLS = ("fused", "reference", "per_roi")


def _ms(seconds):
    return "-" if seconds is None else f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def _ratio(slow, fast):
    return "-" if slow is None or fast is None else f"{slow / fast:.1f}x"


def _mb(nbytes):
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def times_table(results: Results) -> str:
    lines = []
    header = (f"{'stage':<18}{'fused ms':>11}{'reference ms':>14}{'per-ROI ms':>12}{'ref/fused':>11}"
              f"{'perROI/fused':>14}{'peak MB f/r/p':>22}")
    for n, c, dtype in results.shapes():
        lines.append(f"\nN={n}  C={c}  {dtype}")
        lines.append(header)
        for stage in STAGES:
            t = {i: results.time(i, stage, n, c, dtype) for i in IMPLS}
            peaks = "/".join(_mb(results.peak(i, stage, n, c, dtype)) for i in IMPLS)
            lines.append(f"{stage:<18}{_ms(t['fused']):>11}{_ms(t['reference']):>14}{_ms(t['per_roi']):>12}"
                         f"{_ratio(t['reference'], t['fused']):>11}{_ratio(t['per_roi'], t['fused']):>14}"
                         f"{peaks:>22}")
        for impl in ("fused", "reference"):
            record = results.find(impl, "loss_fwd_bwd", n, c, dtype)
            if record and results.copy_bandwidth:
                bw = record["bandwidth_GBps"]
                lines.append(f"  {impl} loss fwd+bwd over the 5|z| byte floor: {bw:.1f} GB/s = "
                             f"{bw * 1e9 / results.copy_bandwidth:.0%} of copy bandwidth")
        sampled = [r for r in results.records if (r["N"], r["C"], r["dtype"]) == (n, c, dtype) and r["reps"] < 5]
        if sampled:
            lines.append("  few runs (slow calls): " + ", ".join(
                f"{r['impl']}/{r['stage']} x{r['reps']}" for r in sampled))
    return "\n".join(lines)


def targets_table(results: Results) -> str:
    lines = [f"\n{'device':<6} {'target':<96} {'bar':>8} {'measured':>10}  verdict"]
    for row in evaluate(results):
        figure = "-" if row["figure"] is None else f"{row['figure']:.3g}{row['unit']}"
        lines.append(f"{row['device']:<6} {row['target']:<96} {row['bar']:>8} {figure:>10}  {row['verdict']}")
    return "\n".join(lines)
