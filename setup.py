"""Builds contrastmask_ops._C: the C++ kernels always, the CUDA kernels wherever a CUDA build of torch
and a usable CUDA toolkit exist (no GPU needed to compile).

The toolkit: torch's own guess of CUDA_HOME if it is usable, else the first usable one that
tools/find_cuda.py finds (the real folder behind a wrapper nvcc on PATH, CUDA_PATH,
/usr/local/cuda-<torch's version>, /usr/local/cuda, pip's nvidia wheels). None usable: the C++ kernels
only, with a warning that says what was missing and where it looked.

Environment:
  CONTRASTMASK_CUDA=0/1   0: C++ kernels only, no search; 1: no usable toolkit is an error (default: auto)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default when no GPU is visible: find_cuda.DEFAULT_CUDA_ARCHS)
  CUDA_HOME               the CUDA toolkit folder (the one whose include/ holds cuda_runtime.h)
  DEBUG=1                 -O0 -g
"""
import glob
import importlib.util
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_find_cuda():
    spec = importlib.util.spec_from_file_location("find_cuda", os.path.join(ROOT, "tools", "find_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["find_cuda"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


find_cuda = _load_find_cuda()


# pip runs this file several times (requirements, metadata, the build): say things once, in the build.
BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"))


def _say(text, warning=False):
    if not BUILDING:
        return
    if warning:
        bar = "=" * 100
        text = f"\n{bar}\nWARNING: {text}\n{bar}\n"
    print(text, file=sys.stderr, flush=True)


def cuda_toolkit():
    """(Toolkit or None, reason for build_info). Raises when CONTRASTMASK_CUDA=1 and none is usable."""
    flag = os.environ.get("CONTRASTMASK_CUDA", "auto").lower()
    if flag in ("0", "false", "off"):
        return None, "none: CONTRASTMASK_CUDA=0"
    required = flag in ("1", "true", "on")
    if torch.version.cuda is None:
        if required:
            raise RuntimeError(f"CONTRASTMASK_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return None, "none: torch is a CPU-only build"
    search = find_cuda.find_toolkit(torch.version.cuda, torch_home=cpp_extension.CUDA_HOME)
    toolkit = search.toolkit
    if toolkit is None:
        if required:
            raise RuntimeError("CONTRASTMASK_CUDA=1: " + search.message(error=True))
        _say(search.message(), warning=True)
        return None, search.reason
    _say(f"contrastmask_ops: CUDA toolkit: {search.reason}")
    # torch.utils.cpp_extension read CUDA_HOME when it was imported: point it (and nvcc) at this toolkit.
    cpp_extension.CUDA_HOME = toolkit.home
    os.environ["CUDA_HOME"] = toolkit.home
    return toolkit, search.reason


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
    toolkit, reason = cuda_toolkit()
    if toolkit is None:
        return cpp_extension.CppExtension(
            "contrastmask_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
            py_limited_api=True,
        ), None, reason
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", find_cuda.DEFAULT_CUDA_ARCHS)
    nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    ext = cpp_extension.CUDAExtension(
        "contrastmask_ops._C",
        sources + rel("csrc/cuda/*.cu"),
        define_macros=[("CONTRASTMASK_WITH_CUDA", None)],
        include_dirs=list(toolkit.include_dirs),
        library_dirs=list(toolkit.library_dirs),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )
    if toolkit.needs_cudart_path:
        # pip's nvidia wheels ship libcudart.so.N but no libcudart.so for -lcudart: link the file itself.
        ext.libraries.remove("cudart")
        ext.extra_link_args.append(toolkit.cudart)
    return ext, toolkit, reason


def write_build_config(toolkit, reason):
    """Facts about this build for contrastmask_ops.build_info()."""
    with_cuda = toolkit is not None
    config = {
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "built_with_torch": torch.__version__,
        "built_with_cuda": torch.version.cuda if with_cuda else None,
        "cuda_toolkit": toolkit.as_dict() if with_cuda else None,
        "cuda_toolkit_reason": reason,
    }
    with open(os.path.join(ROOT, "contrastmask_ops", "_build_config.py"), "w") as f:
        f.write("# Written by setup.py at build time.\nBUILD_CONFIG = %r\n" % (config,))


ext, toolkit, reason = extension()
write_build_config(toolkit, reason)

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
