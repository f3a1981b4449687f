# One entry point for set-up, tests, the demo and the benchmarks; each target creates the venv
# (pinned torch/torchvision from requirements.txt) and builds the extension when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CUDA toolkit: setup.py validates torch's guess and otherwise searches (tools/find_cuda.py), so a
# wrapper nvcc on PATH is fine; set CUDA_HOME to choose one.
export MAX_JOBS ?= 2
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
SOURCES += tools/find_cuda.py

.PHONY: venv build emu test test-cuda test-emu-asan demo bench gpu-model clean

$(VENV)/.installed: requirements.txt requirements-no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps -r requirements-no-deps.txt
	touch $@

venv: $(VENV)/.installed

# `pip install -e .` builds C++ always and CUDA wherever nvcc and a CUDA torch exist (no GPU needed).
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import contrastmask_ops as cm; print(cm.build_info())"
	touch $@

build: $(VENV)/.built

# The CUDA kernels compiled by the host compiler into a test-only emulation library (build/cuda-emu/,
# never installed); the op tests run on it as device cuda-emu (docs/DESIGN.md, "CUDA emulation").
emu: build
	$(PY) tests/emulator/cuda_emu.py

# The build test fails unless the extension (and, where a usable CUDA toolkit exists, its CUDA part) was compiled.
test: build emu
	CONTRASTMASK_REQUIRE_EXTENSION=1 CONTRASTMASK_REQUIRE_CUDA=$$($(PY) tools/find_cuda.py >/dev/null && echo 1 || echo 0) \
	  $(PY) -m pytest tests -q -ra

test-cuda: build
	$(PY) -m pytest tests -q -ra -m cuda

# The cuda-emu tests on an AddressSanitizer build of the emulation library (build/cuda-emu-asan/).
# libstdc++ is preloaded with libasan so that ASan finds the real __cxa_throw (c10 errors are C++ exceptions).
ASAN_ENV = CONTRASTMASK_EMU_ASAN=1 ASAN_OPTIONS=detect_leaks=0 \
  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)"
test-emu-asan: build
	$(ASAN_ENV) $(PY) tests/emulator/cuda_emu.py --asan
	$(ASAN_ENV) $(PY) -m pytest tests -q -ra -m cuda_emu

demo: build
	$(PY) -m model.demo

bench: build
	$(PY) -m benchmarks.run

# Predicted GPU times (H100, H200) of the fused kernels and of the reference, from the traced emulation build's
# memory traffic and nvcc --resource-usage: no GPU needed (benchmarks/README.md, "Predicted GPU time").
gpu-model: build
	$(PY) -m benchmarks.gpu_model

clean:
	rm -rf build *.egg-info contrastmask_ops/_C*.so contrastmask_ops/_build_config.py $(VENV)/.built

# One command for a GPU machine whose python3 already has a CUDA build of torch and that downloads nothing:
# builds in place against that torch (no venv), runs the CUDA tests, compute-sanitizer memcheck/racecheck and
# the benchmark sweep with the model step, prints a summary (tools/gpu_check.py; README "On a GPU machine").
# Exit status 2 when no GPU is visible. The in-place build replaces the venv's: `make build` redoes that.
.PHONY: gpu-check
GPU_PYTHON ?= python3
gpu-check:
	rm -f $(VENV)/.built
	$(GPU_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)
