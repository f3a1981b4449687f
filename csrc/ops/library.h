// The operator namespace: torch.ops.contrastmask. The CUDA emulation build (tests only) compiles the
// same schema and kernel sources with -DCONTRASTMASK_LIBRARY=contrastmask_emu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <string_view>
#include <type_traits>

#include "../include/contrastmask_ops/ops.h"  // defines CONTRASTMASK_LIBRARY's default

#define CONTRASTMASK_STR2(x) #x
#define CONTRASTMASK_STR(x) CONTRASTMASK_STR2(x)
// "<namespace>::<name>", for looking an operator up in the dispatcher.
#define CONTRASTMASK_OP(name) CONTRASTMASK_STR(CONTRASTMASK_LIBRARY) "::" name

namespace contrastmask {

namespace ops = contrastmask_ops::ops;

// The dispatcher's handle of one of this library's operators, typed by its declaration in
// contrastmask_ops/ops.h: typed_op<decltype(ops::roi_plan)>(CONTRASTMASK_OP("roi_plan")).
template <typename Declaration>
c10::TypedOperatorHandle<Declaration> typed_op(const char* name, const char* overload = "") {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload).typed<Declaration>();
}

// The seed of the .int_seed overloads as the 0-dim int64 CPU tensor that the default overloads take. A
// symbolic seed (torch.compile) stays symbolic in the graph instead of being specialised to its value.
inline at::Tensor seed_tensor(c10::SymInt seed) {
  return at::scalar_tensor(c10::Scalar(seed), at::TensorOptions().dtype(at::kLong));
}

// An argument of an .int_seed overload as its default overload takes it: the seed (the one SymInt) as
// seed_tensor, the others unchanged.
template <typename Arg>
decltype(auto) tensor_seed_argument(Arg&& arg) {
  if constexpr (std::is_same_v<std::decay_t<Arg>, c10::SymInt>) {
    return seed_tensor(arg);
  } else {
    return std::forward<Arg>(arg);
  }
}

// The kernel of an operator's .int_seed overload (signature IntSeedDeclaration): a composite that wraps
// the seed in a CPU tensor and calls the default overload, kTensorSeedOp, so that fake tensors and every
// backend need nothing more.
template <auto kTensorSeedOp, typename IntSeedDeclaration>
struct IntSeedKernel;

template <auto kTensorSeedOp, typename Result, typename... Args>
struct IntSeedKernel<kTensorSeedOp, Result(Args...)> {
  static Result call(Args... args) { return kTensorSeedOp(tensor_seed_argument(args)...); }
};

// Defines an operator whose seed is `Tensor seed` (schema "<name>(...)") and its .int_seed overload: the same
// schema with `SymInt seed`, whose kernel is IntSeedKernel. kTensorSeedOp and IntSeedDeclaration: their
// declarations in contrastmask_ops/ops.h.
template <auto kTensorSeedOp, typename IntSeedDeclaration>
void def_with_int_seed(torch::Library& m, const std::string& schema) {
  constexpr std::string_view kTensorSeed = "Tensor seed", kIntSeed = "SymInt seed";
  m.def(schema.c_str());
  const size_t name_end = schema.find('('), seed = schema.find(kTensorSeed);
  TORCH_INTERNAL_ASSERT(name_end != std::string::npos && seed != std::string::npos);
  std::string int_seed = schema;
  int_seed.replace(seed, kTensorSeed.size(), kIntSeed);
  int_seed.insert(name_end, ".int_seed");
  m.def(int_seed.c_str(), &IntSeedKernel<kTensorSeedOp, IntSeedDeclaration>::call);
}

}  // namespace contrastmask
