"""The CMake build (CMakeLists.txt, for libtorch users) gives a library that registers the same ops, and
a C++ program trains with the loss through the C++ API (csrc/include/contrastmask_ops.h) alone.

The library is built with its C++ kernels only (CUDA is compiled by the pip build) and loaded into a
fresh interpreter with torch.ops.load_library, without the Python package; its fused plan and loss
must equal the package's. tests/toolchain/cpp/train_projector runs a few steps of a 1x1-conv projector with the
library's C++ autograd; its losses and gradients must equal the package's.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import contrastmask_ops as cm
import find_cuda  # tools/find_cuda.py (pytest pythonpath)
from blobs import blob_batch



pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    # A CUDA build of libtorch needs a toolkit to configure; CMakeLists.txt finds it with tools/find_cuda.py.
    pytest.mark.skipif(torch.version.cuda is not None and find_cuda.find_toolkit(torch.version.cuda).toolkit is None,
                       reason="CUDA build of torch and no usable CUDA toolkit (see tools/find_cuda.py)"),
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
    return proc


def test_cmake_library_registers_the_same_ops(repo, tmp_path):
    build = tmp_path / "build"
    # No CUDA_HOME: CMakeLists.txt finds the toolkit a CUDA libtorch needs by itself (tools/find_cuda.py).
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    configured = _run(["cmake", "-S", repo, "-B", build, "-DCONTRASTMASK_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release",
                       "-DCONTRASTMASK_BUILD_TESTS=ON",
                       f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], env=env)
    # The default arch list is setup.py's, read from tools/find_cuda.py.
    assert f"contrastmask_ops: TORCH_CUDA_ARCH_LIST={find_cuda.DEFAULT_CUDA_ARCHS}" in configured.stdout
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

    _check_cpp_training(build / "train_projector", tmp_path)


def _check_cpp_training(program, tmp_path, steps=3, lr=0.5):
    """The C++ program's losses and weight gradients, step by step, against the same steps in Python."""
    b = blob_batch(6, 14, 21, 4, seed=5, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    inputs = {"features": torch.randn(6, 5, 14, 21, generator=generator, dtype=torch.float64),
              "weight": torch.randn(8, 5, 1, 1, generator=generator, dtype=torch.float64),
              "masks": b["masks"], "cams": b["cams"], "is_novel": b["is_novel"], "steps": steps, "lr": lr}
    torch.save(inputs, tmp_path / "train_inputs.pt")
    _run([program, tmp_path / "train_inputs.pt", tmp_path / "train_out.pt"])
    got = torch.load(tmp_path / "train_out.pt", weights_only=False)  # torch::pickle_save of our own program

    weight = inputs["weight"].clone().requires_grad_(True)
    for step in range(steps):
        z = torch.nn.functional.conv2d(inputs["features"], weight)
        loss = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=step)
        (grad,) = torch.autograd.grad(loss, weight)
        assert grad.abs().max() > 0  # the projector really learns from the loss
        torch.testing.assert_close(got["losses"][step], loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(got["grads"][step], grad, rtol=1e-10, atol=1e-14)
        with torch.no_grad():
            weight -= lr * grad
    torch.testing.assert_close(got["weight"], weight.detach(), rtol=1e-10, atol=1e-14)
