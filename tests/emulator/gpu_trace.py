"""Memory-traffic trace of the CUDA kernels, from the emulation build (tests only; docs/DESIGN.md,
"Memory-traffic trace").

The traced build (build/cuda-emu-trace/) compiles the kernel translation units (tests/emulator/csrc/emu_*_kernels.cpp,
which include csrc/cuda/*.cu, and tests/emulator/csrc/gpu_trace_kernels.cpp) with -fsanitize=kernel-address and
asan-instrumentation-with-call-threshold=0, so every load and store calls __asan_{load,store}N_noabort,
which the emulator runtime (tests/emulator/csrc/cuda_emulation.cpp, CONTRASTMASK_EMU_TRACE; not instrumented,
no ASan runtime) defines: while a kernel thread runs it records the access's address, size and return
address. After each block the runtime groups the accesses warp by warp into requests (the lanes that
execute the same instruction for the k-th time) and counts per instruction: 32-byte sectors (global
memory), bank-conflict degree (shared memory), atomics; barriers and warp collectives per launch.
Here the instructions are symbolised (addr2line) and summed per source line.

Two libraries, both built with torch.utils.cpp_extension.load: the runtime with the operator schemas
(torch.ops.contrastmask_emu_trace, control ops torch.ops.contrastmask_emulator_trace) and the instrumented
kernels linked against it (the kernels of the ops, and torch.ops.contrastmask_trace_test).

    import gpu_trace
    ops = gpu_trace.load()                       # builds when needed
    launches = gpu_trace.trace(lambda: ops.roi_plan(...))
    print(gpu_trace.table(launches))

`python tests/emulator/gpu_trace.py` builds, traces roi_plan and the loss (forward and backward) at a small shape
and prints the per-kernel table (and with --lines the lines of each kernel).
"""
import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys

import torch
from torch.utils import cpp_extension

import cuda_emu
from cuda_emu import EMU_CSRC, INCLUDE_PATHS, ROOT  # the same tree and include path
NAMESPACE = "contrastmask_emu_trace"        # the ops (same schemas as torch.ops.contrastmask)
CONTROL = "contrastmask_emulator_trace"      # set_schedule, stats, trace_begin, trace_end
TEST_KERNELS = "contrastmask_trace_test"     # tests/emulator/csrc/gpu_trace_kernels.cpp
BUILD_DIR = os.path.join(ROOT, "build", "cuda-emu-trace")
EMULATOR_HEADER = os.path.join(EMU_CSRC, "cuda_emulation.h")

# Every load and store of an instrumented translation unit becomes a call of the runtime's hook; no
# stack or global redzones (the kernels' frames are the fibers' stacks, left alone).
INSTRUMENT = ["-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
              "--param=asan-stack=0", "--param=asan-globals=0"]
# Line tables and inlining for addr2line; scalar code (a GPU thread does not load 16 bytes for four
# iterations of its loop, and the host's vector loads would merge accesses a warp makes one by one).
KERNEL_FLAGS = ["-g1", "-fno-tree-vectorize", "-fno-tree-slp-vectorize"]


def _cflags():
    return ["-O2", "-DCONTRASTMASK_CUDA_EMULATION", "-DCONTRASTMASK_EMU_TRACE", "-DCONTRASTMASK_LIBRARY=" + NAMESPACE,
            "-DCONTRASTMASK_EMULATOR_LIBRARY=" + CONTROL, "-Wno-unknown-pragmas"]


def runtime_sources():
    src = [os.path.join(EMU_CSRC, f) for f in ("cuda_emulation.cpp", "emu_library.cpp")]
    src += sorted(os.path.join(ROOT, "csrc", "ops", f) for f in os.listdir(os.path.join(ROOT, "csrc", "ops"))
                  if f.endswith(".cpp") and f != "library.cpp")
    return src


def kernel_sources():
    return [os.path.join(EMU_CSRC, f)
            for f in ("emu_plan_kernels.cpp", "emu_loss_kernels.cpp", "gpu_trace_kernels.cpp")]


def build(verbose: bool = False) -> str:
    """Compiles (when a source changed) and loads both libraries; returns the kernels' library path."""
    common = dict(extra_include_paths=INCLUDE_PATHS, with_cuda=False, is_python_module=False,
                  verbose=verbose)
    runtime_dir = os.path.join(BUILD_DIR, "runtime")
    kernels_dir = os.path.join(BUILD_DIR, "kernels")
    os.makedirs(runtime_dir, exist_ok=True)
    os.makedirs(kernels_dir, exist_ok=True)
    runtime = cpp_extension.load(name="contrastmask_emu_trace_rt", sources=runtime_sources(), extra_cflags=_cflags(),
                                 build_directory=runtime_dir, **common)
    # The kernels call the hooks, the emulator API and the builtins of the runtime library, which they
    # name (by path) as a dependency.
    return cpp_extension.load(name="contrastmask_emu_trace_kernels", sources=kernel_sources(),
                              extra_cflags=_cflags() + INSTRUMENT + KERNEL_FLAGS, extra_ldflags=[runtime],
                              build_directory=kernels_dir, **common)


def load():
    """torch.ops.contrastmask_emu_trace, with the package's fake kernels and autocast registered for it."""
    return cuda_emu.load_namespace(NAMESPACE, build)


def control():
    return getattr(torch.ops, CONTROL)


def test_kernels():
    load()
    return getattr(torch.ops, TEST_KERNELS)


# ---------------------------------------------------------------- symbolisation

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]+$")


def _addr2line(module: str, addresses):
    """{address: [(function, file, line), ...] innermost frame first} for addresses of `module`."""
    out = {a: [] for a in addresses}
    if not addresses or not module or not shutil.which("addr2line"):
        return out
    order = sorted(set(addresses))
    text = subprocess.run(["addr2line", "-i", "-f", "-C", "-a", "-e", module] + [hex(a) for a in order],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    current, i = None, 0
    while i < len(text):
        line = text[i]
        if _ADDRESS.match(line):
            current = int(line, 16)
            i += 1
            continue
        function, where = line, text[i + 1] if i + 1 < len(text) else "??:0"
        i += 2
        path, _, number = where.partition(" (discriminator")[0].rpartition(":")
        out.setdefault(current, []).append((function, os.path.realpath(path) if path != "??" else path,
                                            int(number) if number.isdigit() else 0))
    return out


def _source_frame(frames):
    """The innermost frame in the project's sources other than the emulator's header (an atomic is
    attributed to its caller's line), else the innermost."""
    for f in frames:
        if f[1].startswith(ROOT + os.sep) and f[1] != EMULATOR_HEADER:
            return f
    return frames[0] if frames else ("??", "??", 0)


def _relative(path):
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


SUMMED = ("requests", "lanes", "bytes", "sectors", "ideal_sectors", "distinct_sectors", "wavefronts",
          "ideal_wavefronts")
MAXED = ("max_sectors", "max_degree", "same_address_max")


def _derive(r):
    """Ratios of a line or launch record."""
    n = r["requests"]
    r["lanes_per_request"] = r["lanes"] / n if n else 0.0
    r["sectors_per_request"] = r["sectors"] / n if n else 0.0
    r["efficiency"] = r["ideal_sectors"] / r["sectors"] if r["sectors"] else 1.0
    r["degree"] = r["wavefronts"] / n if n else 0.0
    return r


def records(raw):
    """The runtime's JSON records, symbolised: per launch a dict with per-line records under "lines"
    (the instructions of one source line, kind and address space summed; distinct_sectors of a line is
    the sum over its instructions)."""
    wanted = collections.defaultdict(set)
    for launch in raw:
        wanted[launch["func"]["module"]].add(launch["func"]["offset"])
        for line in launch["lines"]:
            # A return address: the call of the hook ends just before it.
            wanted[line["module"]].add(line["offset"] - 1)
    frames = {m: _addr2line(m, sorted(offsets)) for m, offsets in wanted.items()}
    launches = []
    for launch in raw:
        f = launch.pop("func")
        kernel_frames = frames[f["module"]].get(f["offset"]) or [(launch["kernel"], "??", 0)]
        launch["function"] = kernel_frames[-1][0]
        lines = {}
        for line in launch.pop("lines"):
            chain = frames[line["module"]].get(line["offset"] - 1) or []
            function, path, number = _source_frame(chain)
            key = (_relative(path), number, line["kind"], line["space"])
            if key not in lines:
                lines[key] = dict(file=key[0], line=number, kind=line["kind"], space=line["space"],
                                  function=chain[-1][0] if chain else function,
                                  **{k: 0 for k in SUMMED + MAXED})
            r = lines[key]
            for k in SUMMED:
                r[k] += line[k]
            for k in MAXED:
                r[k] = max(r[k], line[k])
        launch["lines"] = [_derive(r) for r in sorted(lines.values(), key=lambda r: (r["file"], r["line"], r["kind"]))]
        launch.update(_totals(launch))
        launches.append(launch)
    return launches


# What _totals sums over a launch's lines per memory space (besides requests per kind).
SUMMED_PER_SPACE = {"global": ("requests", "sectors", "ideal_sectors", "bytes"),
                    "shared": ("requests", "wavefronts", "ideal_wavefronts")}


def _totals(launch):
    """Per-launch sums: global loads/stores (requests, sectors), shared requests and wavefronts, atomics."""
    t = collections.Counter()
    for r in launch["lines"]:
        if r["kind"] == "atomic":
            t["atomic_requests"] += r["requests"]
            t["atomic_lanes"] += r["lanes"]
            if r["space"] == "global":
                t["global_sectors"] += r["sectors"]
            continue
        space = "global" if r["space"] == "global" else "shared"
        t[f"{space}_{r['kind']}_requests"] += r["requests"]
        for k in SUMMED_PER_SPACE[space]:
            t[f"{space}_{k}"] += r[k]
    out = {k: t[k] for k in ("global_requests", "global_load_requests", "global_store_requests", "global_sectors",
                             "global_ideal_sectors", "global_bytes", "shared_requests", "shared_load_requests",
                             "shared_store_requests", "shared_wavefronts", "shared_ideal_wavefronts",
                             "atomic_requests", "atomic_lanes")}
    out["barriers_per_block"] = launch["barriers"] / launch["blocks"] if launch["blocks"] else 0.0
    return out


# ---------------------------------------------------------------- tracing

def trace(fn):
    """Runs fn() with the traced build recording, and returns its kernel launches (list of dicts, in
    launch order; each with "lines"). fn calls torch.ops.contrastmask_emu_trace.* (or the test kernels)
    on CPU tensors; an access outside a kernel is not recorded."""
    load()
    control().trace_begin()
    try:
        fn()
    finally:
        raw = control().trace_end()
    return records(json.loads(raw))


def short_name(launch):
    """The kernel's name without namespaces, return type and parameters (as benchmarks/gpu_measure.py names
    the profiler's kernels, so predicted and measured launches pair up)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks.gpu_measure import kernel_short_name

    return kernel_short_name(launch["function"]) or launch["kernel"]


def table(launches, lines: bool = False) -> str:
    """A per-launch table: global requests, sectors/request, coalescing efficiency, sectors (L2) and
    distinct sectors (DRAM lower bound), shared requests and mean bank-conflict degree, atomics,
    barriers per block. With lines=True, each launch's lines follow."""
    head = (f"{'kernel':44} {'grid x block':>14} {'g.req':>7} {'sec/req':>7} {'eff':>5} {'L2 sec':>8} "
            f"{'DRAM sec':>8} {'s.req':>7} {'degree':>6} {'atom':>6} {'bar/blk':>7}")
    rows = [head, "-" * len(head)]
    for t in launches:
        g = t["global_requests"]
        s = t["shared_requests"]
        grid = t["grid"][0] * t["grid"][1] * t["grid"][2]
        block = t["block"][0] * t["block"][1] * t["block"][2]
        rows.append(f"{short_name(t)[:44]:44} {f'{grid}x{block}':>14} {g:7d} "
                    f"{t['global_sectors'] / g if g else 0:7.2f} "
                    f"{t['global_ideal_sectors'] / t['global_sectors'] if t['global_sectors'] else 1:5.2f} "
                    f"{t['global_sectors']:8d} {t['distinct_sectors']:8d} {s:7d} "
                    f"{t['shared_wavefronts'] / s if s else 0:6.2f} {t['atomic_requests']:6d} "
                    f"{t['barriers_per_block']:7.1f}")
        if lines:
            for r in t["lines"]:
                where = f"{os.path.basename(r['file'])}:{r['line']}"
                if r["space"] == "global":
                    what = (f"{r['sectors_per_request']:6.2f} sec/req eff {r['efficiency']:.2f} "
                            f"distinct {r['distinct_sectors']}")
                else:
                    what = f"degree {r['degree']:.2f} (max {r['max_degree']})"
                rows.append(f"    {where:28} {r['kind']:6} {r['space']:6} {r['requests']:7d} req "
                            f"{r['lanes_per_request']:5.1f} lanes  {what}")
    return "\n".join(rows)


def trace_pipeline(n: int = 8, c: int = 32, h: int = 28, w: int = 28, seed: int = 0, backward: bool = True):
    """Traces the public pipeline (roi_plan, then the loss forward and backward) on a blob batch."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # blobs.py
    from blobs import blob_batch
    from contrastmask_ops import functional

    ops = load()
    b = blob_batch(n, h, w, c, seed=seed)
    z = b["z"].requires_grad_(backward)
    saved = functional._ops
    functional._ops = ops

    def run():
        loss = functional.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=seed)
        if backward:
            loss.backward()

    try:
        return trace(run)
    finally:
        functional._ops = saved


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,32,28,28", help="N,C,H,W of the traced pipeline")
    parser.add_argument("--lines", action="store_true", help="print each kernel's lines too")
    parser.add_argument("--json", help="write the records to this file")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, ROOT)  # contrastmask_ops, when run as a script
    print("traced emulation library:", build(verbose=args.verbose))
    if not args.build_only:
        n, c, h, w = (int(v) for v in args.shape.split(","))
        launches = trace_pipeline(n, c, h, w)
        print(f"N={n} C={c} H={h} W={w}: roi_plan, contrastive_loss forward and backward")
        print(table(launches, lines=args.lines))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(launches, f, indent=1)
