"""The CUDA toolkit search of tools/find_cuda.py (used by setup.py and CMakeLists.txt), on fake toolkit
layouts in temporary folders: fake nvcc scripts answer --version and --dryrun, no compiler runs."""
import os
import stat
from pathlib import Path

import pytest
import torch



import find_cuda as fc  # tools/find_cuda.py (pytest pythonpath)


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_nvcc(path: Path, release: str, dryrun: bool = True) -> Path:
    """An nvcc that prints its CUDA release for --version and, like the real one, its folder for --dryrun."""
    here = 'echo "#\\$ _HERE_=$(dirname "$0")"' if dryrun else "exit 1"
    version = f'echo "Cuda compilation tools, release {release}, V{release}.1"'
    return _script(path, f'case "$1" in\n  --version) {version};;\n'
                         f'  --dryrun) {here};;\nesac\n')


def fake_toolkit(home: Path, release: str = "13.0", header=True, cudart="lib64/libcudart.so", nvcc=True,
                 dryrun=True) -> Path:
    if header:
        (home / "include").mkdir(parents=True, exist_ok=True)
        (home / "include" / "cuda_runtime.h").write_text("// fake\n")
    if cudart:
        (home / cudart).parent.mkdir(parents=True, exist_ok=True)
        (home / cudart).write_text("")
    if nvcc:
        fake_nvcc(home / "bin" / "nvcc", release, dryrun)
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture
def layout(tmp_path):
    """Empty stand-ins for the usual prefix (/usr/local), site-packages and a PATH folder."""
    prefix, site, path_bin = tmp_path / "usr_local", tmp_path / "site", tmp_path / "path_bin"
    for d in (prefix, site, path_bin):
        d.mkdir()
    return tmp_path, prefix, site, path_bin


def search(torch_cuda, prefix, site, environ, torch_home=None):
    if torch_home is None:  # torch's rule, without its last resort (the real /usr/local/cuda)
        torch_home = fc.torch_guess(environ, last_resort=None) or ""
    return fc.find_toolkit(torch_cuda, torch_home=torch_home, environ=environ, prefixes=[str(prefix)],
                           site_dirs=[str(site)])


def test_usable_cuda_home_is_torchs_choice(layout):
    tmp, prefix, site, _ = layout
    home = fake_toolkit(tmp / "cuda")
    s = search("13.0", prefix, site, {"CUDA_HOME": str(home), "PATH": ""})
    assert s.toolkit.home == str(home) and s.toolkit.found_by == "torch" and s.toolkit.version == "13.0"
    assert "found by torch (CUDA_HOME)" in s.reason
    assert s.toolkit.include_dirs == [] and s.toolkit.library_dirs == [] and not s.toolkit.needs_cudart_path


def test_wrapper_nvcc_is_asked_where_nvcc_lives(layout):
    """The issue's case: PATH has a wrapper script outside the toolkit; torch guesses the wrapper's grandparent."""
    tmp, prefix, site, path_bin = layout
    home = fake_toolkit(tmp / "opt" / "cuda-13.0")
    wrapper = _script(path_bin / "nvcc", f'exec {home}/bin/nvcc "$@"\n')
    env = {"PATH": str(path_bin)}
    assert fc.torch_guess(env) == str(tmp)  # what torch uses: the wrapper's grandparent, no toolkit there
    s = search("13.0", prefix, site, env)
    assert s.toolkit is not None and s.toolkit.home == str(home) and s.toolkit.found_by == "search"
    assert str(wrapper) in s.toolkit.where
    assert "found by the search" in s.reason and f"torch's CUDA_HOME {tmp}" in s.reason


def test_wrapper_script_is_read_if_nvcc_cant_tell(layout):
    """An nvcc that does not answer --dryrun: the wrapper script's text names the real nvcc."""
    tmp, prefix, site, path_bin = layout
    home = fake_toolkit(tmp / "opt" / "cuda", dryrun=False)
    wrapper = _script(path_bin / "nvcc", f'exec "{home}/bin/nvcc" "$@"\n')
    s = search("13.0", prefix, site, {"PATH": str(path_bin)})
    assert s.toolkit.home == str(home)
    assert "wrapper script" in s.toolkit.where and str(wrapper) in s.toolkit.where


def test_symlinked_nvcc_is_followed(layout):
    tmp, prefix, site, path_bin = layout
    home = fake_toolkit(tmp / "opt" / "cuda-13.0", dryrun=False)
    (path_bin / "nvcc").symlink_to(home / "bin" / "nvcc")
    s = search("13.0", prefix, site, {"PATH": str(path_bin)})
    assert s.toolkit.home == str(home) and "->" in s.toolkit.where


def test_major_version_mismatch_is_not_usable(layout):
    tmp, prefix, site, _ = layout
    old = fake_toolkit(prefix / "cuda", release="12.4")
    s = search("13.0", prefix, site, {"CUDA_HOME": str(old), "PATH": ""})
    assert s.toolkit is None
    assert "nvcc is CUDA 12.4, torch is built with CUDA 13.0" in s.message()
    # ... and the search goes on to the standard folder of torch's version.
    new = fake_toolkit(prefix / "cuda-13.0", release="13.0")
    s = search("13.0", prefix, site, {"CUDA_HOME": str(old), "PATH": ""})
    assert s.toolkit.home == str(new) and s.toolkit.where == "standard folder"
    assert "not usable" in s.reason and "majors differ" in s.reason


def test_minor_version_difference_is_usable(layout):
    tmp, prefix, site, _ = layout
    home = fake_toolkit(prefix / "cuda", release="13.1")
    s = search("13.0", prefix, site, {"PATH": ""})
    assert s.toolkit.home == str(home) and s.toolkit.version == "13.1"


def test_headers_without_libraries_are_not_usable(layout):
    tmp, prefix, site, _ = layout
    fake_toolkit(prefix / "cuda-13.0", cudart=None)
    s = search("13.0", prefix, site, {"PATH": ""})
    assert s.toolkit is None
    assert "no cudart library" in s.message() and str(prefix / "cuda-13.0") in s.message()


def test_libraries_in_lib_or_targets_are_found(layout):
    tmp, prefix, site, _ = layout
    home = fake_toolkit(prefix / "cuda", header=False, cudart="targets/x86_64-linux/lib/libcudart.so")
    (home / "targets" / "x86_64-linux" / "include").mkdir(parents=True)
    (home / "targets" / "x86_64-linux" / "include" / "cuda_runtime.h").write_text("")
    s = search("13.0", prefix, site, {"PATH": ""})
    assert s.toolkit.home == str(home)
    assert s.toolkit.include_dirs == [str(home / "targets" / "x86_64-linux" / "include")]
    assert s.toolkit.library_dirs == [str(home / "targets" / "x86_64-linux" / "lib")]


def test_pip_wheel_layout_cuda13(layout):
    """nvidia-cuda-nvcc / -runtime wheels of CUDA 13: site-packages/nvidia/cu13/{bin,include,lib}, and
    only libcudart.so.13 (no libcudart.so for -lcudart)."""
    tmp, prefix, site, _ = layout
    home = fake_toolkit(site / "nvidia" / "cu13", cudart="lib/libcudart.so.13")
    s = search("13.0", prefix, site, {"PATH": ""})
    assert s.toolkit.home == str(home) and s.toolkit.where == "pip's nvidia wheels"
    assert s.toolkit.needs_cudart_path and s.toolkit.cudart == str(home / "lib" / "libcudart.so.13")


def test_pip_wheel_layout_cuda12_split(layout):
    """CUDA 12 wheels: nvcc in nvidia/cuda_nvcc/bin, headers and cudart in nvidia/cuda_runtime."""
    tmp, prefix, site, _ = layout
    nvcc_home = site / "nvidia" / "cuda_nvcc"
    fake_nvcc(nvcc_home / "bin" / "nvcc", "12.8")
    runtime = fake_toolkit(site / "nvidia" / "cuda_runtime", nvcc=False, cudart="lib/libcudart.so.12")
    s = search("12.8", prefix, site, {"PATH": ""})
    assert s.toolkit.home == str(nvcc_home)
    assert s.toolkit.include_dirs == [str(runtime / "include")]
    assert s.toolkit.library_dirs == [str(runtime / "lib")]
    assert s.toolkit.needs_cudart_path


def test_wheel_headers_without_nvcc_are_unusable(layout):
    """torch's own wheels bring the runtime (headers, libcudart.so.13) but no nvcc."""
    tmp, prefix, site, _ = layout
    fake_toolkit(site / "nvidia" / "cu13", nvcc=False, cudart="lib/libcudart.so.13")
    s = search("13.0", prefix, site, {"PATH": ""})
    assert s.toolkit is None and "no bin/nvcc" in s.message()


def test_cuda_path_is_searched(layout):
    tmp, prefix, site, path_bin = layout
    home = fake_toolkit(tmp / "conda-cuda")
    # torch reads CUDA_PATH too, but here torch's guess came from somewhere else (e.g. a stale CUDA_HOME).
    s = fc.find_toolkit("13.0", torch_home=str(tmp / "nowhere"), environ={"CUDA_PATH": str(home), "PATH": ""},
                        prefixes=[str(prefix)], site_dirs=[str(site)])
    assert s.toolkit.home == str(home) and s.toolkit.where == "CUDA_PATH"


def test_nothing_usable_says_what_where_and_how(layout):
    tmp, prefix, site, path_bin = layout
    _script(path_bin / "nvcc", "exit 1\n")  # a broken nvcc on PATH
    fake_toolkit(prefix / "cuda", release="12.4")
    s = search("13.0", prefix, site, {"PATH": str(path_bin)})
    assert s.toolkit is None
    text = s.message()
    assert "building the C++ kernels only" in text
    for looked in (str(prefix / "cuda-13.0"), str(prefix / "cuda"), str(path_bin / "nvcc")):
        assert looked in text
    assert "CUDA_HOME=" in text and "CONTRASTMASK_CUDA=0" in text and "CONTRASTMASK_CUDA=1" in text
    assert s.reason.startswith("none: ")


def test_cpu_torch_searches_nothing(layout):
    tmp, prefix, site, _ = layout
    fake_toolkit(prefix / "cuda")
    s = search(None, prefix, site, {"PATH": ""})
    assert s.toolkit is None and s.tried == [] and "CPU-only" in s.reason


def test_default_arch_list_is_valid_and_has_t4():
    archs = fc.DEFAULT_CUDA_ARCHS.split(";")
    assert archs[0] == "7.5" and archs[-1].endswith("+PTX")
    versions = [a.replace("+PTX", "") for a in archs]
    assert versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
    if torch.version.cuda is not None:
        # torch accepts the list (it raises on an unknown arch) and gives real code for each plus the PTX.
        from torch.utils import cpp_extension
        old = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = fc.DEFAULT_CUDA_ARCHS
        try:
            flags = cpp_extension._get_cuda_arch_flags()
        finally:
            if old is None:
                del os.environ["TORCH_CUDA_ARCH_LIST"]
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old
        assert len(flags) == len(archs) + 1
        # every architecture torch itself ships kernels for has real code or runs one within its major
        shipped = [f for f in torch._C._cuda_getArchFlags().split() if f.startswith("sm_")]
        ours = {tuple(map(int, v.split("."))) for v in versions}
        for sm in shipped:
            major, minor = int(sm[3:-1]), int(sm[-1])
            assert any(m == major and n <= minor for m, n in ours), sm


def test_cmake_reads_the_same_default(repo):
    text = (repo / "CMakeLists.txt").read_text()
    assert "DEFAULT_CUDA_ARCHS" in text and "tools/find_cuda.py" in text
    assert fc.DEFAULT_CUDA_ARCHS not in text  # one definition
