// roi_plan: partition + distance transform + sampling fused in one per-ROI kernel; the distances
// never leave it. Same results as partition -> boundary_sqdist -> sample_keys (roi_offset as there).
// The seed is a 0-dim int64 tensor on the CPU or the masks' device, read where it lives (no host sync,
// and a compiled graph or a CUDA graph replays with whatever value it holds); roi_plan.int_seed takes
// an integer (a SymInt: torch.compile keeps a per-step seed symbolic) and wraps it in a CPU tensor.
// check_inputs: as for partition.
#include "library.h"

namespace contrastmask_ops::ops {

PlanOutputs roi_plan(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                     const c10::optional<at::Tensor>& valid, double delta, double sigma, int64_t hard_sqdist,
                     int64_t min_keys, const at::Tensor& seed, int64_t roi_offset, bool check_inputs) {
  static auto op = contrastmask::typed_op<decltype(roi_plan)>(CONTRASTMASK_OP("roi_plan"));
  return op.call(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed, roi_offset, check_inputs);
}

PlanOutputs roi_plan_int_seed(const at::Tensor& masks, const c10::optional<at::Tensor>& cams,
                              const at::Tensor& is_novel, const c10::optional<at::Tensor>& valid, double delta,
                              double sigma, int64_t hard_sqdist, int64_t min_keys, c10::SymInt seed,
                              int64_t roi_offset, bool check_inputs) {
  static auto op = contrastmask::typed_op<decltype(roi_plan_int_seed)>(CONTRASTMASK_OP("roi_plan"), "int_seed");
  return op.call(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, std::move(seed), roi_offset,
                 check_inputs);
}

}  // namespace contrastmask_ops::ops

namespace contrastmask {

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  // roi_plan and roi_plan.int_seed, a composite kernel: it decomposes into roi_plan on every backend, fake
  // tensors included. sample_keys.cpp registers its pair with the same call (deliberate twins).
  def_with_int_seed<&ops::roi_plan, decltype(ops::roi_plan_int_seed)>(
      m,
      "roi_plan(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta, float sigma, "
      "int hard_sqdist, int min_keys, Tensor seed, int roi_offset=0, bool check_inputs=True) "
      "-> (Tensor labels, Tensor keys, Tensor keep)");
  // roi_offset as a 0-dim int64 tensor on the CPU or the masks' device (read by the CUDA kernel: the global
  // loss computes it on the device, with no host sync; DESIGN, "Global query sharing").
  m.def(
      "roi_plan.offset_tensor(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta, "
      "float sigma, int hard_sqdist, int min_keys, Tensor seed, Tensor roi_offset, bool check_inputs=True) "
      "-> (Tensor labels, Tensor keys, Tensor keep)");
}

}  // namespace contrastmask
