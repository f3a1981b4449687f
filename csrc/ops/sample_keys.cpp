// sample_keys: candidate sets, keep rule and the deterministic key sampler (SPEC steps 3-4).
// roi_offset: ROI n is hashed as n + roi_offset (its index in a batch split across processes).
// The seed is a 0-dim int64 tensor on the CPU or the labels' device, read where it lives;
// sample_keys.int_seed takes an integer (as roi_plan.int_seed does; a SymInt, so that torch.compile keeps a
// per-step seed symbolic instead of recompiling for each value).
#include "library.h"

namespace contrastmask_ops::ops {

KeyOutputs sample_keys(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel, double sigma,
                       int64_t hard_sqdist, int64_t min_keys, const at::Tensor& seed, int64_t roi_offset) {
  static auto op = contrastmask::typed_op<decltype(sample_keys)>(CONTRASTMASK_OP("sample_keys"));
  return op.call(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed, roi_offset);
}

KeyOutputs sample_keys_int_seed(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel,
                                double sigma, int64_t hard_sqdist, int64_t min_keys, c10::SymInt seed,
                                int64_t roi_offset) {
  static auto op =
      contrastmask::typed_op<decltype(sample_keys_int_seed)>(CONTRASTMASK_OP("sample_keys"), "int_seed");
  return op.call(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, std::move(seed), roi_offset);
}

}  // namespace contrastmask_ops::ops

namespace contrastmask {

// sample_keys and sample_keys.int_seed.
TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  def_with_int_seed<&ops::sample_keys, decltype(ops::sample_keys_int_seed)>(
      m, "sample_keys(Tensor labels, Tensor sqdist, Tensor is_novel, float sigma, int hard_sqdist, int min_keys, "
         "Tensor seed, int roi_offset=0) -> (Tensor keys, Tensor keep)");
}

}  // namespace contrastmask
