"""The CMake build (CMakeLists.txt, for libtorch users) gives a library that registers the same ops.

The library is built with its C++ kernels only (CUDA is compiled by the pip build) and loaded into a
fresh interpreter with torch.ops.load_library, without the Python package; its fused plan and loss
must equal the package's.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import contrastmask_ops as cm
from blobs import blob_batch

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    # A CUDA build of libtorch needs the toolkit to configure (see CMakeLists.txt).
    pytest.mark.skipif(torch.version.cuda is not None and not (
        cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h"))),
        reason="CUDA build of torch without a CUDA toolkit (set CUDA_HOME, as the Makefile does)"),
    pytest.mark.slow,
]

CHILD = r"""
import sys
import torch
torch.ops.load_library(sys.argv[1])
inputs = torch.load(sys.argv[2])
labels, keys, keep = torch.ops.contrastmask.roi_plan(inputs["masks"], inputs["cams"], inputs["is_novel"], None,
                                                     0.1, 0.3, 2, 5, 1234)
loss = torch.ops.contrastmask.contrastive_loss(inputs["z"], labels, keys, keep, 0.7, 0.3, True, "paper")[0]
torch.save({"labels": labels, "keys": keys, "keep": keep, "loss": loss}, sys.argv[3])
"""


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_cmake_library_registers_the_same_ops(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CUDA_HOME=cpp_extension.CUDA_HOME or "")
    _run(["cmake", "-S", REPO, "-B", build, "-DCONTRASTMASK_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], env=env)
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 1)])
    library = build / "libcontrastmask_ops.so"
    assert library.exists()

    b = blob_batch(9, 28, 28, 4, seed=3)
    torch.save(b, tmp_path / "inputs.pt")
    # A fresh interpreter that never imports contrastmask_ops.
    _run([sys.executable, "-c", CHILD, library, tmp_path / "inputs.pt", tmp_path / "out.pt"])
    got = torch.load(tmp_path / "out.pt")

    labels, keys, keep = torch.ops.contrastmask.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 5,
                                                         1234)
    assert keep.any()
    assert torch.equal(got["labels"], labels) and torch.equal(got["keys"], keys) and torch.equal(got["keep"], keep)
    expected = cm.contrastive_loss_from_keys(b["z"], labels, keys, keep)
    torch.testing.assert_close(got["loss"], expected, rtol=1e-5, atol=0)
