"""The predicted-GPU-time model (benchmarks/gpu_model.py, gpu_specs.py, aten_trace.py): its arithmetic on
known numbers, the aten recorder of the reference, the linear extrapolation in N checked against a trace
at a third N, and a quick run of `python -m benchmarks.gpu_model --quick` (the full sweep is `make gpu-model`)."""
import math
import os

import pytest
import torch

from benchmarks import aten_trace, gpu_model, gpu_specs

H100 = gpu_specs.GPUS["H100"]


@pytest.mark.parametrize("threads,registers,shared,blocks,occupancy,limit", [
    (256, 32, 0, 8, 1.0, "warps"),          # 8 warps a block, 1024 registers a warp: 8 blocks fill 64 warps
    (256, 128, 0, 2, 0.25, "registers"),    # 4096 registers a warp: 16 warps' worth
    (256, 33, 0, 6, 48 / 64, "registers"),  # 1056 registers a warp, allocated in units of 256: 1280, 51 warps
    (256, 32, 60 * 1024, 3, 24 / 64, "shared"),  # 61 KB a block with the reserved 1 KB: 3 in 228 KB
    (32, 16, 0, 32, 0.5, "blocks"),         # at most 32 blocks an SM
])
def test_occupancy_on_known_configurations(threads, registers, shared, blocks, occupancy, limit):
    o = gpu_specs.occupancy(threads, registers, shared)
    assert (o["blocks_per_sm"], o["limited_by"]) == (blocks, limit)
    assert o["occupancy"] == pytest.approx(occupancy)


PTXAS = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_ZN12contrastmask3fooIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN12contrastmask3fooIfEEvPT_
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 1088 bytes smem
ptxas info    : Compiling entry function '_ZN12contrastmask3barEv' for 'sm_90'
ptxas info    : Function properties for _ZN12contrastmask3barEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers
"""


def test_ptxas_usage_is_parsed_and_demangled():
    usage = gpu_specs.parse_resource_usage(PTXAS)
    assert usage["_ZN12contrastmask3fooIfEEvPT_"] == {"registers": 40, "static_shared": 1088, "stack": 8,
                                                       "spill_stores": 4, "spill_loads": 12}
    assert usage["_ZN12contrastmask3barEv"]["registers"] == 18
    assert usage["_ZN12contrastmask3barEv"]["static_shared"] == 0
    names = gpu_specs.demangle(usage)
    assert names["_ZN12contrastmask3fooIfEEvPT_"] in ("void contrastmask::foo<float>(float*)",
                                                      "_ZN12contrastmask3fooIfEEvPT_")


def test_launch_time_is_binding_term_plus_launch():
    launch = {"blocks": 264, "distinct_sectors": 1e6, "global_sectors": 4e6, "shared_wavefronts": 0}
    seconds, bound = gpu_model.predict_launch(launch, H100)
    # 4x the DRAM sectors through an L2 assumed at 2x the HBM bandwidth: the L2 term binds, at twice the DRAM's.
    assert bound == "l2" and seconds == pytest.approx(2 * 32e6 / H100.hbm_bytes_per_s)
    launch["global_sectors"] = 1e6
    seconds, bound = gpu_model.predict_launch(launch, H100)
    assert bound == "dram" and seconds == pytest.approx(32e6 / H100.hbm_bytes_per_s)
    # Half as many blocks as SMs reach half the bandwidth.
    launch["blocks"] = 66
    assert gpu_model.predict_launch(launch, H100)[0] == pytest.approx(2 * 32e6 / H100.hbm_bytes_per_s)
    # 1e7 conflict-free shared requests over 66 SMs at one per clock.
    launch["shared_wavefronts"] = 1e7
    seconds, bound = gpu_model.predict_launch(launch, H100)
    assert bound == "shared" and seconds == pytest.approx(1e7 / (66 * H100.clock_hz))


def test_trees_gain_a_level_every_256_fold():
    assert [gpu_model.tree_levels(n) for n in (1, 2, 256, 257, 65536, 65537)] == [1, 1, 1, 2, 2, 3]


def test_aten_recorder_counts_launches_and_reads():
    a, b = torch.ones(64, 32), torch.ones(32)

    def fn():
        c = a + b                    # reads a (8 KB) and b (broadcast: its 128 bytes once), writes 8 KB
        v = c.view(32, 64).t()       # views: no launch
        s = v.sum()                  # reads 8 KB, writes 4 bytes
        s.item()                     # a host read
        c.tolist()                   # another

    rec = aten_trace.record(fn)
    assert [name for name, _, _ in rec.ops] == ["add", "sum"]
    assert rec.ops[0][1:] == (64 * 32 * 4 + 32 * 4, 64 * 32 * 4)
    assert rec.ops[1][1:] == (64 * 32 * 4, 4)
    assert rec.host_reads == 2
    assert aten_trace.span_bytes(torch.ones(3, 1).expand(3, 1000)) == 12


@pytest.mark.cuda_emu
@pytest.mark.skipif(os.environ.get("CONTRASTMASK_EMU_ASAN", "0") == "1", reason="the traced build defines the ASan hooks")
def test_per_roi_kernel_counts_are_linear_in_n():
    # The same 4 ROIs repeated: traced at N = 4 and 8 and extrapolated to 12. The kernels that read every
    # labelled pixel of z equal a trace at 12 exactly (the ROIs' slabs of z are sector-aligned); those that
    # follow the keys within 2 % (the sampler hashes the ROI's index: repeated ROIs draw other keys), and the
    # trees over ROIs and one-block kernels within 2 % or 8 (not exactly linear, but small).
    from benchmarks.inputs import Batch, make_batch

    base = make_batch(4, 32, 12, 12)
    tiled = Batch(z=base.z.detach().repeat(3, 1, 1, 1), masks=base.masks.repeat(3, 1, 1),
                  cams=base.cams.repeat(3, 1, 1), is_novel=base.is_novel.repeat(3))
    at = {n: gpu_model.trace_fused(gpu_model.first_rois(tiled, n)) for n in (4, 8, 12)}
    predicted = gpu_model.extrapolate(at[4], at[8], 4, 8, 12)
    assert [(t["phase"], t["kernel"]) for t in predicted] == [(t["phase"], t["kernel"]) for t in at[12]]
    exact = ("roi_counts_kernel", "partition_sums_kernel", "cosines_kernel")
    for p, t in zip(predicted, at[12]):
        for k in ("distinct_sectors", "global_sectors", "shared_wavefronts", "global_requests"):
            if t["kernel"].split("<")[0] in exact:
                assert p[k] == t[k], (t["kernel"], k)
            else:
                assert p[k] == pytest.approx(t[k], rel=0.02, abs=8), (t["kernel"], k)


@pytest.mark.cuda_emu
@pytest.mark.skipif(os.environ.get("CONTRASTMASK_EMU_ASAN", "0") == "1", reason="the traced build defines the ASan hooks")
def test_quick_run_predicts_kernels_and_reference(capsys):
    result = gpu_model.main(["--quick"])
    out = capsys.readouterr().out
    assert "PREDICTED per-kernel figures" in out and "PREDICTED pipeline times" in out
    config = gpu_model.QUICK
    records = result["pipeline"]
    assert {(r["gpu"], r["N"]) for r in records} == {(g, n) for g in gpu_specs.GPUS for n in config["sweep_n"]}
    launch = gpu_specs.ASSUMPTIONS["launch_s"] * 1e6
    for r in records:
        # Never below the launches' latency nor the bytes the loss must move.
        assert r["fused_loss_us"] >= (r["fused_forward_launches"] + r["fused_backward_launches"]) * launch
        assert r["fused_loss_us"] >= r["loss_floor_us"] > 0
        # The reference launches an aten op for each step of the math: many more launches than the kernels.
        assert r["reference_forward_launches"] + r["reference_backward_launches"] > \
            2 * (r["fused_forward_launches"] + r["fused_backward_launches"])
        assert r["reference_plan_host_reads"] >= 1  # its sampler hashes on the host
    by = {(r["gpu"], r["N"]): r for r in records}
    for n in config["sweep_n"]:
        # More bandwidth, same SMs and clock: H200 is never slower.
        assert by["H200", n]["fused_loss_us"] <= by["H100", n]["fused_loss_us"]
    rows = result["kernels"]["float32"]
    assert [r["phase"] for r in rows][0] == "plan" and rows[-1]["kernel"].startswith("write_dz_kernel")
    for r in rows:
        assert r["predicted_us"]["H100"] >= launch and 0 < r["efficiency"] <= 1
    for f in result["hot_lines"]:
        assert f["line"].startswith("csrc/") and f["share"] >= gpu_model.HOT_SHARE
        assert f["efficiency"] < 0.5 or f["degree"] > 2
    assert math.isfinite(sum(r["reference_loss_us"] for r in records))


def test_profiler_names_and_traced_names_pair_up():
    from benchmarks import gpu_measure

    profiler = "void contrastmask::(anonymous namespace)::cosines_kernel<float, float>(contrastmask::(anonymous " \
               "namespace)::CosineArgs<float, float>)"
    traced = "contrastmask::(anonymous namespace)::cosines_kernel<float, float>(contrastmask::(anonymous " \
             "namespace)::CosineArgs<float, float>)"
    assert gpu_measure.kernel_short_name(profiler) == gpu_measure.kernel_short_name(traced) == \
        "cosines_kernel<float, float>"
    tree = "void contrastmask::cuda::chunk_sums_kernel<double>(double const*, bool const*, long, long, long, double*)"
    assert gpu_measure.kernel_short_name(tree) == "chunk_sums_kernel<double>"
    predicted = [{"phase": "forward", "kernel": "a", "predicted_us": {"H100": 3.0}},
                 {"phase": "backward", "kernel": "b", "predicted_us": {"H100": 5.0}},
                 {"phase": "backward", "kernel": "a", "predicted_us": {"H100": 4.0}}]
    measured = [("a", 6.0), ("fill", 1.0), ("b", 10.0), ("a", 8.0), ("a", 2.0)]
    rows, unmatched, others = gpu_measure.pair(predicted, measured)
    assert [r["measured_us"] for r in rows] == [6.0, 10.0, 8.0]  # the k-th launch of a kernel with the k-th
    assert unmatched == {"a": 2.0} and others == {"fill": 1.0}
    text = gpu_measure.table(rows, "H100", unmatched, others)
    assert "| all | (our kernels) | 12.0 | 24.0 | 2.00 |" in text
