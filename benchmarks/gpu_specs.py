"""The GPUs the memory-traffic model predicts for, sm_90's per-SM limits, occupancy, and the registers and
shared memory of our kernels from `nvcc --resource-usage` (benchmarks/gpu_model.py; benchmarks/README.md,
"Predicted GPU time").

Every figure is either published (the source is named beside it) or an assumption of the model, named
as such: the model is calibrated the first time a GPU runs `make gpu-check`, which prints measured beside
predicted per kernel.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
from dataclasses import asdict, dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Gpu:
    name: str
    hbm_bytes_per_s: float   # peak DRAM bandwidth
    sms: int
    clock_hz: float          # boost clock
    l2_bytes: int
    source: str

    def to_json(self):
        return asdict(self)


GPUS = {
    "H100": Gpu("H100 SXM5 80GB", 3.35e12, 132, 1.98e9, 50 * 2**20,
                "NVIDIA H100 Tensor Core GPU datasheet (SXM: 3.35 TB/s HBM3) and the NVIDIA H100 Tensor Core GPU "
                "Architecture whitepaper (132 SMs, 50 MB L2, 1.98 GHz boost)"),
    "H200": Gpu("H200 SXM 141GB", 4.8e12, 132, 1.98e9, 50 * 2**20,
                "NVIDIA H200 Tensor Core GPU datasheet (SXM: 4.8 TB/s HBM3e); the same GH100 die and clocks as H100 "
                "SXM5 (132 SMs, 50 MB L2)"),
}

# Assumptions of the model (not published figures; the first GPU run calibrates them).
ASSUMPTIONS = {
    "launch_s": 2.5e-6,
    "launch_s_why": "one kernel launch back to back on a stream: the usual 2-4 us of launch overhead, not published "
                    "as one figure; CUDA graphs would lower it",
    "l2_bandwidth_per_hbm": 2.0,
    "l2_bandwidth_why": "NVIDIA publishes no L2 bandwidth for H100; microbenchmarks report a few times the HBM peak. "
                        "2x HBM is conservative; it only matters for kernels whose L2 sectors far exceed their DRAM "
                        "sectors (poor coalescing or re-reads)",
    "shared_wavefronts_per_clock_per_sm": 1,
    "shared_why": "32 banks of 4 bytes each serve one word per clock (CUDA C++ Programming Guide, 'Shared Memory'): "
                  "one wavefront (a conflict-free warp request) per SM and clock",
    "bandwidth_share_of_a_small_grid": "a launch with fewer blocks than SMs reaches blocks/SMs of the bandwidths "
                                       "(memory-level parallelism comes from resident warps)",
    "no_reuse_between_launches": "each launch reads its distinct sectors from DRAM: at the benchmark's shapes z "
                                 "(N=128, C=256, 28x28: 103 MB in float32, 51 MB in bfloat16) does not fit the 50 MB L2",
}

# Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide, 'Features and Technical Specifications').
SM90 = {
    "max_warps": 64,
    "max_blocks": 32,
    "registers": 65536,
    "register_unit_per_warp": 256,   # registers are allocated per warp in units of 256
    "shared_bytes": 228 * 1024,      # per SM; a block may use up to 227 KB
    "shared_reserved_per_block": 1024,
}


def occupancy(threads_per_block: int, registers: int, shared_per_block: int, limits=SM90) -> dict:
    """Theoretical occupancy of one kernel on sm_90: resident blocks per SM and the share of the SM's 64 warp
    slots they fill, with the limit that binds (warps, blocks, registers or shared memory)."""
    warps = max(1, math.ceil(threads_per_block / 32))
    per_warp = math.ceil(max(registers, 1) * 32 / limits["register_unit_per_warp"]) * limits["register_unit_per_warp"]
    by = {
        "warps": limits["max_warps"] // warps,
        "blocks": limits["max_blocks"],
        "registers": (limits["registers"] // per_warp) // warps,
        "shared": limits["shared_bytes"] // (shared_per_block + limits["shared_reserved_per_block"]),
    }
    blocks = min(by.values())
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / limits["max_warps"],
            "limited_by": min(by, key=lambda k: (by[k], k != "warps"))}


# ---------------------------------------------------------------- nvcc --resource-usage

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_resource_usage(text: str) -> dict:
    """{mangled kernel name: {registers, static_shared, stack, spill_stores, spill_loads}} from ptxas' -v output."""
    out, current = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            out[current] = {"registers": 0, "static_shared": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
            continue
        if current is None:
            continue
        m = _PROPERTIES.search(line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            out[current].update(registers=int(m.group(1)), static_shared=int(m.group(3) or 0))
    return out


def demangle(names) -> dict:
    """{mangled: demangled} through c++filt (names left as they are without it)."""
    names = list(names)
    try:
        text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, text.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


CUDA_SOURCES = ("csrc/cuda/plan_kernels.cu", "csrc/cuda/loss_kernels.cu")


def _nvcc_command(nvcc: str, source: str, arch: str) -> list:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths("cuda")] + [f"-I{os.path.join(REPO_ROOT, 'csrc')}"]
    # The flags of setup.py's build (-O3, --expt-relaxed-constexpr, C++20 for ATen), for one arch, object discarded.
    return [nvcc, f"-arch={arch}", "--resource-usage", "-O3", "--expt-relaxed-constexpr", "-std=c++20",
            "-DCONTRASTMASK_WITH_CUDA", "-DCONTRASTMASK_LIBRARY=contrastmask", *includes, "-c",
            os.path.join(REPO_ROOT, source), "-o", os.devnull]


def resource_usage(arch: str = "sm_90", cache_dir: str | None = None) -> dict:
    """{demangled kernel: usage} of every kernel of csrc/cuda for `arch`, compiled by the toolkit that
    tools/find_cuda.py finds (cached under build/gpu-model/ by the hash of csrc/). Raises RuntimeError
    when there is no toolkit or nvcc fails."""
    import sys

    sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
    import find_cuda  # noqa: E402
    import torch

    search = find_cuda.find_toolkit(torch.version.cuda)
    if search.toolkit is None:
        raise RuntimeError("no CUDA toolkit: " + search.message(error=True))
    nvcc = os.path.join(search.toolkit.home, "bin", "nvcc")
    digest = hashlib.sha256(arch.encode() + nvcc.encode())
    for root, _, files in sorted(os.walk(os.path.join(REPO_ROOT, "csrc"))):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                digest.update(f.encode() + fh.read())
    cache_dir = cache_dir or os.path.join(REPO_ROOT, "build", "gpu-model")
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, f"resource-usage-{arch}-{digest.hexdigest()[:16]}.txt")
    if not os.path.exists(cached):
        text = []
        for source in CUDA_SOURCES:
            done = subprocess.run(_nvcc_command(nvcc, source, arch), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc --resource-usage {source} failed:\n{done.stderr[-3000:]}")
            text.append(done.stdout + done.stderr)
        with open(cached + ".tmp", "w") as f:
            f.write("\n".join(text))
        os.replace(cached + ".tmp", cached)
    with open(cached) as f:
        usage = parse_resource_usage(f.read())
    names = demangle(usage)
    return {names[k]: v for k, v in usage.items()}
