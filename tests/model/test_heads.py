"""Options of the heads that follow the authors' released code: projector BatchNorm, non-local
enhancement of Y (their enhance_op), the ImageNet weights the paper's configs name."""
import pytest
import torch

from model.contrastmask.backbone import imagenet_weights
from model.contrastmask.cl_head import CLHead, non_local_enhance


def test_enhance_is_a_cosine_softmax_mean():
    torch.manual_seed(0)
    y = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    out = non_local_enhance(y)
    flat = y.flatten(2)
    unit = flat / flat.norm(dim=1, keepdim=True)
    n, i = 1, 7  # one pixel by hand
    weights = torch.softmax(unit[n, :, i] @ unit[n], dim=0)
    assert torch.allclose(out.flatten(2)[n, :, i], flat[n] @ weights)
    const = torch.ones(2, 3, 4, 4) * torch.tensor([1.0, -2.0, 3.0])[None, :, None, None]
    assert torch.allclose(non_local_enhance(const), const)  # a constant map is a fixed point


def enhance_by_formula(y):
    """The authors' enhance_op (ilib/utils/sample_utils.py) as a formula, written out here on its own:
    out_i = sum_j softmax_j(<u_i, u_j>) y_j with u = y / max(|y|, 1e-12) over channels, softmax over j."""
    n, c, h, w = y.shape
    flat = y.reshape(n, c, h * w)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    logits = torch.einsum("nci,ncj->nij", unit, unit)
    weights = logits.exp() / logits.exp().sum(dim=2, keepdim=True)
    return torch.einsum("nij,ncj->nci", weights, flat).reshape(n, c, h, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_enhance_is_the_authors_enhance_op(dtype):
    torch.manual_seed(1)
    y = torch.relu(torch.randn(4, 8, 7, 5, dtype=dtype))  # post-ReLU, as the encoder's output is
    y[0, :, 2, 3] = 0  # a zero pixel: its cosines are 0 (eps), it still gets a mean of the others
    y[1] = 0  # a whole zero ROI stays zero
    y[2] *= 1e-13  # below the eps: cosines shrink towards 0, the weights towards uniform
    tol = dict(rtol=1e-12, atol=1e-300) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(non_local_enhance(y), enhance_by_formula(y), **tol)
    assert torch.count_nonzero(non_local_enhance(y)[1]) == 0


def test_cl_head_options():
    x = torch.randn(4, 8, 7, 7)
    plain = CLHead(8, 16, num_convs=2, num_fcs=3)
    bn = CLHead(8, 16, num_convs=2, num_fcs=3, projector_norm="bn", enhance=True)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in bn.projector) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.projector)
    y, z = bn(x)
    assert y.shape == z.shape == (4, 16, 7, 7)
    y_plain, _ = bn(x, project=False)
    assert torch.allclose(y, non_local_enhance(bn.encoder(x)))
    assert torch.allclose(y_plain, y)
    with pytest.raises(ValueError, match="cl_projector_norm"):
        CLHead(8, 16, projector_norm="gn")


def test_imagenet_means_torchvision_v1_weights():
    assert imagenet_weights("resnet50").name == "IMAGENET1K_V1"
    assert imagenet_weights("resnet18").name == "IMAGENET1K_V1"


def test_roi_align_pooler_matches_torchvision():
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from model.contrastmask.poolers import RoIAlignPooler

    torch.manual_seed(0)
    feats = OrderedDict((str(k), torch.randn(2, 3, 32 // 2**k, 40 // 2**k)) for k in range(4))
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 50.0], [10.0, 10.0, 20.0, 14.0], [0.0, 0.0, 120.0, 100.0]]),
             torch.tensor([[5.0, 6.0, 60.0, 70.0]])]
    shapes = [(128, 160), (128, 160)]
    names = list(feats)
    expected = MultiScaleRoIAlign(names, 7, 2)(feats, boxes, shapes)
    assert torch.equal(RoIAlignPooler(names, 7, 2)(feats, boxes, shapes), expected)
    aligned = RoIAlignPooler(names, 7, 2, aligned=True)(feats, boxes, shapes)
    assert aligned.shape == expected.shape and not torch.allclose(aligned, expected)
    single = OrderedDict([("0", feats["0"])])
    assert torch.equal(RoIAlignPooler(["0"], 5, 2)(single, boxes, shapes), MultiScaleRoIAlign(["0"], 5, 2)(single, boxes, shapes))


def test_cls_kernel_one_makes_cams_local():
    # box_cls_kernel=1 with no shared convs: the CAM at a position depends on that RoIAlign cell only.
    import torch

    from model.contrastmask.box_head import CamBoxHead

    torch.manual_seed(0)
    head = CamBoxHead(8, 16, 4, shared_convs=0, cls_convs=1, reg_convs=1, cls_kernel=1).eval()
    x = torch.randn(2, 8, 7, 7)
    _, _, cls_map = head(x)
    cams = head.cams(cls_map, torch.tensor([1, 2]))
    y = x.clone()
    y[:, :, 3, 3] += 5.0  # change one cell
    cams_y = head.cams(head(y)[2], torch.tensor([1, 2]))
    changed = (cams_y - cams).abs() > 0
    assert changed[:, 3, 3].all() and changed.sum() == 2
    wide = CamBoxHead(8, 16, 4, shared_convs=0, cls_convs=1, reg_convs=1, cls_kernel=3).eval()
    assert (wide.cams(wide(y)[2], torch.tensor([1, 2])) - wide.cams(wide(x)[2], torch.tensor([1, 2]))).abs().gt(0).sum() > 2
