"""Dispatch on the tensors' device: a build without kernels for a device uses the reference (one warning), a build
with them calls them."""
import pytest
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from contrastmask_ops import reference as ref


class _NoKernels:
    def __getattr__(self, name):
        raise AssertionError(f"torch.ops.contrastmask.{name} was called for a device without kernels")


def test_no_kernels_for_the_device_uses_reference(monkeypatch):
    # Simulate a build without CPU kernels (as a CPU-only machine sees a build without CUDA kernels):
    # CPU tensors must go to the reference, with one warning, and backend() must say so too.
    from contrastmask_ops import _ext, functional

    from model.contrastmask.contrast_loss import backend

    monkeypatch.setattr(_ext, "KERNEL_DEVICE_TYPES", frozenset({"cuda", "meta"}))
    monkeypatch.setattr(_ext, "_warned", set())
    monkeypatch.setattr(functional, "_ops", _NoKernels(), raising=False)
    assert backend("cpu") == "reference" and not cm.build_info()["cpu"]
    b = blob_batch(6, 14, 14, 8, seed=3)
    args = (b["z"], b["masks"], b["cams"], b["is_novel"])
    with pytest.warns(RuntimeWarning, match="reference") as record:
        loss = cm.query_sharing_contrastive_loss(*args, seed=2)
        labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
        sqdist = cm.boundary_sqdist(b["masks"])
        keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], seed=2)
        from_keys = cm.contrastive_loss_from_keys(b["z"], labels, keys, keep)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1  # once per device type
    assert "cpu" in str(record[0].message)
    assert loss.item() == ref.query_sharing_contrastive_loss(*args, seed=2).item()
    assert from_keys.item() == ref.contrastive_loss_from_keys(b["z"], labels, keys, keep).item()


@pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")
def test_kernels_for_the_device_are_used(monkeypatch):
    from contrastmask_ops import functional

    from model.contrastmask.contrast_loss import backend

    calls = []

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(torch.ops.contrastmask, name)

    monkeypatch.setattr(functional, "_ops", Spy())
    b = blob_batch(4, 14, 14, 8, seed=3)
    cm.query_sharing_contrastive_loss(b["z"], b["masks"], b["cams"], b["is_novel"], seed=1)
    assert backend("cpu") == "compiled" and calls == ["roi_plan", "contrastive_loss"]


def test_both_paths_keep_one_public_signature():
    # functional.py (the kernels) and reference.py (the oracle) are deliberate twins at the API: a keyword
    # added to one and not the other would be accepted on one path only.
    import inspect

    from contrastmask_ops import functional, reference

    for name in ("partition", "boundary_sqdist", "sample_keys", "contrastive_loss_from_keys",
                 "query_sharing_contrastive_loss"):
        assert inspect.signature(getattr(functional, name)) == inspect.signature(getattr(reference, name)), name
