// C++ API of contrastmask_ops for libtorch users: the operators of torch.ops.contrastmask (their C++
// declarations, contrastmask_ops/ops.h, call them through the dispatcher, so the device kernels, autograd
// and autocast registered by the library apply), with the Python API's defaults. Link libcontrastmask_ops
// (CMakeLists.txt): it defines those functions and registers the operators.
//
//   contrastmask_ops::LossOptions opts;
//   opts.seed = step;                                   // the key sampler's seed (no default draw in C++)
//   at::Tensor loss = contrastmask_ops::query_sharing_contrastive_loss(z, masks, cams, is_novel, opts);
//   loss.backward();
//
// Semantics: docs/SPEC.md. Arguments are checked by the kernels (errors name the argument).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "contrastmask_ops/ops.h"

namespace contrastmask_ops {

struct PlanOptions {
  c10::optional<at::Tensor> valid;  // bool (N,): ROIs that take part in the loss
  double delta = 0.1;               // CAM thresholds of novel ROIs: >= 1 - delta foreground, <= delta background
  double sigma = 0.3;               // fraction of each candidate set sampled as keys
  int64_t hard_sqdist = 2;          // squared distance to the boundary within which a pixel is "hard"
  int64_t min_keys = 5;             // an ROI with a smaller candidate set is dropped
  int64_t seed = 0;                 // the sampler's seed (taken mod 2^64) ...
  at::Tensor seed_tensor;           // ... or, when defined, a 0-dim int64 seed on the CPU or the masks' device,
                                    // read there (no host sync; a captured CUDA graph replays with its value)
  int64_t roi_offset = 0;           // ROI n is sampled as ROI n + roi_offset of a larger batch
  bool check_inputs = true;         // false: masks' 0/1 values and CAMs of novel ROIs unchecked, no host sync
                                    // (CUDA-graph capture); bad values then give unspecified keys
};

struct LossOptions : PlanOptions {
  double tau_easy = 0.7;
  double tau_hard = 0.3;
  bool share_queries = true;
  std::string formulation = "paper";  // "paper" | "released"
};

// int8 (N, H, W): 1 foreground, 0 background, -1 ignored (SPEC step 1).
inline at::Tensor partition(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                            const c10::optional<at::Tensor>& valid = c10::nullopt, double delta = 0.1,
                            bool check_inputs = true) {
  return ops::partition(masks, cams, is_novel, valid, delta, check_inputs);
}

// int32 (N, H, W): squared distance to the mask's boundary (SPEC step 2).
inline at::Tensor boundary_sqdist(const at::Tensor& masks, bool check_inputs = true) {
  return ops::boundary_sqdist(masks, check_inputs);
}

// (labels, keys, keep): partition, distance transform and key sampling fused (SPEC steps 1-4).
inline ops::PlanOutputs roi_plan(const at::Tensor& masks, const c10::optional<at::Tensor>& cams,
                                 const at::Tensor& is_novel, const PlanOptions& o = PlanOptions()) {
  if (o.seed_tensor.defined())
    return ops::roi_plan(masks, cams, is_novel, o.valid, o.delta, o.sigma, o.hard_sqdist, o.min_keys, o.seed_tensor,
                         o.roi_offset, o.check_inputs);
  return ops::roi_plan_int_seed(masks, cams, is_novel, o.valid, o.delta, o.sigma, o.hard_sqdist, o.min_keys,
                                c10::SymInt(o.seed), o.roi_offset, o.check_inputs);
}

// The loss (0-dim, z's dtype) from explicit key sets (SPEC steps 5-6); differentiable in z.
inline at::Tensor contrastive_loss_from_keys(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                                             const at::Tensor& keep, const LossOptions& o = LossOptions()) {
  return std::get<0>(
      ops::contrastive_loss(z, labels, keys, keep, o.tau_easy, o.tau_hard, o.share_queries, o.formulation));
}

// The whole pipeline: roi_plan, then the loss; what the Python query_sharing_contrastive_loss computes.
inline at::Tensor query_sharing_contrastive_loss(const at::Tensor& z, const at::Tensor& masks,
                                                 const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                                                 const LossOptions& o = LossOptions()) {
  auto [labels, keys, keep] = roi_plan(masks, cams, is_novel, o);
  return contrastive_loss_from_keys(z, labels, keys, keep, o);
}

}  // namespace contrastmask_ops
