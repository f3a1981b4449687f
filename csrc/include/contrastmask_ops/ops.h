// The operators of torch.ops.contrastmask as C++ functions: one declaration per operator and overload,
// the way torchvision declares its ops (torchvision/csrc/ops/roi_align.h). Each is defined beside its
// schema (csrc/ops/<op>.cpp) as a call through the dispatcher, typed by `decltype` of this declaration,
// so the device kernels, autograd and autocast registered for the operator apply; the library's own
// callers (the .int_seed overloads, the loss's autograd) and the C++ API (contrastmask_ops.h) call these.
// Arguments as in the schemas; semantics in docs/SPEC.md.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

// The dispatcher namespace these functions call (torch.ops.contrastmask); the CUDA emulation builds (tests
// only) compile the library's sources a second time for their own namespace.
#ifndef CONTRASTMASK_LIBRARY
#define CONTRASTMASK_LIBRARY contrastmask
#endif
#define CONTRASTMASK_OPS_CAT2(a, b) a##b
#define CONTRASTMASK_OPS_CAT(a, b) CONTRASTMASK_OPS_CAT2(a, b)

namespace contrastmask_ops {
// Named after that namespace, so that an emulation build's definitions (which call its own operators)
// never share a symbol with the package's when both libraries are loaded in one process.
inline namespace CONTRASTMASK_OPS_CAT(for_, CONTRASTMASK_LIBRARY) {
namespace ops {

using PlanOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;      // (labels, keys, keep)
using KeyOutputs = std::tuple<at::Tensor, at::Tensor>;                   // (keys, keep)
using LossOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;  // (loss, queries, pixstats, termstats)

at::Tensor partition(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                     const c10::optional<at::Tensor>& valid, double delta, bool check_inputs);

at::Tensor boundary_sqdist(const at::Tensor& masks, bool check_inputs);

KeyOutputs sample_keys(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel, double sigma,
                       int64_t hard_sqdist, int64_t min_keys, const at::Tensor& seed, int64_t roi_offset);

// sample_keys.int_seed
KeyOutputs sample_keys_int_seed(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel,
                                double sigma, int64_t hard_sqdist, int64_t min_keys, c10::SymInt seed,
                                int64_t roi_offset);

PlanOutputs roi_plan(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                     const c10::optional<at::Tensor>& valid, double delta, double sigma, int64_t hard_sqdist,
                     int64_t min_keys, const at::Tensor& seed, int64_t roi_offset, bool check_inputs);

// roi_plan.int_seed
PlanOutputs roi_plan_int_seed(const at::Tensor& masks, const c10::optional<at::Tensor>& cams,
                              const at::Tensor& is_novel, const c10::optional<at::Tensor>& valid, double delta,
                              double sigma, int64_t hard_sqdist, int64_t min_keys, c10::SymInt seed,
                              int64_t roi_offset, bool check_inputs);

LossOutputs contrastive_loss(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                             const at::Tensor& keep, double tau_easy, double tau_hard, bool share_queries,
                             c10::string_view formulation);

at::Tensor contrastive_loss_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                                     const at::Tensor& keys, const at::Tensor& keep, const at::Tensor& queries,
                                     const at::Tensor& pixstats, const at::Tensor& termstats, double tau_easy,
                                     double tau_hard, bool share_queries, c10::string_view formulation);

}  // namespace ops
}  // inline namespace for_<CONTRASTMASK_LIBRARY>
}  // namespace contrastmask_ops
