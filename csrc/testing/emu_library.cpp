// The emulation build's operator library (tests only): torch.ops.contrastmask_emu holds the same
// schemas as torch.ops.contrastmask (csrc/ops/*.cpp compiled with CONTRASTMASK_LIBRARY=contrastmask_emu)
// and the CUDA kernels registered for CPU tensors; torch.ops.contrastmask_emulator controls the
// emulator (fiber order and seed, statistics).
#include <torch/library.h>

#include "cuda_emulation.h"

TORCH_LIBRARY(contrastmask_emu, m) {}

namespace {

void set_schedule(int64_t order, int64_t seed) {
  contrastmask::emu::set_schedule(static_cast<int>(order), static_cast<uint64_t>(seed));
}

std::vector<int64_t> stats() { return contrastmask::emu::stats(); }

}  // namespace

TORCH_LIBRARY(contrastmask_emulator, m) {
  m.def("set_schedule(int order, int seed) -> ()", &set_schedule);
  m.def("stats() -> int[]", &stats);
}
