"""Builds contrastmask_ops._C: the C++ kernels always, the CUDA kernels wherever nvcc and a CUDA build
of torch exist (no GPU needed to compile).

Environment:
  CONTRASTMASK_CUDA=0/1   force the CUDA kernels off/on (default: auto)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default when no GPU is visible: "8.0;9.0+PTX")
  CUDA_HOME               the CUDA toolkit folder (the one whose include/ holds cuda_runtime.h)
  DEBUG=1                 -O0 -g
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def want_cuda():
    flag = os.environ.get("CONTRASTMASK_CUDA", "auto").lower()
    if flag in ("0", "false", "off"):
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "on") and not available:
        raise RuntimeError("CONTRASTMASK_CUDA=1 but nvcc (CUDA_HOME) or a CUDA build of torch is missing")
    return available


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/ops/*.cpp") + rel("csrc/cpu/*.cpp")
    # -fno-trapping-math: we never read FP exception flags, and it lets GCC turn the kernels' selects
    # (`b != 0 ? b * z : 0`) into vector blends. It changes no result (no reassociation, no FMA).
    cxx = opt + ["-fno-trapping-math"]
    link = []
    # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it silently runs serially.
    # The extension then shares torch's libgomp (same soname, already loaded), so torch.set_num_threads
    # governs our kernels too.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not want_cuda():
        return cpp_extension.CppExtension(
            "contrastmask_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
            py_limited_api=True,
        ), False
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "contrastmask_ops._C",
        sources + rel("csrc/cuda/*.cu"),
        define_macros=[("CONTRASTMASK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    ), True


def write_build_config(with_cuda):
    """Facts about this build for contrastmask_ops.build_info()."""
    config = {
        "cuda_kernels": with_cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "built_with_torch": torch.__version__,
        "built_with_cuda": torch.version.cuda if with_cuda else None,
    }
    with open(os.path.join(ROOT, "contrastmask_ops", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\nBUILD_CONFIG = %r\n" % (config,))


ext, with_cuda = extension()
write_build_config(with_cuda)

setup(
    name="contrastmask_ops",
    version="0.1.0",
    description="Fused CPU/CUDA operators for ContrastMask's query-sharing pixel-level contrastive loss",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["contrastmask_ops", "contrastmask_ops.*"]),
    ext_modules=[ext],
    install_requires=["torch", "numpy"],
    python_requires=">=3.9",
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
