"""The CUDA emulation build (tests only): csrc/cuda/*.cu compiled a second time by the host C++ compiler
against the emulator runtime (tests/emulator/csrc/cuda_emulation.h), into a library that registers the same schemas as
torch.ops.contrastmask under torch.ops.contrastmask_emu, for CPU tensors. Every CUDA thread runs as
a fiber of its block (see docs/DESIGN.md, "CUDA emulation").

Built with torch.utils.cpp_extension.load into build/cuda-emu/ (never installed by pip); `make test`
builds it first (`python tests/emulator/cuda_emu.py`), and the tests load it. `python tests/emulator/cuda_emu.py --asan`
builds the AddressSanitizer variant into build/cuda-emu-asan/ (`make test-emu-asan`; libasan must be
preloaded into the process).

Environment: CONTRASTMASK_EMU_ASAN=1 makes load() use the ASan variant (the process must preload
libasan, see the Makefile); CONTRASTMASK_EMU_SEED sets the random fiber order's seed (default 0).
"""
import argparse
import glob
import os

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The emulator's C++ (runtime, operator library, kernel translation units, test kernels). It is on the
# include path with csrc/, so csrc/cuda/platform.cuh includes "cuda_emulation.h" by name.
EMU_CSRC = os.path.join(HERE, "csrc")
INCLUDE_PATHS = [os.path.join(ROOT, "csrc"), EMU_CSRC]
ORDERS = {"fwd": 0, "rev": 1, "rand": 2}  # forward, reverse and seeded random fiber orders
NAMESPACE = "contrastmask_emu"


def sources():
    src = [os.path.join(EMU_CSRC, f) for f in
           ("cuda_emulation.cpp", "emu_library.cpp", "emu_plan_kernels.cpp", "emu_loss_kernels.cpp")]
    # The schemas, declared once in csrc/ops (library.cpp is the real package's module stub).
    src += sorted(p for p in glob.glob(os.path.join(ROOT, "csrc", "ops", "*.cpp"))
                  if os.path.basename(p) != "library.cpp")
    src.append(os.path.join(EMU_CSRC, "emulator_kernels.cpp"))
    return src


def asan_requested() -> bool:
    return os.environ.get("CONTRASTMASK_EMU_ASAN", "0") == "1"


def build(asan: bool = False, verbose: bool = False) -> str:
    """Compiles (when a source changed) and loads the emulation library; returns its path."""
    name = "contrastmask_emu_asan" if asan else "contrastmask_emu"
    build_dir = os.path.join(ROOT, "build", "cuda-emu-asan" if asan else "cuda-emu")
    os.makedirs(build_dir, exist_ok=True)
    cflags = ["-O2", "-DCONTRASTMASK_CUDA_EMULATION", "-DCONTRASTMASK_LIBRARY=" + NAMESPACE,
              "-Wno-unknown-pragmas"]
    ldflags = []
    if asan:
        cflags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]
        ldflags += ["-fsanitize=address"]
    return cpp_extension.load(
        name=name,
        sources=sources(),
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        extra_include_paths=INCLUDE_PATHS,
        build_directory=build_dir,
        with_cuda=False,
        is_python_module=False,
        verbose=verbose,
    )


_loaded = set()


def load_namespace(namespace: str, build_library):
    """torch.ops.<namespace>, once build_library() has built and loaded its library, with the package's fake
    kernels and autocast registered for it (the first call per namespace builds and registers)."""
    if namespace not in _loaded:
        from contrastmask_ops import _autocast, fake_kernels  # needs the package's compiled extension

        build_library()
        fake_kernels.register(namespace)
        _autocast.register(namespace)
        _loaded.add(namespace)
    return getattr(torch.ops, namespace)


def load():
    """torch.ops.contrastmask_emu, with the package's fake kernels and autocast registered for it."""
    return load_namespace(NAMESPACE, lambda: build(asan=asan_requested()))


def env_seed() -> int:
    return int(os.environ.get("CONTRASTMASK_EMU_SEED", "0"))


def set_order(order: str, seed: int = None):
    """Fiber order of the following launches: "fwd", "rev" or "rand" (seeded; CONTRASTMASK_EMU_SEED
    by default)."""
    torch.ops.contrastmask_emulator.set_schedule(ORDERS[order], env_seed() if seed is None else seed)


def stats() -> dict:
    launches, blocks, threads, switches, order, attribute_sets = torch.ops.contrastmask_emulator.stats()
    return dict(launches=launches, blocks=blocks, threads=threads, switches=switches, order=order,
                attribute_sets=attribute_sets)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asan", action="store_true",
                        help="build the AddressSanitizer variant (run with libasan preloaded, see the Makefile)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print("CUDA emulation library:", build(asan=args.asan, verbose=args.verbose))
