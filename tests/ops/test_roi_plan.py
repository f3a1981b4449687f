"""roi_plan (the fused plan) and the three steps it fuses, on every device (devices.py): against the reference
on cpu, against the CPU kernels on cuda-emu and cuda, for mask and CAM dtypes, roi_offset, seeds given as
tensors, unchecked plans; and the CPU fused plan's row-bitmask path (W <= 64: a dilation of the boundary rows
and a bucket select instead of the exact EDT and nth_element) against the separate steps and the reference
for every hard_sqdist (negative, zero, small, beyond any distance in the grid, beyond int32) and at the width
limits (W = 1, 64 and 65, where the generic path takes over). Integer outputs must be identical."""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import CPU_OPS, INT32_MAX, baseline_plan, needs_kernels, plan_kwargs, plan_steps, random_valid
from contrastmask_ops import reference as ref

# (n, (h, w), seed): typical ROIs, odd shapes, the H * W = 4096 limit in both orientations, one pixel, empty
# batches; the seed also picks the sampler's parameters (cases.plan_kwargs) and the valid flags.
PLAN_CASES = [
    (1, (28, 28), 0),
    (7, (13, 21), 1),
    (64, (28, 28), 2),
    (5, (64, 64), 3),
    (3, (1, 4096), 4),
    (3, (4096, 1), 5),
    (4, (1, 1), 6),
    (0, (28, 28), 0),
    (0, (14, 14), 1),
    (0, (13, 21), 2),
    (1, (14, 14), 1),
    (1, (13, 21), 2),
    (7, (14, 14), 0),
    (7, (28, 28), 2),
    (64, (14, 14), 1),
    (64, (13, 21), 0),
]


@needs_kernels
@pytest.mark.parametrize("n,hw,seed", PLAN_CASES)
def test_plan_matches_the_baseline(device, n, hw, seed):
    b = blob_batch(n, hw[0], hw[1], 1, seed=seed)
    valid = random_valid(n, seed)
    kw = plan_kwargs(seed)
    d = device.batch(b)
    got = list(plan_steps(cm.partition, cm.boundary_sqdist, cm.sample_keys, d, device.to(valid), kw, seed))
    got += device.ops.roi_plan(d["masks"], d["cams"], d["is_novel"], device.to(valid), 0.1, kw["sigma"],
                               kw["hard_sqdist"], kw["min_keys"], seed)
    labels, sqdist, keys, keep = baseline_plan(device, b, valid, kw, seed)
    assert got[0].dtype == torch.int8 and got[1].dtype == torch.int32
    want = [labels, sqdist, keys, keep, labels, keys, keep]
    for name, g, w in zip(["labels", "sqdist", "keys", "keep", "fused labels", "fused keys", "fused keep"], got, want):
        assert g.device.type == device.torch_device.type, name
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), name


@needs_kernels
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16,
                                        torch.float64])
@pytest.mark.parametrize("cam_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_plan_dtypes(device, mask_dtype, cam_dtype):
    b = blob_batch(16, 13, 21, 1, seed=3)
    masks, cams = b["masks"].to(mask_dtype), b["cams"].to(cam_dtype)
    cams[0, 0, :4] = torch.tensor([0.9, 0.1, 0.5, 1.0]).to(cam_dtype)  # values on the thresholds
    novel = b["is_novel"].clone()
    novel[0] = True
    for delta in (0.1, 0.25, 0.5):
        got = device.ops.roi_plan(device.to(masks), device.to(cams), device.to(novel), None, delta, 0.3, 2, 0, 11)
        if device.kind == "cpu":
            labels = ref.partition(masks, cams, novel, delta=delta)
            keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(masks), novel, sigma=0.3, min_keys=0, seed=11)
            want = (labels, keys, keep)
        else:
            want = CPU_OPS.roi_plan(masks, cams, novel, None, delta, 0.3, 2, 0, 11)
        for g, w in zip(got, want):
            assert torch.equal(g.cpu(), w), delta
        labels = cm.partition(device.to(masks), device.to(cams), device.to(novel), delta=delta)
        assert torch.equal(labels.cpu(), want[0]), delta
    want_sqdist = ref.boundary_sqdist(masks) if device.kind == "cpu" else CPU_OPS.boundary_sqdist(masks)
    assert torch.equal(cm.boundary_sqdist(device.to(masks)).cpu(), want_sqdist)


@needs_kernels
@pytest.mark.parametrize("hw", [(28, 28), (9, 70)])  # CPU roi_plan: row bitmasks (W <= 64) and generic (W > 64)
def test_roi_offset_samples_as_the_whole_batch(device, hw):
    """Rows [a:b] sampled with roi_offset=a get rows [a:b] of the whole batch's keys and keep (how a batch
    split across processes samples as one process would), through roi_plan and sample_keys alike."""
    n, seed = 13, 6
    b = device.batch(blob_batch(n, hw[0], hw[1], 1, seed=seed))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    whole = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed)
    whole_keys, whole_keep = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed)
    assert whole_keep.sum() >= n // 2
    for a, e in [(0, 5), (5, 5), (5, 13), (12, 13)]:
        rows = slice(a, e)
        _, keys, keep = device.ops.roi_plan(masks[rows], cams[rows], novel[rows], None, 0.1, 0.3, 2, 1, seed, a)
        assert torch.equal(keys, whole[1][rows]) and torch.equal(keep, whole[2][rows]), (a, e)
        keys, keep = cm.sample_keys(labels[rows], sqdist[rows], novel[rows], min_keys=1, seed=seed, roi_offset=a)
        assert torch.equal(keys, whole_keys[rows]) and torch.equal(keep, whole_keep[rows]), (a, e)
        # the offset as a tensor (the global loss's no-sync path): on the masks' device the kernel reads it
        for where in {device.torch_device, torch.device("cpu")}:
            offset = torch.tensor(a, device=where)
            seed_t = torch.tensor(seed, device=device.torch_device)
            _, keys, keep = device.ops.roi_plan.offset_tensor(masks[rows], cams[rows], novel[rows], None, 0.1, 0.3,
                                                              2, 1, seed_t, offset)
            assert torch.equal(keys, whole[1][rows]) and torch.equal(keep, whole[2][rows]), (a, e, where)
    # the offset is what makes them equal: without it, the slice samples other pixels
    _, keys, _ = device.ops.roi_plan(masks[5:], cams[5:], novel[5:], None, 0.1, 0.3, 2, 1, seed)
    assert not torch.equal(keys, whole[1][5:])
    with pytest.raises(ValueError, match="roi_offset"):
        device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed, -1)
    with pytest.raises(ValueError, match="roi_offset"):
        device.ops.roi_plan.offset_tensor(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(seed),
                                          torch.tensor([0]))


# (an integer seed, the int64 tensor with its 64 bits): SPEC takes the seed mod 2^64.
SEED_FORMS = [(0, 0), (6, 6), (2**63 - 1, 2**63 - 1), (2**63 + 17, 2**63 + 17 - 2**64), (-1, -1)]


@needs_kernels
@pytest.mark.parametrize("hw", [(28, 28), (9, 70)])  # CPU roi_plan: row bitmasks (W <= 64) and generic (W > 64)
@pytest.mark.parametrize("seed,bits", SEED_FORMS)
def test_tensor_seed_samples_as_the_integer_seed(device, hw, seed, bits):
    """A 0-dim int64 seed tensor, on the CPU or on the tensors' device, samples what the integer does: through
    roi_plan, sample_keys and the whole pipeline, and the reference's sampler too."""
    n = 13
    b = device.batch(blob_batch(n, hw[0], hw[1], 4, seed=4))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    want_plan = device.ops.roi_plan.int_seed(masks, cams, novel, None, 0.1, 0.3, 2, 1, bits, 3)  # raw ops: int64
    want_keys = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed)
    assert want_plan[2].sum() >= n // 2
    want_loss, want_stats = cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, min_keys=1, seed=seed,
                                                              return_stats=True)
    for seed_tensor in (torch.tensor(bits), device.to(torch.tensor(bits))):
        plan = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, seed_tensor, 3)
        assert all(torch.equal(got, want) for got, want in zip(plan, want_plan))
        keys = cm.sample_keys(labels, sqdist, novel, min_keys=1, seed=seed_tensor)
        assert all(torch.equal(got, want) for got, want in zip(keys, want_keys))
        loss, stats = cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, min_keys=1, seed=seed_tensor,
                                                        return_stats=True)
        assert torch.equal(loss, want_loss) and torch.equal(stats.keys_per_set, want_stats.keys_per_set)
    if device.kind == "cpu":  # the reference takes both forms too, and samples the kernels' keys
        got = ref.sample_keys(labels, sqdist, novel, min_keys=1, seed=torch.tensor(bits))
        assert all(torch.equal(g, w) for g, w in zip(got, want_keys))
    # the seed matters: another one samples other keys
    other = device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(bits ^ 1), 3)
    assert not torch.equal(other[1], want_plan[1])


@needs_kernels
def test_bad_seed_tensors_are_refused_naming_seed(device):
    b = device.batch(blob_batch(3, 9, 11, 4, seed=1))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels, sqdist = cm.partition(masks, cams, novel), cm.boundary_sqdist(masks)
    wrong_shape_or_dtype = [device.to(torch.tensor([5])), device.to(torch.tensor(5, dtype=torch.int32)),
                            device.to(torch.tensor(5.0))]
    for bad in wrong_shape_or_dtype + [torch.tensor(5, device="meta")]:  # meta: neither the CPU nor the device
        with pytest.raises(ValueError, match="^seed"):
            cm.sample_keys(labels, sqdist, novel, seed=bad)
        with pytest.raises(ValueError, match="^seed"):
            cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=bad)
    for bad in wrong_shape_or_dtype:  # the kernels' own checks
        with pytest.raises(ValueError, match="^seed"):
            device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, bad)
        with pytest.raises(ValueError, match="^seed"):
            device.ops.sample_keys(labels, sqdist, novel, 0.3, 2, 1, bad)


@needs_kernels
@pytest.mark.parametrize("width", [60, 100])  # the row-bitmask path (W <= 64) and the per-ROI loop
def test_unchecked_plan_drops_only_the_bad_roi(device, width):
    # check_inputs=False: a non-binary mask drops its own ROI (keep False), not the others of its thread's chunk
    m = torch.zeros(6, 20, width)
    m[:, 5:15, 10:40] = 1
    m[0, 0, 0] = 0.5
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            keep = device.ops.roi_plan(device.to(m), None, device.to(torch.zeros(6, dtype=torch.bool)), None, 0.1,
                                       0.3, 2, 1, device.to(torch.tensor(3)), 0, False)[2]
            assert keep.tolist() == [False] + [True] * 5, n_threads
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the CPU row-bitmask path


GRIDS = [(28, 28), (1, 64), (64, 1), (5, 64), (64, 64), (3, 65), (40, 70), (2, 2), (13, 21)]


HARD_SQDISTS = [-1, 0, 1, 2, 3, 8, 50, 10**6, INT32_MAX, 2**40]


def _steps(b, valid, seed, **kw):
    """The three separate CPU ops: partition, exact boundary_sqdist, sample_keys."""
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"], valid=valid)
    sqdist = cm.boundary_sqdist(b["masks"])
    keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], seed=seed, **kw)
    return labels, keys, keep


def _fused(b, valid, seed, sigma, hard_sqdist, min_keys):
    return torch.ops.contrastmask.roi_plan(b["masks"], b["cams"], b["is_novel"], valid, 0.1, sigma, hard_sqdist,
                                           min_keys, seed)


def _assert_same(fused, steps):
    for name, got, want in zip(("labels", "keys", "keep"), fused, steps):
        assert torch.equal(got, want), f"{name} differ"


@needs_kernels
@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("hard_sqdist", HARD_SQDISTS)
def test_fused_plan_equals_steps(hw, hard_sqdist):
    b = blob_batch(12, hw[0], hw[1], 1, seed=hw[0] * 100 + hw[1])
    valid = torch.arange(12) % 5 != 3
    kw = dict(sigma=0.3, hard_sqdist=hard_sqdist, min_keys=1)
    fused = _fused(b, valid, 7, **kw)
    _assert_same(fused, _steps(b, valid, 7, **kw))
    assert fused[2].any(), "the case should keep some ROI, or it tests nothing"


@needs_kernels
@pytest.mark.parametrize("seed", range(6))
def test_fused_plan_equals_reference_across_seeds(seed):
    sigma = [0.3, 0.05, 0.55, 1.0, 0.999, 0.5][seed]
    hw = GRIDS[seed % len(GRIDS)]
    b = blob_batch(20, hw[0], hw[1], 1, seed=seed)
    kw = dict(sigma=sigma, hard_sqdist=[2, 5, 0, 2, 18, 1][seed], min_keys=[5, 0, 1, 3, 0, 2][seed])
    labels = ref.partition(b["masks"], b["cams"], b["is_novel"])
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(b["masks"]), b["is_novel"], seed=seed * 7919, **kw)
    _assert_same(_fused(b, None, seed * 7919, **kw), (labels, keys, keep))


@needs_kernels
@pytest.mark.parametrize("fill", [0, 1])
@pytest.mark.parametrize("hard_sqdist", [2, INT32_MAX - 1, INT32_MAX])
def test_masks_without_boundary(fill, hard_sqdist):
    """All-background / all-foreground base masks: d^2 = INT32_MAX everywhere (hard iff hard_sqdist >= it)."""
    n, h, w = 4, 9, 11
    masks = torch.full((n, h, w), bool(fill))
    cams = torch.rand(n, h, w, generator=torch.Generator().manual_seed(0))
    is_novel = torch.tensor([False, False, True, False])
    b = dict(masks=masks, cams=cams, is_novel=is_novel)
    kw = dict(sigma=0.5, hard_sqdist=hard_sqdist, min_keys=0)
    fused = _fused(b, None, 3, **kw)
    _assert_same(fused, _steps(b, None, 3, **kw))
    # Base ROIs have one empty partition, so none is kept.
    assert not fused[2][~is_novel].any()


@needs_kernels
def test_hard_band_is_a_disk_around_the_boundary():
    """A single foreground pixel: its boundary is the pixel and its 4 neighbours; the band for
    hard_sqdist = 2 is their 3x3 dilation (a 5x5 square minus its corners), counted by hand."""
    masks = torch.zeros(1, 9, 9, dtype=torch.bool)
    masks[0, 4, 4] = True
    sqdist = cm.boundary_sqdist(masks)[0]
    band = sqdist <= 2
    expected = torch.zeros(9, 9, dtype=torch.bool)
    expected[2:7, 2:7] = True
    for y, x in [(2, 2), (2, 6), (6, 2), (6, 6)]:
        expected[y, x] = False
    assert torch.equal(band, expected)
    # The fused plan's sets agree: with sigma = 1 every candidate is a key, so the key bits are the sets.
    labels, keys, keep = torch.ops.contrastmask.roi_plan(masks, None, torch.tensor([False]), None, 0.1, 1.0, 2, 0, 0)
    assert keep.item()
    hard = (keys[0] & 0b1010) != 0  # hard-fg or hard-bg
    assert torch.equal(hard, expected)
