"""The extension is built and says what it holds. `make test` sets CONTRASTMASK_REQUIRE_EXTENSION=1
(and _CUDA=1 where nvcc exists), so CI fails if the C++ or CUDA part silently did not build."""
import glob
import os
import re
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


def declared_operators(repo):
    """Every operator (overload included) declared by an m.def in csrc/ops/*.cpp, or with its .int_seed
    overload by def_with_int_seed (csrc/ops/library.h)."""
    names = set()
    for path in glob.glob(str(repo / "csrc" / "ops" / "*.cpp")):
        with open(path) as f:
            text = f.read()
        names |= set(re.findall(r'm\.def\(\s*"([\w.]+)\(', text))
        for name in re.findall(r'def_with_int_seed<[^>]*>\(\s*m,\s*"([\w.]+)\(', text):
            names |= {name, name + ".int_seed"}
    return names


def test_readme_lists_every_operator(repo):
    ops = declared_operators(repo)
    assert {"partition", "roi_plan.int_seed", "contrastive_loss_backward"} <= ops
    with open(repo / "README.md") as f:
        paragraph = f.read().split("The compiled operators behind these functions", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(?:torch\.ops\.contrastmask\.)?([\w.]+)`", paragraph)) - {"torch.compile"}
    assert listed == ops
    if cm.build_info()["extension"]:
        for name in ops:
            op, _, overload = name.partition(".")
            getattr(getattr(torch.ops.contrastmask, op), overload or "default")
