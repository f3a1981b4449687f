// The operator namespace: torch.ops.contrastmask. The CUDA emulation build (tests only) compiles the
// same schema and kernel sources with -DCONTRASTMASK_LIBRARY=contrastmask_emu.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#ifndef CONTRASTMASK_LIBRARY
#define CONTRASTMASK_LIBRARY contrastmask
#endif

#define CONTRASTMASK_STR2(x) #x
#define CONTRASTMASK_STR(x) CONTRASTMASK_STR2(x)
// "<namespace>::<name>", for looking an operator up in the dispatcher.
#define CONTRASTMASK_OP(name) CONTRASTMASK_STR(CONTRASTMASK_LIBRARY) "::" name

namespace contrastmask {

// The seed of the .int_seed overloads as the 0-dim int64 CPU tensor that the default overloads take. A
// symbolic seed (torch.compile) stays symbolic in the graph instead of being specialised to its value.
inline at::Tensor seed_tensor(c10::SymInt seed) {
  return at::scalar_tensor(c10::Scalar(seed), at::TensorOptions().dtype(at::kLong));
}

}  // namespace contrastmask
