"""partition: the reference's labels (base, novel, invalid; thresholds in the CAM's dtype; NaN CAMs), the same
rules on both paths (the reference and the kernels), and device checks. Every device runs it with the plan
(test_roi_plan.py: dtypes of masks and CAMs, values on the thresholds)."""
import math
import pytest
import torch

from blobs import blob_batch
from cases import CPU_OPS, IMPLS, needs_kernels
from contrastmask_ops import reference as ref
from devices import has_gpu


def test_base_novel_and_invalid_rois():
    masks = torch.tensor([[[0, 1, 1]], [[1, 1, 0]], [[1, 0, 1]]], dtype=torch.uint8)
    cams = torch.tensor([[[0.95, 0.05, 0.5]], [[0.95, 0.05, 0.5]], [[0.0, 1.0, 0.5]]])
    is_novel = torch.tensor([False, True, False])
    got = ref.partition(masks, cams, is_novel)
    assert got.dtype == torch.int8
    assert got.tolist() == [[[0, 1, 1]], [[1, 0, -1]], [[1, 0, 1]]]
    valid = torch.tensor([True, False, True])
    got = ref.partition(masks, cams, is_novel, valid=valid)
    assert got.tolist() == [[[0, 1, 1]], [[-1, -1, -1]], [[1, 0, 1]]]
    # cams may be None when no ROI is novel; float masks work
    got = ref.partition(masks.float(), None, torch.zeros(3, dtype=torch.bool))
    assert got.tolist() == [[[0, 1, 1]], [[1, 1, 0]], [[1, 0, 1]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("delta", [0.1, 0.25, 0.3])
def test_thresholds_in_the_cam_dtype(dtype, delta):
    hi = torch.tensor(1 - delta, dtype=dtype)
    lo = torch.tensor(delta, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    values = torch.stack([hi, torch.nextafter(hi, -inf), lo, torch.nextafter(lo, inf),
                          torch.tensor(0.5, dtype=dtype), torch.tensor(0.0, dtype=dtype),
                          torch.tensor(1.0, dtype=dtype)]).view(1, 1, -1)
    got = ref.partition(torch.zeros(values.shape, dtype=torch.bool), values, torch.ones(1, dtype=torch.bool),
                        delta=delta)
    assert got.flatten().tolist() == [1, -1, 0, -1, -1, 0, 1]


def test_delta_edges():
    cams = torch.tensor([[[0.0, 0.5, 1.0, 0.25]]])
    novel = torch.ones(1, dtype=torch.bool)
    masks = torch.zeros(1, 1, 4)
    assert ref.partition(masks, cams, novel, delta=0.5).flatten().tolist() == [0, 1, 1, 0]  # fg tested first
    assert ref.partition(masks, cams, novel, delta=0.0).flatten().tolist() == [0, -1, 1, -1]


def test_reference_nan_cam_rules():
    masks = torch.tensor([[[1, 0]], [[1, 0]]], dtype=torch.bool)
    cams = torch.tensor([[[math.nan, 0.0]], [[math.nan, math.nan]]])
    with pytest.raises(ValueError, match="^cams: expected no NaN in the CAM of a novel ROI, got NaN in ROI 0$"):
        ref.partition(masks, cams, torch.tensor([True, False]))
    got = ref.partition(masks, cams, torch.tensor([True, False]), check_inputs=False)
    assert got.tolist() == [[[-1, 0]], [[1, 0]]]
    got = ref.partition(masks, cams, torch.tensor([False, False]))  # base ROIs' CAMs are never read
    assert got.tolist() == [[[1, 0]], [[1, 0]]]


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_rois_are_dropped(impl):
    b = blob_batch(6, 28, 28, 8, seed=0)
    valid = torch.zeros(6, dtype=torch.bool)
    loss, stats = impl.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], valid=valid,
                                                      return_stats=True)
    assert loss.item() == 0.0 and int(stats.kept) == 0
    assert torch.equal(impl.partition(b["masks"], b["cams"], b["is_novel"], valid=valid),
                       torch.full((6, 28, 28), -1, dtype=torch.int8))


def _novel_and_base_rows():
    """A batch of 4 ROIs whose ROI 1 is novel and ROI 2 base: the batch, its novel flags and a copy of its CAMs."""
    b = blob_batch(4, 14, 14, 8, seed=0)
    novel = b["is_novel"].clone()
    novel[1], novel[2] = True, False
    return b, novel, b["cams"].clone()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_a_novel_cam_is_an_error(impl):
    b, novel, cams = _novel_and_base_rows()
    cams[1, 5, 6] = float("nan")
    want = "cams: expected no NaN in the CAM of a novel ROI, got NaN in ROI 1"
    for call in (lambda **kw: impl.query_sharing_contrastive_loss(b["z"], b["masks"], cams, novel, seed=0, **kw),
                 lambda **kw: impl.partition(b["masks"], cams, novel, **kw)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == want
        call(check_inputs=False)  # unchecked: the NaN pixel is ignored (label -1)
    # a base ROI's CAM is never read: a NaN there is no error
    cams = b["cams"].clone()
    cams[2] = float("nan")
    assert torch.isfinite(impl.query_sharing_contrastive_loss(b["z"], b["masks"], cams, novel, seed=0))
    # bad masks are reported before the CAMs, on both paths
    cams[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="^masks: expected values 0 or 1 only$"):
        impl.partition(b["masks"].float() * 0.5, cams, novel)


@pytest.mark.parametrize("impl", IMPLS)
def test_cams_outside_0_1_are_thresholded(impl):
    b, novel, cams = _novel_and_base_rows()
    cams[1, :7], cams[1, 7:] = 1.5, -0.5
    cams[1, 0, 0], cams[1, 13, 13] = float("inf"), -float("inf")
    labels = impl.partition(b["masks"], cams, novel)
    assert (labels[1, :7] == 1).all() and (labels[1, 7:] == 0).all()


@needs_kernels
@pytest.mark.cuda
@pytest.mark.skipif(not has_gpu(), reason="needs a GPU")
def test_mixed_devices_are_rejected():
    b = blob_batch(2, 13, 21, 4, seed=1)
    with pytest.raises(ValueError, match="is_novel"):
        CPU_OPS.partition(b["masks"].cuda(), b["cams"].cuda(), b["is_novel"], None, 0.1)
