"""Predicted GPU time of the fused kernels and of the pure-PyTorch reference, without a GPU: a roofline model
fed by the memory traffic of the traced emulation build (tests/emulator/gpu_trace.py) and by the reference's
aten operator sequence (benchmarks/aten_trace.py). Everything it prints is a *prediction*.

    make gpu-model                               # = python -m benchmarks.gpu_model
    python -m benchmarks.gpu_model --quick       # tiny shapes, no nvcc, nothing written (part of make test)

The model (benchmarks/README.md, "Predicted GPU time"), per kernel launch:
    t = max(DRAM bytes / (HBM bandwidth * f), L2 bytes / (L2 bandwidth * f), shared wavefronts / (SMs' * clock))
        + launch latency
with DRAM bytes = the launch's distinct 32-byte sectors (each fetched once), L2 bytes = the sectors its
requests touch, f = min(1, blocks / SMs), SMs' = min(blocks, SMs). Each reference operator is one launch
moving its inputs' and outputs' bytes: t = bytes / HBM bandwidth + launch latency. The GPUs' figures and the
assumptions are in benchmarks/gpu_specs.py.

The traced build runs every CUDA thread on the CPU, so it is traced at two small batch sizes (N_a, N_b) at
the real C and H x W, and each launch's counts are extrapolated linearly in N (per-ROI kernels are linear in
N; the check is `tests/emulator/test_gpu_model.py`). Trees over ROIs gain one level (one launch) each time N
grows 256-fold.
Writes benchmarks/results/gpu-model-<date>.json and prints the per-kernel and pipeline tables.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import subprocess
import sys

import torch

from . import aten_trace, gpu_specs
from .inputs import KEY_SEED, Batch, make_batch
from .results import DTYPES, write_json
from .targets import BYTE_FLOOR_PASSES

REPO_ROOT = gpu_specs.REPO_ROOT
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
PHASES = ("plan", "forward", "backward")
FULL = dict(trace_n=(32, 64), sweep_n=(128, 256, 512, 1024, 2048), c=256, h=28, w=28, dtypes=("float32", "bfloat16"),
            table_n=512)
QUICK = dict(trace_n=(2, 4), sweep_n=(8, 128), c=16, h=12, w=12, dtypes=("float32",), table_n=128)
TREE_KERNELS = ("chunk_sums_kernel", "chunk_lse_kernel")  # one launch per level of a fixed-shape tree over ROIs
TREE_FAN_IN = 256
HOT_SHARE = 0.05  # a line taking at least this share of its kernel's predicted time is "hot"


def _gpu_trace():
    emulator = os.path.join(REPO_ROOT, "tests", "emulator")  # gpu_trace.py and the cuda_emu.py it imports
    if emulator not in sys.path:
        sys.path.insert(0, emulator)
    import gpu_trace

    return gpu_trace


@contextlib.contextmanager
def _traced_ops():
    """contrastmask_ops.functional calling the traced emulation build's operators."""
    from contrastmask_ops import functional

    ops = _gpu_trace().load()
    saved = functional._ops
    functional._ops = ops
    try:
        yield ops
    finally:
        functional._ops = saved


# ---------------------------------------------------------------- the fused kernels

LINE_FIELDS = ("requests", "lanes", "sectors", "ideal_sectors", "distinct_sectors", "wavefronts", "ideal_wavefronts")
LAUNCH_FIELDS = ("blocks", "global_requests", "global_sectors", "global_ideal_sectors", "distinct_sectors",
                 "shared_requests", "shared_wavefronts", "atomic_requests", "barriers")


def _summary(launch, phase):
    gpu_trace = _gpu_trace()
    lines = {}
    for r in launch["lines"]:
        key = f"{r['file']}:{r['line']}:{r['kind']}:{r['space']}"
        lines[key] = {k: r[k] for k in LINE_FIELDS}
    return {"phase": phase, "kernel": gpu_trace.short_name(launch),
            "threads_per_block": launch["block"][0] * launch["block"][1] * launch["block"][2],
            "dynamic_shared": launch["dynamic_shared"], "static_shared": launch["static_shared"],
            **{k: launch[k] for k in LAUNCH_FIELDS}, "lines": lines}


def first_rois(batch: Batch, n: int) -> Batch:
    """The batch's first n ROIs (z a fresh leaf): the two traced sizes share their first ROIs, so the
    extrapolation's slope is the mean cost of ROIs N_a..N_b rather than a difference of two random draws."""
    return Batch(z=batch.z[:n].detach().clone().requires_grad_(True), masks=batch.masks[:n], cams=batch.cams[:n],
                 is_novel=batch.is_novel[:n])


def trace_fused(batch: Batch):
    """The launches of the plan, the loss forward and its backward on one batch (traced emulation build)."""
    from contrastmask_ops import functional

    gpu_trace = _gpu_trace()
    out = []
    with _traced_ops() as ops:
        plan = {}

        def run_plan():
            plan["v"] = ops.roi_plan(batch.masks, batch.cams, batch.is_novel, None, 0.1, 0.3, 2, 5, KEY_SEED)

        out += [_summary(t, "plan") for t in gpu_trace.trace(run_plan)]
        labels, keys, keep = plan["v"]
        loss = {}

        def forward():
            loss["v"] = functional.contrastive_loss_from_keys(batch.z, labels, keys, keep)

        out += [_summary(t, "forward") for t in gpu_trace.trace(forward)]
        out += [_summary(t, "backward") for t in gpu_trace.trace(lambda: loss["v"].backward())]
    return out


def _lerp(a, b, na, nb, n):
    return a + (b - a) * (n - na) / (nb - na)


def extrapolate(at_a, at_b, na, nb, n):
    """The launches at batch size n from those traced at na and nb: every count linear in N (clamped at 0)."""
    if [(t["phase"], t["kernel"]) for t in at_a] != [(t["phase"], t["kernel"]) for t in at_b]:
        raise RuntimeError(f"the launch sequences at N={na} and N={nb} differ: cannot extrapolate")
    out = []
    for a, b in zip(at_a, at_b):
        t = {k: a[k] for k in ("phase", "kernel", "threads_per_block", "dynamic_shared", "static_shared")}
        for k in LAUNCH_FIELDS:
            t[k] = max(0.0, _lerp(a[k], b[k], na, nb, n))
        t["blocks"] = max(1, round(t["blocks"]))
        t["lines"] = {}
        for key in sorted(set(a["lines"]) | set(b["lines"])):
            la, lb = a["lines"].get(key), b["lines"].get(key)
            la = la or {k: 0 for k in LINE_FIELDS}
            lb = lb or {k: 0 for k in LINE_FIELDS}
            t["lines"][key] = {k: max(0.0, _lerp(la[k], lb[k], na, nb, n)) for k in LINE_FIELDS}
        out.append(t)
    return out


def tree_levels(rows: int) -> int:
    return max(1, math.ceil(math.log(max(rows, 2)) / math.log(TREE_FAN_IN) - 1e-12))


def predict_launch(t, gpu: gpu_specs.Gpu, assumptions=gpu_specs.ASSUMPTIONS):
    """Seconds of one launch (without the launch latency) and the term that binds."""
    f = min(1.0, t["blocks"] / gpu.sms)
    l2_bw = gpu.hbm_bytes_per_s * assumptions["l2_bandwidth_per_hbm"]
    terms = {
        "dram": t["distinct_sectors"] * 32 / (gpu.hbm_bytes_per_s * f),
        "l2": t["global_sectors"] * 32 / (l2_bw * f),
        "shared": t["shared_wavefronts"] / (min(t["blocks"], gpu.sms) * gpu.clock_hz
                                            * assumptions["shared_wavefronts_per_clock_per_sm"]),
    }
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def line_seconds(line, space, gpu, blocks, assumptions=gpu_specs.ASSUMPTIONS):
    """A line's own time under the same model (its share of its launch's binding resource)."""
    f = min(1.0, blocks / gpu.sms)
    if space == "global":
        l2_bw = gpu.hbm_bytes_per_s * assumptions["l2_bandwidth_per_hbm"]
        return max(line["distinct_sectors"] * 32 / (gpu.hbm_bytes_per_s * f), line["sectors"] * 32 / (l2_bw * f))
    if space == "shared":
        return line["wavefronts"] / (min(blocks, gpu.sms) * gpu.clock_hz)
    return 0.0


def kernel_rows(launches, gpus, usage, n, assumptions=gpu_specs.ASSUMPTIONS):
    """One row per launch: traffic, resources, occupancy and the predicted microseconds on each GPU."""
    gpu_trace = _gpu_trace()
    rows = []
    extra_levels = tree_levels(n) - 1
    for t in launches:
        u = _usage_of(t["kernel"], usage)
        row = {k: t[k] for k in ("phase", "kernel", "threads_per_block", "dynamic_shared")}
        row.update(blocks=t["blocks"], global_requests=round(t["global_requests"]),
                   sectors_per_request=t["global_sectors"] / t["global_requests"] if t["global_requests"] else 0.0,
                   efficiency=t["global_ideal_sectors"] / t["global_sectors"] if t["global_sectors"] else 1.0,
                   dram_bytes=round(t["distinct_sectors"] * 32), l2_bytes=round(t["global_sectors"] * 32),
                   shared_requests=round(t["shared_requests"]),
                   conflict_degree=t["shared_wavefronts"] / t["shared_requests"] if t["shared_requests"] else 0.0,
                   atomics=round(t["atomic_requests"]))
        if u is not None:
            row.update(registers=u["registers"], static_shared=u["static_shared"], spills=u["spill_stores"],
                       **gpu_specs.occupancy(t["threads_per_block"], u["registers"], u["static_shared"]
                                             + t["dynamic_shared"]))
        else:
            row.update(registers=None, occupancy=None, limited_by=None, static_shared=t["static_shared"])
        # A tree over ROIs has one more level (launch) per 256-fold N beyond the traced sizes' one level.
        launches_here = 1 + (extra_levels if any(t["kernel"].startswith(k) for k in TREE_KERNELS) else 0)
        row["launches"] = launches_here
        row["predicted_us"], row["bound"] = {}, {}
        for key, gpu in gpus.items():
            seconds, bound = predict_launch(t, gpu, assumptions)
            row["predicted_us"][key] = (seconds + launches_here * assumptions["launch_s"]) * 1e6
            row["bound"][key] = bound
        row["_busy_s"] = {key: predict_launch(t, gpu, assumptions)[0] for key, gpu in gpus.items()}
        row["lines"] = t["lines"]
        rows.append(row)
    del gpu_trace
    return rows


def _usage_of(kernel, usage):
    """The resource usage of a traced launch's kernel (matched on the short name, template arguments included)."""
    if not usage:
        return None
    gpu_trace = _gpu_trace()
    for name, u in usage.items():
        if gpu_trace.short_name({"function": name, "kernel": name}) == kernel:
            return u
    return None


def hot_lines(rows, gpu_key, gpus):
    """Lines taking >= HOT_SHARE of their kernel's predicted time, with coalescing below 50 % (global)
    or a bank conflict above 2-way (shared): what DESIGN, "Predicted GPU time", fixes or explains."""
    out = []
    for row in rows:
        busy = row["_busy_s"][gpu_key]
        total = row["predicted_us"][gpu_key] * 1e-6  # with the launch latency: a tiny kernel has no hot line
        if busy <= 0:
            continue
        for key, line in row["lines"].items():
            file, number, kind, space = key.rsplit(":", 3)
            share = line_seconds(line, space, gpus[gpu_key], row["blocks"]) / total
            if share < HOT_SHARE or not line["requests"]:
                continue
            efficiency = line["ideal_sectors"] / line["sectors"] if line["sectors"] else 1.0
            degree = line["wavefronts"] / line["requests"] if space == "shared" else 0.0
            if (space == "global" and kind != "atomic" and efficiency < 0.5) or (space == "shared" and degree > 2):
                out.append({"phase": row["phase"], "kernel": row["kernel"], "line": f"{file}:{number}", "kind": kind,
                            "space": space, "share": share, "efficiency": efficiency, "degree": degree})
    return out


# ---------------------------------------------------------------- the reference

def trace_reference(batch: Batch):
    """Per phase: aten launches, bytes read and written, host reads of the reference (plan through its
    building blocks, then the loss from those keys, forward and backward)."""
    from contrastmask_ops import reference

    plan = {}

    def run_plan():
        labels = reference.partition(batch.masks, batch.cams, batch.is_novel)
        sqdist = reference.boundary_sqdist(batch.masks)
        plan["v"] = (labels,) + tuple(reference.sample_keys(labels, sqdist, batch.is_novel, seed=KEY_SEED))

    loss = {}

    def forward():
        loss["v"] = reference.contrastive_loss_from_keys(batch.z, *plan["v"])

    out = {}
    for phase, fn in (("plan", run_plan), ("forward", forward), ("backward", lambda: loss["v"].backward())):
        rec = aten_trace.record(fn)
        out[phase] = {"launches": len(rec.ops), "bytes": sum(r + w for _, r, w in rec.ops),
                      "host_reads": rec.host_reads}
    return out


def extrapolate_reference(at_a, at_b, na, nb, n):
    return {phase: {k: max(0.0, _lerp(at_a[phase][k], at_b[phase][k], na, nb, n)) for k in at_a[phase]}
            for phase in at_a}


def predict_reference(phase, gpu, assumptions=gpu_specs.ASSUMPTIONS):
    return (phase["bytes"] / gpu.hbm_bytes_per_s + phase["launches"] * assumptions["launch_s"]) * 1e6


# ---------------------------------------------------------------- the run

def run(config, gpus=gpu_specs.GPUS, usage=None, log=print):
    na, nb = config["trace_n"]
    c, h, w = config["c"], config["h"], config["w"]
    pipeline, kernels, flagged = [], {}, []
    for dtype in config["dtypes"]:
        log(f"tracing the fused kernels and the reference: N={na} and N={nb}, C={c}, {h}x{w}, {dtype}")
        batch = make_batch(nb, c, h, w, dtype=DTYPES[dtype])
        fa, fb = trace_fused(first_rois(batch, na)), trace_fused(first_rois(batch, nb))
        ra, rb = trace_reference(first_rois(batch, na)), trace_reference(first_rois(batch, nb))
        element = torch.empty((), dtype=DTYPES[dtype]).element_size()
        for n in config["sweep_n"]:
            rows = kernel_rows(extrapolate(fa, fb, na, nb, n), gpus, usage, n)
            ref = extrapolate_reference(ra, rb, na, nb, n)
            if n == config["table_n"]:
                kernels[dtype] = rows
                for key in gpus:
                    flagged += [dict(f, gpu=key, dtype=dtype, N=n) for f in hot_lines(rows, key, gpus)]
            floor_bytes = BYTE_FLOOR_PASSES * n * c * h * w * element
            for key, gpu in gpus.items():
                record = {"gpu": key, "dtype": dtype, "N": n, "C": c, "H": h, "W": w}
                for phase in PHASES:
                    record[f"fused_{phase}_us"] = sum(r["predicted_us"][key] for r in rows if r["phase"] == phase)
                    record[f"fused_{phase}_launches"] = sum(r["launches"] for r in rows if r["phase"] == phase)
                    record[f"reference_{phase}_us"] = predict_reference(ref[phase], gpu)
                    record[f"reference_{phase}_launches"] = round(ref[phase]["launches"])
                    record[f"reference_{phase}_host_reads"] = round(ref[phase]["host_reads"])
                record["fused_loss_us"] = record["fused_forward_us"] + record["fused_backward_us"]
                record["reference_loss_us"] = record["reference_forward_us"] + record["reference_backward_us"]
                record["fused_pipeline_us"] = record["fused_loss_us"] + record["fused_plan_us"]
                record["reference_pipeline_us"] = record["reference_loss_us"] + record["reference_plan_us"]
                record["loss_speedup"] = record["reference_loss_us"] / record["fused_loss_us"]
                record["loss_floor_us"] = floor_bytes / gpu.hbm_bytes_per_s * 1e6
                record["loss_share_of_roofline"] = record["loss_floor_us"] / record["fused_loss_us"]
                pipeline.append(record)
    for rows in kernels.values():
        for r in rows:
            r.pop("_busy_s", None)
            r.pop("lines", None)
    return {"pipeline": pipeline, "kernels": kernels, "hot_lines": flagged}


def meta(config, usage_note):
    def version(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            return None

    return {"what": "PREDICTED GPU times (roofline model on the traced emulation build's memory traffic); nothing "
                    "here was measured on a GPU",
            "date": datetime.date.today().isoformat(),
            "commit": version(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"]),
            "torch": torch.__version__, "host_compiler": version(["gcc", "--version"]), "python": platform.python_version(),
            "traced_at_N": list(config["trace_n"]), "C": config["c"], "H": config["h"], "W": config["w"],
            "model": __doc__.split("\n\n")[2].strip(), "gpus": {k: g.to_json() for k, g in gpu_specs.GPUS.items()},
            "assumptions": gpu_specs.ASSUMPTIONS, "sm90_limits": gpu_specs.SM90, "resource_usage": usage_note,
            "byte_floor_passes": BYTE_FLOOR_PASSES}


def _fmt_bytes(b):
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} KB"


def kernel_table(rows, gpus=("H100", "H200")) -> str:
    head = ("| phase | kernel | blocks x threads | requests | sectors/req | coalescing | DRAM | L2 | shared req "
            "| conflict | regs | occupancy | " + " | ".join(f"{g} us" for g in gpus) + " |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        occ = f"{r['occupancy']:.2f} ({r['limited_by']})" if r["occupancy"] is not None else "n/a"
        out.append(f"| {r['phase']} | `{r['kernel']}` | {r['blocks']} x {r['threads_per_block']} | {r['global_requests']} "
                   f"| {r['sectors_per_request']:.2f} | {r['efficiency']:.2f} | {_fmt_bytes(r['dram_bytes'])} "
                   f"| {_fmt_bytes(r['l2_bytes'])} | {r['shared_requests']} | {r['conflict_degree']:.2f} "
                   f"| {r['registers'] if r['registers'] is not None else 'n/a'} | {occ} | "
                   + " | ".join(f"{r['predicted_us'][g]:.1f}" for g in gpus) + " |")
    return "\n".join(out)


def pipeline_table(records) -> str:
    head = ("| GPU | dtype | N | fused plan | fused loss fwd+bwd | reference loss fwd+bwd | reference / fused (loss) "
            "| loss at the HBM floor | share of floor | reference plan (launches, host reads) |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        out.append(f"| {r['gpu']} | {r['dtype']} | {r['N']} | {r['fused_plan_us']:.0f} us | {r['fused_loss_us']:.0f} us "
                   f"| {r['reference_loss_us']:.0f} us | {r['loss_speedup']:.1f}x | {r['loss_floor_us']:.0f} us "
                   f"| {r['loss_share_of_roofline']:.0%} | {r['reference_plan_us']:.0f} us "
                   f"({r['reference_plan_launches']}, {r['reference_plan_host_reads']}) |")
    return "\n".join(out)


def hot_table(flagged) -> str:
    if not flagged:
        return "(no hot line below 50 % coalescing or above a 2-way bank conflict)"
    out = ["| GPU | dtype | phase | kernel | line | space | share of kernel | coalescing | conflict |", "|---|---|---|---|---|---|---|---|---|"]
    for f in flagged:
        out.append(f"| {f['gpu']} | {f['dtype']} | {f['phase']} | `{f['kernel']}` | {f['line']} | {f['space']} "
                   f"| {f['share']:.0%} | {f['efficiency']:.2f} | {f['degree']:.1f} |")
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no nvcc, nothing written")
    parser.add_argument("--out", help="the JSON file (default benchmarks/results/gpu-model-<date>.json)")
    parser.add_argument("--no-resource-usage", action="store_true", help="skip nvcc --resource-usage (no occupancy)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads while tracing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else FULL
    usage, note = None, "skipped (--quick or --no-resource-usage)"
    if not (args.quick or args.no_resource_usage):
        print("nvcc --resource-usage for sm_90 (cached under build/gpu-model/)", flush=True)
        try:
            usage = gpu_specs.resource_usage("sm_90")
            note = "nvcc --resource-usage, sm_90, the flags of setup.py"
        except RuntimeError as e:
            note = f"unavailable: {e}"
            print(f"warning: {note}", file=sys.stderr)
    result = run(config, usage=usage, log=lambda s: print(s, flush=True))
    result = {"meta": meta(config, note), **result}
    if usage:
        result["resource_usage"] = usage
    n = config["table_n"]
    for dtype, rows in result["kernels"].items():
        print(f"\nPREDICTED per-kernel figures, N={n}, C={config['c']}, {config['h']}x{config['w']}, {dtype} "
              f"(one loss forward + backward after the plan):\n")
        print(kernel_table(rows))
    print("\nPREDICTED pipeline times (microseconds):\n")
    print(pipeline_table(result["pipeline"]))
    print("\nHot lines (>= 5 % of a kernel's predicted time) with coalescing < 0.5 or a bank conflict > 2-way:\n")
    print(hot_table(result["hot_lines"]))
    if not args.quick:
        print()
        write_json(result, args.out or os.path.join(RESULTS_DIR, f"gpu-model-{result['meta']['date']}.json"))
    return result


if __name__ == "__main__":
    main()
