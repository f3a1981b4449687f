"""The memory-traffic trace of the emulation build (tests/emulator/gpu_trace.py) on the tiny kernels of
tests/emulator/csrc/gpu_trace_kernels.cpp, whose answers are known: sectors per request of coalesced, strided and
broadcast reads, shared-memory bank conflicts, atomics, barriers, and nothing recorded outside a kernel.
Then the real kernels once, at a tiny shape."""
import os

import pytest
import torch

import gpu_trace

pytestmark = [
    pytest.mark.cuda_emu,
    # Under `make test-emu-asan` libasan is preloaded and its __asan_* functions would take the hooks' place.
    pytest.mark.skipif(os.environ.get("CONTRASTMASK_EMU_ASAN", "0") == "1",
                       reason="the traced build defines the ASan hooks itself"),
]

KERNELS_SOURCE = os.path.join(gpu_trace.EMU_CSRC, "gpu_trace_kernels.cpp")
KERNELS_FILE = os.path.relpath(KERNELS_SOURCE, gpu_trace.ROOT)  # as the trace names it


def marker_line(name):
    """The line of the test kernels marked `// TRACE: name`."""
    with open(KERNELS_SOURCE) as f:
        lines = [i + 1 for i, text in enumerate(f) if text.rstrip().endswith("// TRACE: " + name)]
    assert len(lines) == 1, name
    return lines[0]


@pytest.fixture(scope="module")
def kernels():
    return gpu_trace.test_kernels()


def run(kernels, name, inp, blocks=2, threads=64, stride=1, offset=0):
    launches = gpu_trace.trace(lambda: kernels.run(name, inp, blocks, threads, stride, offset))
    assert len(launches) == 1
    return launches[0]


def line(launch, marker, kind, space):
    number = marker_line(marker)
    found = [r for r in launch["lines"] if r["file"] == KERNELS_FILE and r["line"] == number
             and r["kind"] == kind and r["space"] == space]
    assert len(found) == 1, (marker, kind, space, [(r["file"], r["line"], r["kind"], r["space"])
                                                   for r in launch["lines"]])
    return found[0]


def test_coalesced_copy_is_4_sectors_per_request(kernels):
    blocks, threads = 2, 64
    t = run(kernels, "copy", torch.arange(blocks * threads, dtype=torch.float32), blocks, threads, stride=1)
    warps = blocks * threads // 32
    for kind in ("load", "store"):
        r = line(t, "copy", kind, "global")
        assert (r["requests"], r["lanes"], r["sectors"], r["max_sectors"]) == (warps, 32 * warps, 4 * warps, 4)
        assert r["sectors_per_request"] == 4 and r["efficiency"] == 1.0
        assert r["distinct_sectors"] == 4 * warps  # each sector once: 512 bytes
    assert t["global_requests"] == 2 * warps and t["global_sectors"] == 8 * warps
    assert t["distinct_sectors"] == 8 * warps
    assert t["shared_requests"] == 0 and t["atomic_requests"] == 0 and t["barriers"] == 0
    assert (t["blocks"], t["threads"]) == (blocks, blocks * threads)
    assert t["function"].startswith("(anonymous namespace)::copy_kernel(")
    # The kernel's arguments and threadIdx/blockIdx/blockDim are parameter reads, not global ones.
    assert t["param_loads"] > 0


def test_stride_32_read_is_32_sectors_per_request(kernels):
    blocks, threads = 2, 64
    t = run(kernels, "copy", torch.zeros(blocks * threads * 32), blocks, threads, stride=32)
    r = line(t, "copy", "load", "global")
    assert r["requests"] == 4 and r["sectors_per_request"] == 32 and r["efficiency"] == pytest.approx(4 / 32)
    assert line(t, "copy", "store", "global")["sectors_per_request"] == 4


def test_a_misaligned_copy_touches_5_sectors(kernels):
    t = run(kernels, "copy", torch.zeros(256), 1, 32, stride=1, offset=4)  # starts 16 bytes into a sector
    r = line(t, "copy", "load", "global")
    assert (r["requests"], r["sectors"], r["ideal_sectors"]) == (1, 5, 4)


def test_a_broadcast_is_1_sector_per_request(kernels):
    t = run(kernels, "copy", torch.zeros(1), 2, 64, stride=0)
    r = line(t, "copy", "load", "global")
    assert r["requests"] == 4 and r["sectors_per_request"] == 1 and r["efficiency"] == 1.0
    assert r["distinct_sectors"] == 1


def test_partial_warp_is_one_request(kernels):
    t = run(kernels, "half_warp", torch.zeros(128, dtype=torch.float64), 2, 64)
    r = line(t, "half warp", "load", "global")
    # 16 lanes x 8 bytes = 128 bytes: 4 sectors, 4 requests (one per warp).
    assert (r["requests"], r["lanes_per_request"], r["sectors_per_request"]) == (4, 16, 4)


def test_loop_access_pairs_lanes_by_iteration(kernels):
    # Odd lanes skip the conditional load in one iteration each, a different one per lane: counting
    # executions from the kernel's start would pair their later loads with other lanes' earlier
    # iterations (up to 8 sectors per request); counted from the loop's anchor, each request stays in
    # one iteration (4 sectors).
    inp = torch.ones(1024)
    for lane in range(1, 32, 2):
        inp[(lane // 2) % 8 * 32 + lane] = -1
    t = run(kernels, "divergent_loop", inp, 1, 32)
    anchor = line(t, "loop anchor", "load", "global")
    assert (anchor["requests"], anchor["lanes"], anchor["sectors"]) == (8, 256, 32)
    cond = line(t, "loop conditional", "load", "global")
    assert (cond["requests"], cond["lanes"], cond["max_sectors"], cond["sectors"]) == (8, 256 - 16, 4, 32)
    # Run by each lane once but in iteration lane % 8: 8 requests of 4 lanes (lanes it, it+8, ...),
    # among them the lanes that skipped that iteration.
    once = line(t, "loop once", "load", "global")
    skipped = sum(1 for lane in range(1, 32, 2) if (lane // 2) % 8 == lane % 8)
    assert (once["requests"], once["lanes"]) == (8, 32 - skipped)


@pytest.mark.parametrize("stride,degree", [(32, 32), (1, 1), (0, 1), (2, 2), (33, 1)])
def test_shared_memory_bank_conflicts(kernels, stride, degree):
    t = run(kernels, "shared", torch.zeros(1), 2, 64, stride=stride)
    r = line(t, "shared load", "load", "shared")
    assert r["requests"] == 4 and r["degree"] == degree and r["max_degree"] == degree
    assert r["ideal_wavefronts"] == 4
    s = line(t, "shared store", "store", "shared")  # stride 1 stores, 1024 words by 64 threads
    assert s["requests"] == 2 * 2 * 16 and s["degree"] == 1
    assert t["barriers"] == 2 and t["barriers_per_block"] == 1
    assert line(t, "shared load", "store", "global")["sectors_per_request"] == 4


def test_atomics_are_counted_as_atomics(kernels):
    blocks, threads = 3, 64
    t = run(kernels, "atomic", torch.zeros(1, dtype=torch.int32), blocks, threads)
    r = line(t, "shared atomic", "atomic", "shared")
    assert (r["requests"], r["lanes"], r["same_address_max"]) == (blocks * 2, blocks * threads, 32)
    g = line(t, "global atomic", "atomic", "global")
    assert (g["requests"], g["lanes"], g["sectors"]) == (blocks, blocks, blocks)
    # The load and store that emulate an atomic are not recorded as such.
    number = marker_line("shared atomic")
    assert [r["kind"] for r in t["lines"] if r["line"] == number] == ["atomic"]
    assert t["barriers"] == 2 * blocks and t["barrier_sites"] and t["atomic_requests"] == blocks * 3


def test_access_outside_a_kernel_is_not_recorded(kernels):
    blocks, threads = 2, 64
    inp = torch.arange(blocks * threads, dtype=torch.float32)
    t = run(kernels, "host_then_copy", inp, blocks, threads)
    host = marker_line("host read")
    assert all(r["line"] != host for r in t["lines"])
    assert t["global_requests"] == 8 and t["global_sectors"] == 32
    # Nothing is recorded when not tracing, and a later trace starts empty.
    kernels.run("copy", inp, blocks, threads, 1, 0)
    assert gpu_trace.trace(lambda: None) == []


def test_the_real_kernels_at_a_tiny_shape():
    launches = gpu_trace.trace_pipeline(n=4, c=8, h=12, w=12, backward=True)
    names = [gpu_trace.short_name(t) for t in launches]
    assert any(n.startswith("roi_plan_kernel") for n in names), names
    assert any(n.startswith("cosines_kernel") for n in names) and any(n.startswith("write_dz_kernel") for n in names)
    for t in launches:
        assert t["global_requests"] > 0, t["kernel"]
        for r in t["lines"]:
            # Every access is attributed to a line of the project's sources.
            assert r["file"].startswith("csrc/") and r["line"] > 0, r
            assert r["requests"] > 0 and 0 < r["lanes_per_request"] <= 32
            if r["space"] == "global" and r["kind"] != "atomic":
                assert 0 < r["efficiency"] <= 1
    plan = launches[names.index(next(n for n in names if n.startswith("roi_plan_kernel")))]
    assert plan["shared_requests"] > 0 and plan["barriers_per_block"] >= 2
    assert gpu_trace.table(launches, lines=True).count("\n") > len(launches)


def test_plan_radix_scan_has_no_bank_conflicts():
    # Warp 0 scans the 256-bin histogram, 8 bins a lane: unpadded that was an 8-way conflict (the plan's
    # hottest shared line in the gpu model); hist_slot pads one word per 32 bins.
    source = os.path.join(gpu_trace.ROOT, "csrc", "cuda", "plan_kernels.cu")
    with open(source) as f:
        numbers = [i + 1 for i, text in enumerate(f) if "hist[hist_slot(tid * kPerLane + q)]" in text]
    assert len(numbers) == 1
    launches = gpu_trace.trace_pipeline(n=4, c=8, h=28, w=28, backward=False)
    plan = next(t for t in launches if gpu_trace.short_name(t).startswith("roi_plan_kernel"))
    scan = [r for r in plan["lines"] if r["file"] == "csrc/cuda/plan_kernels.cu" and r["line"] == numbers[0]
            and r["space"] == "shared" and r["kind"] == "load"]
    assert scan and scan[0]["requests"] > 0 and scan[0]["max_degree"] == 1, scan
