"""Bad input, for every op: one validation for both paths (the reference and the kernels, contrastmask_ops._validation):
the same verdict and the same argument named first in the message, numbers printed in full; the raw
operators' own checks on every device (devices.py), which stays usable after them; check_inputs=False."""
import math
import numpy as np
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import CPU_OPS, IMPLS, cpu_loss_inputs, needs_kernels, reference_plan
from contrastmask_ops import reference as ref


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


def _bad_cases():
    batch = blob_batch(3, 6, 7, 4, seed=0)
    z, masks, cams, nov = batch["z"], batch["masks"], batch["cams"], batch["is_novel"]
    nov = torch.tensor([True, False, False])
    labels = ref.partition(masks, cams, nov)
    sq = ref.boundary_sqdist(masks)
    keys, keep = ref.sample_keys(labels, sq, nov, seed=0)
    pipe = ref.query_sharing_contrastive_loss
    loss = ref.contrastive_loss_from_keys
    return [
        ("masks", lambda: ref.partition(masks.float() * 2, cams, nov)),
        ("masks", lambda: ref.partition(masks[0], cams, nov)),
        ("masks", lambda: ref.partition(masks.int(), cams, nov)),
        ("masks", lambda: ref.boundary_sqdist(torch.zeros(2, 65, 64, dtype=torch.bool))),
        ("masks", lambda: ref.boundary_sqdist(torch.full((1, 2, 2), math.nan))),
        ("cams", lambda: ref.partition(masks, None, nov)),
        ("cams", lambda: ref.partition(masks, cams[:, :5], nov)),
        ("cams", lambda: ref.partition(masks, (cams * 10).long(), nov)),
        ("is_novel", lambda: ref.partition(masks, cams, nov[:2])),
        ("is_novel", lambda: ref.partition(masks, cams, nov.int())),
        ("valid", lambda: ref.partition(masks, cams, nov, valid=torch.ones(4, dtype=torch.bool))),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=0.6)),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=-0.1)),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=math.nan)),
        ("labels", lambda: ref.sample_keys(labels.long(), sq, nov)),
        ("sqdist", lambda: ref.sample_keys(labels, sq[:, :, :3], nov)),
        ("sqdist", lambda: ref.sample_keys(labels, sq.long(), nov)),
        ("is_novel", lambda: ref.sample_keys(labels, sq, nov[:1])),
        ("sigma", lambda: ref.sample_keys(labels, sq, nov, sigma=0.0)),
        ("sigma", lambda: ref.sample_keys(labels, sq, nov, sigma=1.5)),
        ("min_keys", lambda: ref.sample_keys(labels, sq, nov, min_keys=-1)),
        ("seed", lambda: ref.sample_keys(labels, sq, nov, seed=1.5)),
        ("hard_sqdist", lambda: ref.sample_keys(labels, sq, nov, hard_sqdist=2.5)),
        ("z", lambda: loss(z[:2], labels, keys, keep)),
        ("z", lambda: loss(z[:, :, :5], labels, keys, keep)),
        ("z", lambda: loss(z.long(), labels, keys, keep)),
        ("z", lambda: loss(z[0], labels, keys, keep)),
        ("keys", lambda: loss(z, labels, keys.to(torch.int8), keep)),
        ("keys", lambda: loss(z, labels, keys[:, :5], keep)),
        ("keep", lambda: loss(z, labels, keys, keep[:2])),
        ("labels", lambda: loss(z, labels.float(), keys, keep)),
        ("tau_easy", lambda: loss(z, labels, keys, keep, tau_easy=0.0)),
        ("tau_hard", lambda: loss(z, labels, keys, keep, tau_hard=-1.0)),
        ("formulation", lambda: loss(z, labels, keys, keep, formulation="official")),
        ("z", lambda: pipe(z[:, :, :, :6], masks, cams, nov)),
        ("z", lambda: pipe(z[1:], masks, cams, nov)),
        ("cams", lambda: pipe(z, masks, None, nov)),
        ("sigma", lambda: pipe(z, masks, cams, nov, sigma=-0.3)),
        ("tau_easy", lambda: pipe(z, masks, cams, nov, tau_easy=0)),
        ("formulation", lambda: pipe(z, masks, cams, nov, formulation="Paper")),
        ("min_keys", lambda: pipe(z, masks, cams, nov, min_keys=-2)),
        ("masks", lambda: pipe(z, masks.float() * 0.5, cams, nov)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_reference_names_the_bad_argument(index):
    name, call = _bad_cases()[index]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value)


BAD_PARAMETERS = [
    # (keyword arguments, exception, argument named)
    (dict(seed=3.7), TypeError, "seed"),
    (dict(seed=float("nan")), TypeError, "seed"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(hard_sqdist=2.5), TypeError, "hard_sqdist"),
    (dict(min_keys=5.0), TypeError, "min_keys"),
    (dict(share_queries="no"), TypeError, "share_queries"),
    (dict(share_queries=1), TypeError, "share_queries"),
    (dict(tau_easy=float("inf")), ValueError, "tau_easy"),
    (dict(tau_hard=float("nan")), ValueError, "tau_hard"),
    (dict(tau_hard="0.3"), TypeError, "tau_hard"),
    (dict(delta=None), TypeError, "delta"),
    (dict(delta=float("nan")), ValueError, "delta"),
    (dict(sigma=float("nan")), ValueError, "sigma"),
    (dict(sigma=1.0000001), ValueError, "sigma"),
    (dict(formulation=None), ValueError, "formulation"),
    # bools are not numbers (float(True) is 1.0), nor is 1 a bool
    (dict(sigma=True), TypeError, "sigma"),
    (dict(sigma=np.bool_(True)), TypeError, "sigma"),
    (dict(delta=False), TypeError, "delta"),
    (dict(tau_easy=True), TypeError, "tau_easy"),
    (dict(tau_hard=np.bool_(True)), TypeError, "tau_hard"),
    (dict(return_stats="yes"), TypeError, "return_stats"),
    (dict(return_stats=1), TypeError, "return_stats"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kwargs,error,name", BAD_PARAMETERS, ids=[str(c[0]) for c in BAD_PARAMETERS])
def test_bad_parameters_are_rejected_alike(impl, kwargs, error, name):
    b = blob_batch(4, 14, 14, 8, seed=0)
    with pytest.raises(error) as info:
        impl.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], **kwargs)
    assert str(info.value).startswith(name + " "), str(info.value)


def _bad_values(impl):
    """Calls whose tensors have the right metadata and bad values, the checks the kernels make themselves."""
    b = blob_batch(4, 14, 14, 8, seed=0)
    novel = b["is_novel"].clone()
    novel[0] = True
    half = b["masks"].float() * 0.5
    return [
        lambda: impl.query_sharing_contrastive_loss(b["z"], half, b["cams"], novel, seed=0),
        lambda: impl.query_sharing_contrastive_loss(b["z"], b["masks"], None, novel, seed=0),
        lambda: impl.partition(half, b["cams"], novel),
        lambda: impl.partition(b["masks"], None, novel),
        lambda: impl.boundary_sqdist(half),
    ]


def test_value_errors_read_alike_on_both_paths():
    messages = {}
    for impl in [p.values[0] for p in IMPLS]:
        for i, call in enumerate(_bad_values(impl)):
            with pytest.raises(ValueError) as info:
                call()
            messages.setdefault(i, set()).add(str(info.value))
    assert [m for _, m in sorted(messages.items())] == [
        {"masks: expected values 0 or 1 only"}, {"cams: required when some ROI is novel (is_novel has a True entry)"},
        {"masks: expected values 0 or 1 only"}, {"cams: required when some ROI is novel (is_novel has a True entry)"},
        {"masks: expected values 0 or 1 only"}]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_parameters_of_the_building_blocks(impl):
    b = blob_batch(4, 14, 14, 8, seed=0)
    labels, sqdist = reference_plan(b)
    keys, keep = ref.sample_keys(labels, sqdist, b["is_novel"], seed=0)
    calls = [
        (TypeError, "seed", lambda: impl.sample_keys(labels, sqdist, b["is_novel"], seed=3.7)),
        (TypeError, "hard_sqdist", lambda: impl.sample_keys(labels, sqdist, b["is_novel"], hard_sqdist=2.5)),
        (ValueError, "roi_offset", lambda: impl.sample_keys(labels, sqdist, b["is_novel"], roi_offset=-1)),
        (TypeError, "roi_offset", lambda: impl.sample_keys(labels, sqdist, b["is_novel"], roi_offset=1.0)),
        (TypeError, "process_group", lambda: impl.query_sharing_contrastive_loss(
            b["z"], b["masks"], b["cams"], b["is_novel"], process_group="world")),
        (TypeError, "share_queries", lambda: impl.contrastive_loss_from_keys(b["z"], labels, keys, keep,
                                                                             share_queries="no")),
        (ValueError, "tau_hard", lambda: impl.contrastive_loss_from_keys(b["z"], labels, keys, keep,
                                                                         tau_hard=float("inf"))),
        (TypeError, "delta", lambda: impl.partition(b["masks"], b["cams"], b["is_novel"], delta=None)),
    ]
    for error, name, call in calls:
        with pytest.raises(error) as info:
            call()
        assert str(info.value).startswith(name + " "), str(info.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_integers_are_accepted_and_clamped(impl):
    # hard_sqdist: any integer; 2**63 (over int64) selects the same sets as INT32_MAX. min_keys: any
    # integer >= 0; 2**70 drops every ROI.
    b = blob_batch(6, 14, 14, 8, seed=2)
    args = (b["z"], b["masks"], b["cams"], b["is_novel"])
    huge = impl.query_sharing_contrastive_loss(*args, hard_sqdist=2**63, seed=4)
    clamped = impl.query_sharing_contrastive_loss(*args, hard_sqdist=2**31 - 1, seed=4)
    assert torch.isfinite(huge) and huge.item() == clamped.item()
    want = ref.query_sharing_contrastive_loss(*args, hard_sqdist=2**63, seed=4)
    torch.testing.assert_close(huge, want, rtol=1e-5, atol=1e-7)
    assert impl.query_sharing_contrastive_loss(*args, hard_sqdist=-2**70, seed=4).item() == \
        impl.query_sharing_contrastive_loss(*args, hard_sqdist=-1, seed=4).item()
    assert impl.query_sharing_contrastive_loss(*args, min_keys=2**70, seed=4).item() == 0.0
    # the seed is taken mod 2**64, numpy integers included
    assert impl.query_sharing_contrastive_loss(*args, seed=2**64 + 5).item() == \
        impl.query_sharing_contrastive_loss(*args, seed=np.uint64(5)).item()


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_blame_z_when_z_does_not_match(impl):
    b = blob_batch(4, 14, 14, 8, seed=0)
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    labels = ref.partition(masks, cams, novel)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(masks), novel, seed=0)
    for bad_z in (b["z"][:3], b["z"][:, :, :13], b["z"][:, :, :, 1:]):
        with pytest.raises(ValueError) as info:
            impl.query_sharing_contrastive_loss(bad_z, masks, cams, novel)
        assert str(info.value).startswith("z "), str(info.value)
        with pytest.raises(ValueError) as info:
            impl.contrastive_loss_from_keys(bad_z, labels, keys, keep)
        assert str(info.value).startswith("z "), str(info.value)


@pytest.mark.parametrize("impl", IMPLS)
def test_lists_and_arrays_get_a_short_error(impl):
    b = blob_batch(8, 28, 28, 8, seed=0)
    tensors = dict(z=b["z"], masks=b["masks"], cams=b["cams"], is_novel=b["is_novel"])
    for name in tensors:
        for convert in (lambda t: t.tolist(), lambda t: t.numpy()):
            args = dict(tensors, **{name: convert(tensors[name])})
            with pytest.raises(TypeError) as info:
                impl.query_sharing_contrastive_loss(args["z"], args["masks"], args["cams"], args["is_novel"])
            message = str(info.value)
            assert message.startswith(name + " ") and len(message) < 200, message
    for param in ("sigma", "delta", "tau_easy", "seed", "min_keys", "formulation", "share_queries"):
        for value in (np.arange(10000.0), list(range(10000))):
            with pytest.raises((TypeError, ValueError)) as info:
                impl.query_sharing_contrastive_loss(*tensors.values(), **{param: value})
            message = str(info.value)
            assert message.startswith(param + " ") and len(message) < 200, message


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_print_numbers_in_full(impl):
    b = blob_batch(4, 14, 14, 8, seed=0)
    for kwargs, shown in ((dict(sigma=1.0000001), "1.0000001"), (dict(delta=0.5000000001), "0.5000000001"),
                          (dict(tau_easy=-1e-300), "-1e-300")):
        with pytest.raises(ValueError) as info:
            impl.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], **kwargs)
        assert shown in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs,name", [(dict(sigma=2.0), "sigma"), (dict(delta=0.7), "delta"),
                                         (dict(tau_easy=0.0), "tau_easy"), (dict(tau_hard=float("inf")), "tau_hard"),
                                         (dict(hard_sqdist=2.5), "hard_sqdist"), (dict(min_keys=-1), "min_keys"),
                                         (dict(share_queries="no"), "share_queries"),
                                         (dict(formulation="official"), "formulation"),
                                         (dict(sigma=True), "sigma")])
def test_module_checks_parameters_when_built(kwargs, name):
    with pytest.raises((TypeError, ValueError)) as info:
        cm.QuerySharingContrastiveLoss(**kwargs)
    assert str(info.value).startswith(name + " "), str(info.value)
    cm.QuerySharingContrastiveLoss(hard_sqdist=2**63, min_keys=2**70, share_queries=np.bool_(False))


# ---------------------------------------------------------------- the raw operators, on every device


@needs_kernels
@pytest.mark.parametrize("tau", [1e-39, 9.999999e-05, -1.0])
def test_raw_ops_refuse_too_small_temperatures(device, tau):
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(3, (8, 8), 4, torch.float32, 1))
    with pytest.raises(ValueError, match=r"^tau_easy: expected a temperature >= 1e-04, got " + repr(tau)):
        device.ops.contrastive_loss(z, labels, keys, keep, tau, 0.3, True, "paper")


@needs_kernels
def test_raw_ops_print_numbers_and_blame_z(device):
    z, labels, keys, keep = (device.to(t) for t in cpu_loss_inputs(3, (8, 8), 4, torch.float32, 1))
    with pytest.raises(ValueError, match=r"^tau_hard: .*got -0\.30000001"):
        device.ops.contrastive_loss(z, labels, keys, keep, 0.7, -0.30000001, True, "paper")
    with pytest.raises(ValueError, match="^z: expected N, H, W of the plan"):
        device.ops.contrastive_loss(z[:, :, :, :7], labels, keys, keep, 0.7, 0.3, True, "paper")
    masks = device.to(torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^sigma: expected a value in \(0, 1\], got 1\.0000001"):
        device.ops.roi_plan(masks, None, device.to(torch.zeros(2, dtype=torch.bool)), None, 0.1, 1.0000001, 2, 5, 0)


@needs_kernels
def test_bad_values_raise_and_device_stays_usable(device):
    b = device.batch(blob_batch(4, 13, 21, 4, seed=1))
    masks = b["masks"].to(torch.float32)
    masks[2, 3, 4] = 0.5
    with pytest.raises(ValueError, match="masks"):
        cm.boundary_sqdist(masks)
    with pytest.raises(ValueError, match="masks"):
        cm.query_sharing_contrastive_loss(b["z"], masks, b["cams"], b["is_novel"])
    novel = device.to(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cams"):
        cm.partition(b["masks"], None, novel)
    with pytest.raises(ValueError, match="cams"):
        cm.query_sharing_contrastive_loss(b["z"], b["masks"], None, novel)
    # No device assert fired: the device still runs kernels and the good input still works.
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
    want = CPU_OPS.partition(b["masks"].cpu(), b["cams"].cpu(), b["is_novel"].cpu(), None, 0.1)
    assert torch.equal(labels.cpu(), want)
    if device.kind == "cuda":
        torch.cuda.synchronize()


@needs_kernels
def test_unchecked_inputs_skip_the_value_checks(device):
    """check_inputs=False (CUDA-graph capture: no read-back of the error word) gives the same results for valid
    input, and a bad mask or missing CAMs do not raise (their results are unspecified)."""
    b = device.batch(blob_batch(6, 13, 21, 4, seed=1))
    masks, cams, novel = b["masks"], b["cams"], b["is_novel"]
    checked = (cm.partition(masks, cams, novel), cm.boundary_sqdist(masks),
               device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(5)),
               cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=5, return_stats=True))
    unchecked = (cm.partition(masks, cams, novel, check_inputs=False), cm.boundary_sqdist(masks, check_inputs=False),
                 device.ops.roi_plan(masks, cams, novel, None, 0.1, 0.3, 2, 1, torch.tensor(5), 0, False),
                 cm.query_sharing_contrastive_loss(b["z"], masks, cams, novel, seed=5, return_stats=True,
                                                   check_inputs=False))
    def flat(results):  # the tensors of nested tuples (LossStats included), in order
        return [t for r in results for t in (flat(r) if isinstance(r, tuple) else (r,))]

    assert len(flat(checked)) == 10  # labels, sqdist, the plan (3), the loss and its LossStats (5)
    assert all(torch.equal(got, want) for got, want in zip(flat(unchecked), flat(checked)))
    bad_masks = masks.to(torch.float32)
    bad_masks[2, 3, 4] = 0.5
    all_novel = device.to(torch.ones(6, dtype=torch.bool))
    bad_calls = [
        lambda check: cm.boundary_sqdist(bad_masks, check_inputs=check),
        lambda check: cm.partition(bad_masks, cams, novel, check_inputs=check),
        lambda check: cm.partition(masks, None, all_novel, check_inputs=check),
        lambda check: cm.query_sharing_contrastive_loss(b["z"], bad_masks, cams, novel, seed=5, check_inputs=check),
        lambda check: cm.query_sharing_contrastive_loss(b["z"], masks, None, all_novel, seed=5, check_inputs=check),
    ]
    if device.kind == "cpu":  # the reference skips its value checks too
        bad_calls += [
            lambda check: ref.partition(bad_masks, cams, novel, check_inputs=check),
            lambda check: ref.boundary_sqdist(bad_masks, check_inputs=check),
            lambda check: ref.query_sharing_contrastive_loss(b["z"], masks, None, all_novel, seed=5,
                                                             check_inputs=check),
        ]
    for call in bad_calls:
        with pytest.raises(ValueError, match="^(masks|cams)"):
            call(True)
        call(False)
    with pytest.raises(TypeError, match="^check_inputs"):
        cm.partition(masks, cams, novel, check_inputs="no")
    if device.kind == "cuda":
        torch.cuda.synchronize()
