"""CUDA-only checks that need a real GPU (skipped without one): LossStats take no host sync, neither do the loss
from keys and the pipeline with check_inputs=False and a device seed (which a CUDA graph then replays; the
global pipeline after its first call), and autocast on CUDA computes the loss in float32."""
import contextlib

import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import cpu_loss_inputs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (torch.cuda.is_available() and cm.build_info()["cuda"]),
                                 reason="needs a GPU and the CUDA kernels")]
CUDA = torch.device("cuda")


@contextlib.contextmanager
def no_host_sync():
    """Within: a host sync raises (torch.cuda.set_sync_debug_mode("error")); the GPU is idle on entry."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_stats_take_no_host_sync():
    # LossStats masks with keep instead of indexing with it (contrastmask_ops.stats.loss_stats).
    b = blob_batch(16, 28, 28, 32, seed=9, device=CUDA)
    labels, keys, keep = torch.ops.contrastmask.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5, 1)
    queries = torch.ops.contrastmask.contrastive_loss(b["z"], labels, keys, keep, 0.7, 0.3, False, "paper")[1]
    with no_host_sync():
        for share_queries in (True, False):
            stats = cm.stats.loss_stats(keys, keep, queries, share_queries)
    assert int(stats.kept) == int(keep.sum())


def test_unchecked_pipeline_takes_no_host_sync():
    b = blob_batch(16, 28, 28, 32, seed=9, device=CUDA)
    seed = torch.tensor(7, device=CUDA)
    z = b["z"].clone().requires_grad_(True)
    with no_host_sync():
        loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=seed, check_inputs=False)
        torch.autograd.grad(loss, z)
    want = cm.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], seed=7)
    assert torch.equal(loss.detach(), want)


@pytest.mark.parametrize("impl", [cm, cm.reference], ids=["kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_computes_in_float32(impl, dtype):
    b = blob_batch(6, 28, 28, 16, seed=5, device=CUDA)
    args = (b["masks"], b["cams"], b["is_novel"])
    z_low = b["z"].to(dtype).requires_grad_(True)
    z32 = b["z"].clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        got_low = impl.query_sharing_contrastive_loss(z_low, *args, seed=3)
        got32 = impl.query_sharing_contrastive_loss(z32, *args, seed=3)
    assert got_low.dtype == got32.dtype == torch.float32
    (g_low,) = torch.autograd.grad(got_low, z_low)
    assert g_low.dtype == dtype
    torch.testing.assert_close(got_low, impl.query_sharing_contrastive_loss(z_low.detach().float(), *args, seed=3),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(got32, impl.query_sharing_contrastive_loss(b["z"], *args, seed=3), rtol=1e-6, atol=0)


def test_cuda_graph_replays_with_a_device_seed():
    """With check_inputs=False and a seed tensor on the GPU the pipeline has no host sync, so a training step's
    loss and backward can be captured in a CUDA graph; each replay samples with the seed the tensor then holds."""
    b = {k: v.cuda() for k, v in blob_batch(16, 28, 28, 32, seed=2).items()}
    z = b["z"].clone().requires_grad_(True)
    seed = torch.zeros((), dtype=torch.int64, device="cuda")

    def step():
        loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=seed,
                                                 check_inputs=False)
        (dz,) = torch.autograd.grad(loss, z)
        return loss, dz

    side = torch.cuda.Stream()  # warm up outside the capture, as torch.cuda.graphs asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, dz = step()
    for value in (3, 11, 2**40):
        seed.fill_(value)
        graph.replay()
        want = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=value)
        (want_dz,) = torch.autograd.grad(want, z)
        assert torch.equal(loss, want), value
        assert torch.equal(dz, want_dz), value  # no float atomics: the same bits


def test_loss_takes_no_host_sync():
    z, labels, keys, keep = (t.cuda() for t in cpu_loss_inputs(16, (28, 28), 32, torch.float32, 9))
    z.requires_grad_(True)
    with no_host_sync():
        for share_queries in (True, False):
            loss = cm.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share_queries)
            torch.autograd.grad(loss, z)


def test_unchecked_global_loss_takes_no_host_sync():
    """process_group= on a one-rank NCCL group: after the first call of a configuration (the join's agreement
    check reads the gathered rows once), a step reads nothing on the host (DESIGN, "Global query sharing")."""
    import torch.distributed as dist

    if not dist.is_nccl_available() or dist.is_initialized():
        pytest.skip("needs NCCL and no process group of this process")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        b = blob_batch(16, 28, 28, 32, seed=9, device=CUDA)
        seed = torch.tensor(7, device=CUDA)
        args = (b["masks"], b["cams"], b["is_novel"])
        kwargs = dict(seed=seed, check_inputs=False, process_group=dist.group.WORLD)
        cm.query_sharing_contrastive_loss(b["z"], *args, **kwargs)  # joins the configuration
        z = b["z"][:12].clone().requires_grad_(True)  # another N: the ROI offset is computed on the device
        with no_host_sync():
            loss = cm.query_sharing_contrastive_loss(z, *(a[:12] for a in args), **kwargs)
            (dz,) = torch.autograd.grad(loss, z)
    finally:
        dist.destroy_process_group()
    z_local = b["z"][:12].clone().requires_grad_(True)
    want = cm.query_sharing_contrastive_loss(z_local, *(a[:12] for a in args), seed=7)
    (want_dz,) = torch.autograd.grad(want, z_local)
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(dz, want_dz, rtol=1e-5, atol=1e-7)
