"""Finds a CUDA toolkit that can build the extension's CUDA kernels against a given torch.

setup.py and CMakeLists.txt use it (CMake through the command line below), the tests call
find_toolkit() on fake toolkit layouts. Plain Python, no torch import: the caller says which CUDA
version torch was built with.

A folder is a usable toolkit when it has include/cuda_runtime.h, the cudart library (lib64/ or lib/,
or targets/<arch>/ of either) and an nvcc whose CUDA major version equals torch's. The folders tried,
in order: CUDA_HOME / CUDA_PATH as torch reads them (torch's own guess, which falls back to the
grandparent folder of the nvcc on PATH, then /usr/local/cuda), the real folder behind the nvcc on
PATH (symbolic links followed; a wrapper script is asked where its nvcc lives), CUDA_PATH, the
standard folders (/usr/local/cuda-<torch's X.Y>, /usr/local/cuda-<X>, /usr/local/cuda) and the
headers and libraries of pip's NVIDIA wheels in site-packages (nvidia/cu<X>/ for CUDA 13 on,
nvidia/cuda_nvcc + nvidia/cuda_runtime before).

    python tools/find_cuda.py --torch-cuda 13.0 [--torch-guess DIR] [--site-packages DIR ...] [--cmake]

prints the toolkit found and why (or the message saying what is missing); exit status 0 when one was
found, 1 when none is usable.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

# GPU architectures built when no GPU is visible (TORCH_CUDA_ARCH_LIST's default; CMakeLists.txt reads
# this line). Real code for every architecture torch 2.14's CUDA 13.0 build ships kernels for, where
# users have those GPUs: 7.5 (T4), 8.0 (A100; 8.6 and 8.9 GPUs — A10, RTX 30/40, L4, L40 — run 8.0
# code), 9.0 (H100/H200), 10.0 (B200/GB200; 10.3 runs it), 12.0 (RTX 50, RTX PRO 6000; 12.1 runs it),
# plus PTX of the newest for later GPUs.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"

STANDARD_PREFIXES = ("/usr/local",)
NVCC_TIMEOUT_S = 60


@dataclass
class Toolkit:
    home: str                      # the folder used as CUDA_HOME
    nvcc: str                      # the real nvcc
    version: str                   # nvcc's "release X.Y"
    found_by: str                  # "torch" or "search"
    where: str                     # how this folder came up: "CUDA_HOME", "nvcc on PATH (...)", ...
    include_dirs: list = field(default_factory=list)   # extra include folders (beyond home/include)
    library_dirs: list = field(default_factory=list)   # extra library folders (beyond home/lib64 or lib)
    cudart: str = ""               # the cudart library file that was found

    @property
    def needs_cudart_path(self) -> bool:
        """True when there is no plain libcudart.so to link with -lcudart (pip wheels ship libcudart.so.N only)."""
        return not os.path.basename(self.cudart) == "libcudart.so"

    def as_dict(self) -> dict:
        return {"home": self.home, "nvcc": self.nvcc, "version": self.version, "found_by": self.found_by,
                "where": self.where, "include_dirs": list(self.include_dirs),
                "library_dirs": list(self.library_dirs), "cudart": self.cudart}


@dataclass
class Search:
    torch_cuda: Optional[str]
    toolkit: Optional[Toolkit] = None
    tried: list = field(default_factory=list)   # [(folder, where, problem)]
    notes: list = field(default_factory=list)   # e.g. "torch's guess /usr/local is not usable: ..."

    @property
    def reason(self) -> str:
        """One line for build_info(): which toolkit and why, or why none."""
        if self.toolkit is not None:
            t = self.toolkit
            how = ("found by torch" if t.found_by == "torch" else "found by the search") + f" ({t.where})"
            text = f"CUDA {t.version} at {t.home}, {how}"
            return text + ("; " + "; ".join(self.notes) if self.notes else "")
        if self.torch_cuda is None:
            return "none: torch is a CPU-only build"
        return "none: no usable CUDA toolkit (" + "; ".join(f"{d}: {p}" for d, _, p in self.tried) + ")"

    def message(self, cmake: bool = False, error: bool = False) -> str:
        """The warning (or error) when none is usable: what was missing, where it looked, what to do.
        cmake: worded for CMakeLists.txt instead of setup.py; error: for CONTRASTMASK_CUDA=1."""
        lines = [f"contrastmask_ops: no usable CUDA toolkit for torch's CUDA {self.torch_cuda}"
                 + ("." if cmake or error else "; building the C++ kernels only (no CUDA kernels)."),
                 "A usable toolkit has include/cuda_runtime.h, the cudart library (lib64/ or lib/) and bin/nvcc "
                 f"of CUDA {major(self.torch_cuda)}.x. Looked in:"]
        for folder, where, problem in self.tried:
            lines.append(f"  {folder}  [{where}]: {problem}")
        if not self.tried:
            lines.append("  (no candidate folder exists)")
        if cmake:
            lines.append(f"Install CUDA {self.torch_cuda} (or any {major(self.torch_cuda)}.x) and point CUDA_HOME "
                         "at it "
                         f"(or pass -DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda-{self.torch_cuda}).")
        else:
            lines.append(f"Install CUDA {self.torch_cuda} (or any {major(self.torch_cuda)}.x) and point CUDA_HOME "
                         "at it, "
                         f"e.g. `CUDA_HOME=/usr/local/cuda-{self.torch_cuda} pip install --no-build-isolation .`; "
                         "CONTRASTMASK_CUDA=0 builds the C++ kernels without looking, CONTRASTMASK_CUDA=1 makes "
                         "a missing toolkit an error.")
        return "\n".join(lines)


def major(version: Optional[str]) -> Optional[int]:
    if not version:
        return None
    m = re.match(r"\s*(\d+)", str(version))
    return int(m.group(1)) if m else None


def _run(cmd: Sequence[str]) -> Optional[str]:
    """stdout + stderr of a command, or None if it could not run."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=NVCC_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or "") + (done.stderr or "")


Runner = Callable[[Sequence[str]], Optional[str]]


def nvcc_version(nvcc: str, run: Runner = _run) -> Optional[str]:
    out = run([nvcc, "--version"])
    m = re.search(r"release (\d+\.\d+)", out or "")
    return m.group(1) if m else None


def _is_exe(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _first(patterns: Sequence[str]) -> Optional[str]:
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _find_header(roots: Sequence[str]) -> Optional[str]:
    return _first([os.path.join(r, "include", "cuda_runtime.h") for r in roots]
                  + [os.path.join(r, "targets", "*", "include", "cuda_runtime.h") for r in roots])


def _find_cudart(roots: Sequence[str]) -> Optional[str]:
    """libcudart.so if there is one (what -lcudart links), else a versioned libcudart.so.N."""
    dirs = []
    for r in roots:
        dirs += [os.path.join(r, "lib64"), os.path.join(r, "lib")]
        dirs += sorted(glob.glob(os.path.join(r, "targets", "*", "lib")))
    for name in ("libcudart.so", "libcudart.so.[0-9]*"):
        hit = _first([os.path.join(d, name) for d in dirs])
        if hit:
            return hit
    return None


def check(home: str, torch_cuda: str, *, where: str, found_by: str = "search", nvcc: Optional[str] = None,
          runtime_home: Optional[str] = None, run: Runner = _run) -> tuple[Optional[Toolkit], str]:
    """(Toolkit, "") if `home` is usable for torch's CUDA version, else (None, what is wrong).

    runtime_home: another folder holding the headers and cudart (the pip wheels before CUDA 13 put nvcc
    and the runtime in different folders)."""
    if not os.path.isdir(home):
        return None, "does not exist"
    roots = [home] + ([runtime_home] if runtime_home else [])
    problems = []
    header = _find_header(roots)
    if header is None:
        problems.append("no include/cuda_runtime.h")
    cudart = _find_cudart(roots)
    if cudart is None:
        problems.append("no cudart library (libcudart.so) in lib64/ or lib/")
    nvcc = nvcc or os.path.join(home, "bin", "nvcc")
    version = None
    if not _is_exe(nvcc):
        problems.append("no bin/nvcc")
    else:
        version = nvcc_version(nvcc, run)
        if version is None:
            problems.append(f"{nvcc} --version does not say its CUDA release")
        elif major(version) != major(torch_cuda):
            problems.append(f"nvcc is CUDA {version}, torch is built with CUDA {torch_cuda} (majors differ)")
    if problems:
        return None, ", ".join(problems)
    include_dirs, library_dirs = [], []
    header_dir = os.path.dirname(header)
    if header_dir != os.path.join(home, "include"):
        include_dirs.append(header_dir)
    cudart_dir = os.path.dirname(cudart)
    if cudart_dir not in (os.path.join(home, "lib64"), os.path.join(home, "lib")):
        library_dirs.append(cudart_dir)
    return Toolkit(home=home, nvcc=nvcc, version=version, found_by=found_by, where=where,
                   include_dirs=include_dirs, library_dirs=library_dirs, cudart=cudart), ""


def nvcc_real_homes(nvcc_on_path: str, run: Runner = _run) -> list[tuple[str, str]]:
    """Toolkit folders behind an nvcc found on PATH: [(folder, how)]. Symbolic links are followed; a
    wrapper is asked with --dryrun, where nvcc prints its own folder (_HERE_=...), and a small wrapper
    script is read for the absolute path of the nvcc it runs."""
    homes = []
    real = os.path.realpath(nvcc_on_path)
    if real != nvcc_on_path:
        homes.append((os.path.dirname(os.path.dirname(real)), f"nvcc on PATH: {nvcc_on_path} -> {real}"))
    with tempfile.TemporaryDirectory() as tmp:  # --dryrun compiles nothing, it only prints the steps
        out = run([nvcc_on_path, "--dryrun", "-c", os.path.join(tmp, "probe.cu"), "-o", os.path.join(tmp, "probe.o")])
    m = re.search(r"^#\$ _HERE_=(.+?)\s*$", out or "", re.M)
    if m:
        homes.append((os.path.dirname(os.path.normpath(m.group(1))),
                      f"nvcc on PATH: {nvcc_on_path} runs nvcc in {m.group(1)}"))
    try:
        if os.path.getsize(real) < 64 * 1024:
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            if text.startswith("#!"):
                for target in re.findall(r"(/[^\s'\"`;|&<>()]*/bin/nvcc)\b", text):
                    if os.path.realpath(target) != real:
                        homes.append((os.path.dirname(os.path.dirname(os.path.realpath(target))),
                                      f"nvcc on PATH: the wrapper script {nvcc_on_path} runs {target}"))
    except OSError:
        pass
    return homes


def wheel_candidates(site_dirs: Sequence[str], torch_cuda: str) -> list[dict]:
    """The pip NVIDIA wheels' folders: nvidia/cu<X>/ (bin, include, lib: CUDA 13 on) and, before that,
    nvidia/cuda_nvcc/ (bin/nvcc) with nvidia/cuda_runtime/ (include, lib)."""
    out = []
    for site in site_dirs:
        root = os.path.join(site, "nvidia")
        if not os.path.isdir(root):
            continue
        cu = os.path.join(root, f"cu{major(torch_cuda)}")
        if os.path.isdir(cu):
            out.append({"home": cu, "where": "pip's nvidia wheels"})
        nvcc_home, runtime = os.path.join(root, "cuda_nvcc"), os.path.join(root, "cuda_runtime")
        if os.path.isdir(nvcc_home) or os.path.isdir(runtime):
            out.append({"home": nvcc_home, "runtime_home": runtime, "where": "pip's nvidia wheels"})
    return out


def default_site_dirs() -> list[str]:
    import site
    import sysconfig
    dirs = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # old virtualenv
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    return [d for i, d in enumerate(dirs) if d and d not in dirs[:i]]


def torch_guess(environ: Mapping[str, str], last_resort: Optional[str] = "/usr/local/cuda") -> Optional[str]:
    """torch.utils.cpp_extension's guess of CUDA_HOME, without importing torch (same rule as torch 2.x)."""
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc:
        return os.path.dirname(os.path.dirname(nvcc))
    return last_resort if last_resort and os.path.exists(last_resort) else None


def find_toolkit(torch_cuda: Optional[str], *, torch_home: Optional[str] = None,
                 environ: Optional[Mapping[str, str]] = None, prefixes: Sequence[str] = STANDARD_PREFIXES,
                 site_dirs: Optional[Sequence[str]] = None, run: Runner = _run) -> Search:
    """Search for a usable toolkit for a torch built with CUDA `torch_cuda` ("13.0"; None: CPU torch).

    torch_home: torch's own guess (torch.utils.cpp_extension.CUDA_HOME); computed from `environ` the way
    torch does when None; "" for no guess."""
    environ = os.environ if environ is None else environ
    search = Search(torch_cuda=torch_cuda)
    if torch_cuda is None:
        return search
    site_dirs = default_site_dirs() if site_dirs is None else site_dirs
    if torch_home is None:
        torch_home = torch_guess(environ)
    seen = set()

    def attempt(home, where, found_by="search", **kw):
        key = (os.path.realpath(home), kw.get("runtime_home"))
        if key in seen:
            return None
        seen.add(key)
        toolkit, problem = check(home, torch_cuda, where=where, found_by=found_by, run=run, **kw)
        if toolkit is None:
            search.tried.append((home, where, problem))
            return None
        search.toolkit = toolkit
        return toolkit

    if torch_home:
        set_by = ("CUDA_HOME" if environ.get("CUDA_HOME") else "CUDA_PATH" if environ.get("CUDA_PATH")
                  else "torch's guess from nvcc on PATH or /usr/local/cuda")
        if attempt(torch_home, set_by, found_by="torch"):
            return search
        if search.tried:
            search.notes.append(f"torch's CUDA_HOME {torch_home} ({set_by}) is not usable: {search.tried[-1][2]}")

    candidates = []
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc:
        candidates += [(home, how, {}) for home, how in nvcc_real_homes(nvcc, run)]
        if not any(home for home, _, _ in candidates):
            search.tried.append((nvcc, "nvcc on PATH", "no toolkit folder found behind it"))
    if environ.get("CUDA_PATH"):
        candidates.append((environ["CUDA_PATH"], "CUDA_PATH", {}))
    for prefix in prefixes:
        names = [f"cuda-{torch_cuda}", f"cuda-{major(torch_cuda)}", "cuda"]
        candidates += [(os.path.join(prefix, n), "standard folder", {}) for n in names]
    candidates += [(c["home"], c["where"], {"runtime_home": c.get("runtime_home")})
                   for c in wheel_candidates(site_dirs, torch_cuda)]

    for home, where, kw in candidates:
        if not os.path.isdir(home) and where == "standard folder":
            search.tried.append((home, where, "does not exist"))
            seen.add((os.path.realpath(home), None))
            continue
        if attempt(home, where, **kw):
            return search
    return search


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torch-cuda", help="torch's CUDA version (default: ask the torch importable here)")
    p.add_argument("--torch-guess", help="torch's CUDA_HOME guess (default: torch's rule)")
    p.add_argument("--site-packages", nargs="*", help="where to look for pip's nvidia wheels (default: this Python's)")
    p.add_argument("--cmake", action="store_true",
                   help="print 'CUDA_HOME=<dir>' or 'CUDA_HOME=' on the first line, the reason or message after")
    p.add_argument("--archs", action="store_true", help="print the default TORCH_CUDA_ARCH_LIST and exit")
    args = p.parse_args(argv)
    if args.archs:
        print(DEFAULT_CUDA_ARCHS)
        return 0
    torch_cuda = args.torch_cuda
    if torch_cuda is None:
        import torch
        torch_cuda = torch.version.cuda
    search = find_toolkit(torch_cuda, torch_home=args.torch_guess, site_dirs=args.site_packages)
    t = search.toolkit
    if args.cmake:
        print("CUDA_HOME=" + (t.home if t else ""))
        print("CUDA_EXTRA_INCLUDE_DIRS=" + (";".join(t.include_dirs) if t else ""))
        print("CUDA_EXTRA_LIBRARY_DIRS=" + (";".join(t.library_dirs) if t else ""))
        print("CUDA_NVCC=" + (t.nvcc if t else ""))
    print(search.reason if t or torch_cuda is None else search.message(cmake=args.cmake))
    return 0 if t else 1


if __name__ == "__main__":
    sys.exit(main())
