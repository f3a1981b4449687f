// sample_keys: candidate sets, keep rule and the deterministic key sampler (SPEC steps 3-4).
// roi_offset: ROI n is hashed as n + roi_offset (its index in a batch split across processes).
// The seed is a 0-dim int64 tensor on the CPU or the labels' device, read where it lives;
// sample_keys.int_seed takes an integer (as roi_plan.int_seed does; a SymInt, so that torch.compile keeps a
// per-step seed symbolic instead of recompiling for each value).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "library.h"

namespace contrastmask {
namespace {

using KeyOutputs = std::tuple<at::Tensor, at::Tensor>;

KeyOutputs sample_keys_int_seed(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel,
                                double sigma, int64_t hard_sqdist, int64_t min_keys, c10::SymInt seed,
                                int64_t roi_offset) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(CONTRASTMASK_OP("sample_keys"), "")
                       .typed<KeyOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t,
                                         int64_t, const at::Tensor&, int64_t)>();
  return op.call(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed_tensor(seed), roi_offset);
}

}  // namespace
}  // namespace contrastmask

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def(
      "sample_keys(Tensor labels, Tensor sqdist, Tensor is_novel, float sigma, int hard_sqdist, int min_keys, "
      "Tensor seed, int roi_offset=0) -> (Tensor keys, Tensor keep)");
  m.def(
      "sample_keys.int_seed(Tensor labels, Tensor sqdist, Tensor is_novel, float sigma, int hard_sqdist, "
      "int min_keys, SymInt seed, int roi_offset=0) -> (Tensor keys, Tensor keep)",
      &contrastmask::sample_keys_int_seed);
}
