"""An extension built against another torch than the one importing it is not loaded: the package runs the
reference with one one-line warning naming both versions. Checked on a copy of the package whose build
config names another torch (the compiled library, if any, is copied too: it must not be loaded)."""
import shutil
import subprocess
import sys

import torch


CHILD = r"""
import warnings
import torch
import contrastmask_ops as cm
assert cm.__file__.startswith(__import__("sys").argv[1]), cm.__file__
info = cm.build_info()
assert not info["extension"] and not info["cpu"] and not info["cuda"], info
assert "1.0.0+other" in info["extension_error"], info
masks = torch.zeros(2, 5, 5, dtype=torch.bool)
masks[:, 1:4, 1:4] = True
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = cm.boundary_sqdist(masks)
    cm.boundary_sqdist(masks)
assert torch.equal(got, cm.reference.boundary_sqdist(masks))
messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1, messages
try:
    torch.ops.contrastmask.roi_plan
    loaded = True
except (AttributeError, RuntimeError):
    loaded = False
assert not loaded, "the compiled library was loaded"
print(messages[0])
"""


def test_another_torchs_build_falls_back(repo, tmp_path):
    package = tmp_path / "contrastmask_ops"
    shutil.copytree(repo / "contrastmask_ops", package,
                    ignore=shutil.ignore_patterns("__pycache__", "_build_config.py"))
    (package / "_build_config.py").write_text(
        "BUILD_CONFIG = {'built_with_torch': '1.0.0+other', 'cuda_arch_list': None}\n")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert "\n" not in line
    assert "1.0.0+other" in line and torch.__version__ in line and "reference" in line
