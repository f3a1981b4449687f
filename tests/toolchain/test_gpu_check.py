"""`make gpu-check` (tools/gpu_check.py) on a machine without a GPU: it reports the environment and the build,
says that no GPU is present, lists every GPU step as not run, and exits with status 2."""
import subprocess
import sys

import pytest
import torch



@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: make gpu-check runs everything there")
def test_without_a_gpu_it_stops_with_status_2(repo):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--skip-build"], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "gpu-check summary" in out and "NO GPU" in out
    if torch.version.cuda is not None:
        for step in ("pytest -m cuda", "compute-sanitizer memcheck", "compute-sanitizer racecheck",
                     "benchmark sweep + model step", "kernels: measured vs predicted"):
            assert any(line.startswith(step) and "NOT RUN" in line for line in out.splitlines()), (step, out)


def test_every_gpu_test_carries_the_marker(repo):
    # make gpu-check runs `pytest -m cuda` alone: a test that runs on the GPU without the marker (a "cuda" id
    # outside the emulation and the toolkit search) would never run there.
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "-m", "not cuda", "-k", "cuda and not emu and not find_cuda"], cwd=repo,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]  # 5: no test selected
