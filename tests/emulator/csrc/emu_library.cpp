// The emulation build's operator library (tests only): torch.ops.contrastmask_emu holds the same
// schemas as torch.ops.contrastmask (csrc/ops/*.cpp compiled with CONTRASTMASK_LIBRARY=contrastmask_emu)
// and the CUDA kernels registered for CPU tensors; torch.ops.contrastmask_emulator controls the
// emulator (fiber order and seed, statistics). The traced build (tests/emulator/gpu_trace.py) uses its own
// namespaces (CONTRASTMASK_LIBRARY=contrastmask_emu_trace, CONTRASTMASK_EMULATOR_LIBRARY=
// contrastmask_emulator_trace), so both libraries can be loaded in one process, and adds trace_begin
// and trace_end.
#include <torch/library.h>

#include "cuda_emulation.h"

#ifndef CONTRASTMASK_LIBRARY
#define CONTRASTMASK_LIBRARY contrastmask_emu
#endif
#ifndef CONTRASTMASK_EMULATOR_LIBRARY
#define CONTRASTMASK_EMULATOR_LIBRARY contrastmask_emulator
#endif
// TORCH_LIBRARY pastes its namespace argument: one more level expands the macros first.
#define CM_EMU_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

CM_EMU_TORCH_LIBRARY(CONTRASTMASK_LIBRARY, m) {}

namespace {

void set_schedule(int64_t order, int64_t seed) {
  contrastmask::emu::set_schedule(static_cast<int>(order), static_cast<uint64_t>(seed));
}

std::vector<int64_t> stats() { return contrastmask::emu::stats(); }

}  // namespace

CM_EMU_TORCH_LIBRARY(CONTRASTMASK_EMULATOR_LIBRARY, m) {
  m.def("set_schedule(int order, int seed) -> ()", &set_schedule);
  m.def("stats() -> int[]", &stats);
#if defined(CONTRASTMASK_EMU_TRACE)
  m.def("trace_begin() -> ()", [] { contrastmask::emu::trace_begin(); });
  m.def("trace_end() -> str", [] { return contrastmask::emu::trace_end(); });
#endif
}
