"""Statistics over seeds and the protocol's decision rule: an ordering between two arms "holds" if it
holds in every seed-paired comparison, or if the mean gap exceeds twice the larger of the two arms'
standard deviations across seeds; the opposite ordering holding is "reversed"; otherwise "not shown"."""
import statistics

from .protocol import COMPARISONS, METRICS


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


def decide_all(summary):
    """The decision rule's verdict for every comparison and metric the summary covers."""
    decisions = []
    for better, than in COMPARISONS:
        for label, _ in METRICS:
            d = decide(summary, better, than, label)
            if d:
                decisions.append({"better": better, "than": than, "metric": label, **d})
    return decisions
