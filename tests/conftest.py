import os
import tempfile

# torch.compile's on-disk caches default to one folder under /tmp that outlives a build: an entry traced
# with an older fake kernel would replay its output shapes. Each test session gets a fresh one (set
# before torch is imported; spawned test processes inherit it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="contrastmask-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/ and tests/emulator/ are on sys.path through pytest's `pythonpath` setting (pyproject.toml), so shared
# helpers (blobs.py, cuda_emu.py) import as plain modules; a layer's own helpers (ops/cases.py, ops/devices.py,
# model/tiny_model.py) sit beside its tests and conftest.py, whose folder pytest puts on sys.path.
# The layers: ops/ (one module per op or op family, on every device), model/ (the reference model, its data and
# the ablation), emulator/ (the CUDA emulator, its memory-traffic trace and the GPU-time model), toolchain/
# (the pip and CMake builds, the CUDA toolkit search, make gpu-check).


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
