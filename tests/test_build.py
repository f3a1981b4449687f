"""The extension is built and says what it holds. `make test` sets CONTRASTMASK_REQUIRE_EXTENSION=1
(and _CUDA=1 where nvcc exists), so CI fails if the C++ or CUDA part silently did not build."""
import os
import warnings

import pytest
import torch

import contrastmask_ops as cm


def test_extension_built_when_required():
    info = cm.build_info()
    if os.environ.get("CONTRASTMASK_REQUIRE_EXTENSION") == "1":
        assert info["extension"], info["extension_error"]
        assert info["cpu"]
    if os.environ.get("CONTRASTMASK_REQUIRE_CUDA") == "1":
        assert info["cuda"], "CUDA kernels were not compiled although nvcc was found"
        assert info["cuda_arch_list"]


def test_build_info_reports_versions():
    info = cm.build_info()
    assert info["torch"] == torch.__version__
    if info["extension"]:
        assert info["built_with_torch"] is not None
        # The binary must run with the torch it was compiled against.
        assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]


@pytest.mark.skipif(not cm.build_info()["extension"], reason="extension not built")
def test_no_fallback_warning_when_built():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.boundary_sqdist(masks)
