"""SPEC edge cases and bad input, for the compiled operators and for the reference alike."""
import pytest
import torch

import contrastmask_ops as cm
from contrastmask_ops import reference as ref
from blobs import blob_batch

IMPLS = [pytest.param(ref, id="reference")]
if cm.build_info()["cpu"]:
    IMPLS.append(pytest.param(cm, id="kernels"))


def _loss_and_grad(impl, z, *args, **kw):
    z = z.clone().requires_grad_(True)
    loss = impl.query_sharing_contrastive_loss(z, *args, **kw)
    (g,) = torch.autograd.grad(loss, z)
    return loss, g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("share_queries", [True, False])
def test_empty_batch(impl, share_queries):
    z = torch.randn(0, 8, 28, 28)
    masks = torch.zeros(0, 28, 28, dtype=torch.bool)
    loss, g = _loss_and_grad(impl, z, masks, None, torch.zeros(0, dtype=torch.bool), share_queries=share_queries)
    assert loss.item() == 0.0 and g.shape == z.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_every_roi_dropped_gives_zero_loss_and_zero_grad(impl, formulation):
    b = blob_batch(6, 28, 28, 8, seed=0)
    loss, g = _loss_and_grad(impl, b["z"], b["masks"], b["cams"], b["is_novel"], min_keys=10**6,
                             formulation=formulation)
    assert loss.item() == 0.0
    assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_rois_are_dropped(impl):
    b = blob_batch(6, 28, 28, 8, seed=0)
    valid = torch.zeros(6, dtype=torch.bool)
    loss, stats = impl.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], valid=valid,
                                                      return_stats=True)
    assert loss.item() == 0.0 and int(stats.kept) == 0
    assert torch.equal(impl.partition(b["masks"], b["cams"], b["is_novel"], valid=valid),
                       torch.full((6, 28, 28), -1, dtype=torch.int8))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_foreground_mask_has_no_boundary(impl):
    masks = torch.ones(2, 13, 21, dtype=torch.bool)
    masks[1] = False
    d = impl.boundary_sqdist(masks)
    assert (d == 2**31 - 1).all()
    labels = impl.partition(masks, None, torch.zeros(2, dtype=torch.bool))
    keys, keep = impl.sample_keys(labels, d, torch.zeros(2, dtype=torch.bool), min_keys=0, seed=0)
    assert not keep.any() and keys.sum() == 0  # one partition is empty


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_norm_features_stay_finite(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    z = b["z"].clone()
    z[:, :, :10] = 0.0  # zero vectors among keys and queries' pixels
    z[2] = 0.0
    for formulation in ("paper", "released"):
        loss, g = _loss_and_grad(impl, z, b["masks"], b["cams"], b["is_novel"], formulation=formulation, seed=2)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
    loss, g = _loss_and_grad(impl, torch.zeros_like(z), b["masks"], b["cams"], b["is_novel"], seed=2)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_temperature_stays_finite(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    loss, g = _loss_and_grad(impl, b["z"], b["masks"], b["cams"], b["is_novel"], tau_easy=1e-3, tau_hard=1e-3)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_in_used_pixel_gives_nan_loss(impl):
    b = blob_batch(6, 28, 28, 8, seed=1)
    labels = impl.partition(b["masks"], b["cams"], b["is_novel"])
    n, y, x = [int(v) for v in (labels == 1).nonzero()[0]]
    z = b["z"].clone()
    z[n, 0, y, x] = float("nan")
    loss = impl.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], min_keys=0, seed=0)
    assert torch.isnan(loss)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_channel(impl):
    b = blob_batch(5, 13, 21, 1, seed=4)
    loss, g = _loss_and_grad(impl, b["z"], b["masks"], b["cams"], b["is_novel"], seed=1)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and loss.item() != 0.0


def _bad_calls(impl):
    b = blob_batch(4, 14, 14, 8, seed=0)
    z, masks, cams, novel = b["z"], b["masks"], b["cams"], b["is_novel"]
    novel = novel.clone()
    novel[0] = True
    loss = impl.query_sharing_contrastive_loss
    return [
        ("cams", lambda: loss(z, masks, None, novel)),
        ("masks", lambda: loss(z, masks.float() * 0.5, cams, novel)),
        ("masks", lambda: loss(z, masks[:, :, None], cams, novel)),
        ("cams", lambda: loss(z, masks, cams[:3], novel)),
        ("is_novel", lambda: loss(z, masks, cams, novel[:3])),
        ("is_novel", lambda: loss(z, masks, cams, novel.int())),
        ("valid", lambda: loss(z, masks, cams, novel, valid=torch.ones(5, dtype=torch.bool))),
        ("z", lambda: loss(z[:3], masks, cams, novel)),
        ("z", lambda: loss(z.int(), masks, cams, novel)),
        ("sigma", lambda: loss(z, masks, cams, novel, sigma=0.0)),
        ("sigma", lambda: loss(z, masks, cams, novel, sigma=1.5)),
        ("tau_easy", lambda: loss(z, masks, cams, novel, tau_easy=0.0)),
        ("tau_hard", lambda: loss(z, masks, cams, novel, tau_hard=-1.0)),
        ("delta", lambda: loss(z, masks, cams, novel, delta=0.7)),
        ("min_keys", lambda: loss(z, masks, cams, novel, min_keys=-1)),
        ("formulation", lambda: loss(z, masks, cams, novel, formulation="other")),
        ("masks", lambda: impl.boundary_sqdist(torch.zeros(2, 65, 64, dtype=torch.bool))),
        ("sqdist", lambda: impl.sample_keys(torch.zeros(2, 4, 4, dtype=torch.int8), torch.zeros(2, 4, 4),
                                            torch.zeros(2, dtype=torch.bool))),
        ("labels", lambda: impl.contrastive_loss_from_keys(z, torch.zeros(4, 14, 13, dtype=torch.int8),
                                                           torch.zeros(4, 14, 14, dtype=torch.uint8),
                                                           torch.ones(4, dtype=torch.bool))),
        ("keys", lambda: impl.contrastive_loss_from_keys(z, torch.zeros(4, 14, 14, dtype=torch.int8),
                                                         torch.zeros(4, 14, 14, dtype=torch.int64),
                                                         torch.ones(4, dtype=torch.bool))),
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_names_the_argument(impl):
    for name, call in _bad_calls(impl):
        with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
            call()
        assert name in str(info.value), (name, str(info.value))
