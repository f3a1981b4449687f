// sample_keys: candidate sets, keep rule and the deterministic key sampler (SPEC steps 3-4).
// roi_offset: ROI n is hashed as n + roi_offset (its index in a batch split across processes).
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def(
      "sample_keys(Tensor labels, Tensor sqdist, Tensor is_novel, float sigma, int hard_sqdist, int min_keys, "
      "int seed, int roi_offset=0) -> (Tensor keys, Tensor keep)");
}
