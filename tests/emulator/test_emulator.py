"""The CUDA emulator itself (tests/emulator/cuda_emu.py, tests/emulator/csrc/), on the tiny kernels of
tests/emulator/csrc/emulator_kernels.cpp: each check must be able to fail."""
import pytest
import torch

import cuda_emu
from blobs import blob_batch

pytestmark = pytest.mark.cuda_emu

ORDERS = list(cuda_emu.ORDERS)


@pytest.fixture(scope="module")
def kernels():
    cuda_emu.load()
    yield torch.ops.contrastmask_emulator_test
    cuda_emu.set_order("fwd")


def run(kernels, name, blocks=1, threads=64, smem=0, arg=0, opt_in=-1, order="fwd", seed=1):
    cuda_emu.set_order(order, seed)
    return kernels.run(name, blocks, threads, smem, arg, opt_in)


def test_missing_barrier_shows_under_some_order(kernels):
    blocks, threads = 3, 64
    want = torch.tensor([1000 * b + (t + 1) % threads for b in range(blocks) for t in range(threads)],
                        dtype=torch.int32)
    wrong = {}
    for order in ORDERS:
        good = run(kernels, "neighbour", blocks, threads, arg=1, order=order)[: blocks * threads]
        assert torch.equal(good, want), order
        racy = run(kernels, "neighbour", blocks, threads, arg=0, order=order)[: blocks * threads]
        wrong[order] = int((racy != want).sum())
    # Forward: every thread but the last reads its neighbour before the neighbour wrote; reverse: only
    # the last thread of each block reads too early.
    assert wrong == {"fwd": blocks * (threads - 1), "rev": blocks, "rand": wrong["rand"]}
    assert 0 < wrong["rand"] < blocks * threads


@pytest.mark.parametrize("name,message", [
    ("divergent_barrier", "every thread of the block must reach each barrier"),
    ("split_barrier", "divergent barrier"),
])
@pytest.mark.parametrize("order", ORDERS)
def test_a_divergent_barrier_raises(kernels, name, message, order):
    with pytest.raises(RuntimeError, match=message):
        run(kernels, name, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_a_shuffle_with_an_exited_lane_raises(kernels, order):
    with pytest.raises(RuntimeError, match="exited"):
        run(kernels, "exited_lane", threads=32, arg=5, order=order)
    # Every lane present: the butterfly sums 0..31 in every lane.
    assert torch.equal(run(kernels, "exited_lane", threads=32, arg=-1, order=order)[:32],
                       torch.full((32,), 496, dtype=torch.int32))


def test_a_partial_mask_raises(kernels):
    with pytest.raises(RuntimeError, match="partial mask 0x0000ffff"):
        run(kernels, "partial_mask", threads=32)


def test_collective_in_a_partial_warp_raises(kernels):
    with pytest.raises(RuntimeError, match="only 16 lanes"):
        run(kernels, "exited_lane", threads=48, arg=-1)


@pytest.mark.parametrize("order", ORDERS)
def test_a_deadlock_raises(kernels, order):
    with pytest.raises(RuntimeError, match="deadlock"):
        run(kernels, "deadlock", threads=64, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_warp_collectives_and_barrier_reductions(kernels, order):
    threads, arg = 64, 40
    out = run(kernels, "collectives", threads=threads, arg=arg, order=order)[: threads * 6].view(threads, 6)
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        seg = lane - lane % 8
        assert out[t, 0] == base + (lane ^ 3)
        assert out[t, 1] == (t + 5 if lane + 5 < 32 else t)
        assert out[t, 2] == (t - 2 if lane - 2 >= seg else t)
        assert out[t, 3] == base + 7
        assert out[t, 4] == sum(1 << l for l in range(32) if l % 3 == 0)
        assert out[t, 5] == 1
    out = run(kernels, "collectives", threads=threads, arg=-1, order=order)[: threads * 6].view(threads, 6)
    assert (out[:, 5] == 0).all()


def test_shared_memory_starts_as_garbage(kernels):
    fwd = run(kernels, "uninitialised_shared", threads=32, order="fwd")[:32]
    assert (fwd == -1).all()  # all-ones bytes under the forward and reverse orders
    rand = run(kernels, "uninitialised_shared", threads=32, order="rand", seed=3)[:32]
    assert len(set(rand.tolist())) > 16  # random bytes under the random order


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_host_allocations_are_garbage(kernels, dtype):
    cuda_emu.set_order("fwd")
    assert torch.isnan(kernels.empty(16, dtype)).all()
    cuda_emu.set_order("rev")
    assert (kernels.empty(16, torch.int32) == -1).all()
    assert torch.zeros(4).eq(0).all()  # outside the CUDA host code, allocations are left alone


@pytest.mark.parametrize("blocks,threads,message", [
    (0, 32, "empty grid"), (1, 0, "empty block"), (1, 1025, "block too large")])
def test_bad_launch_configurations_raise(kernels, blocks, threads, message):
    with pytest.raises(RuntimeError, match=message):
        run(kernels, "neighbour", blocks=blocks, threads=threads, arg=1)


def test_shared_memory_limits(kernels):
    # Over 48 KB of dynamic shared memory needs the opt-in attribute first.
    with pytest.raises(RuntimeError, match="kernel's limit of 49152 bytes"):
        run(kernels, "dynamic_shared", threads=32, smem=49 * 1024, arg=100)
    out = run(kernels, "dynamic_shared", threads=32, smem=49 * 1024, arg=100, opt_in=60 * 1024)
    assert (out[:32] == 100).all()
    # Over the device's 227 KB per block.
    with pytest.raises(RuntimeError, match="device limit"):
        run(kernels, "dynamic_shared", threads=32, smem=230 * 1024, arg=100)
    with pytest.raises(RuntimeError, match="invalid argument"):
        run(kernels, "dynamic_shared", threads=32, smem=0, arg=0, opt_in=228 * 1024)
    # Static (4 KB) + dynamic shared memory over 48 KB without the attribute.
    with pytest.raises(RuntimeError, match="48 KB"):
        run(kernels, "neighbour", threads=32, smem=46 * 1024, arg=1)


def test_plan_sets_its_smem_attribute_once(kernels):
    # 64 x 64 ROIs need 60 KB of dynamic shared memory: the attribute is set once per device and
    # kernel instance (mask dtype), not per call.
    ops = cuda_emu.load()
    b = blob_batch(2, 64, 64, 1, seed=0)
    for order in ORDERS:
        cuda_emu.set_order(order)
        ops.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, 0)
    before = cuda_emu.stats()["attribute_sets"]
    for _ in range(3):
        ops.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, 0)
        ops.boundary_sqdist(b["masks"])
    assert cuda_emu.stats()["attribute_sets"] == before
    ops.roi_plan(b["masks"].to(torch.uint8), b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, 0)
    assert cuda_emu.stats()["attribute_sets"] <= before + 1


# (H, W) of ROI grids on both sides of the 48 KB default: dynamic shared memory is 15 bytes per pixel (rounded
# up to 8 pixels), plus the kernel's static arrays (about 1 KB). 56 x 56 fits under 48 KB with them; from 56 x 57
# the launch opts in; 57 x 57 (dynamic 48 840 bytes, under 48 KB alone) failed before the static part counted;
# 52 x 63 is the last grid whose dynamic part alone is under 48 KB; 29 x 113 the first over it; 64 x 64 the largest.
PLAN_GRIDS_AROUND_THE_DEFAULT_LIMIT = [(56, 56), (56, 57), (57, 57), (52, 63), (29, 113), (64, 64)]
FRESH_PROCESS_PLAN = """
import sys, torch
import cuda_emu
kind, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ops = cuda_emu.load() if kind == "cuda-emu" else torch.ops.contrastmask
device = "cuda" if kind == "cuda" else "cpu"
m = torch.zeros(2, h, w, dtype=torch.bool, device=device)
m[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
d = ops.boundary_sqdist(m)
labels, _, keep = ops.roi_plan(m, None, torch.zeros(2, dtype=torch.bool, device=device), None, 0.1, 0.3, 2, 1, 0)[:3]
assert d.shape == (2, h, w) and bool(keep.all()), (d.shape, keep)
print("ok", int(d.max()))
"""


@pytest.mark.parametrize("kind", ["cuda-emu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("h,w", PLAN_GRIDS_AROUND_THE_DEFAULT_LIMIT)
def test_plan_launches_around_48kb_when_fresh(kind, h, w):
    # A fresh process: once any call has raised the kernel's limit, every later launch passes, so a grid that
    # needs the opt-in but does not ask for it only fails as the first large call of a process.
    import os
    import subprocess
    import sys

    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    path = [cuda_emu.HERE, cuda_emu.ROOT, os.environ.get("PYTHONPATH", "")]  # cuda_emu.py, the package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PLAN, kind, str(h), str(w)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
