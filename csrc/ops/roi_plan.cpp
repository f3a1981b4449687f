// roi_plan: partition + distance transform + sampling fused in one per-ROI kernel; the distances
// never leave it. Same results as partition -> boundary_sqdist -> sample_keys (roi_offset as there).
#include "library.h"

TORCH_LIBRARY_FRAGMENT(CONTRASTMASK_LIBRARY, m) {
  m.def(
      "roi_plan(Tensor masks, Tensor? cams, Tensor is_novel, Tensor? valid, float delta, float sigma, "
      "int hard_sqdist, int min_keys, int seed, int roi_offset=0) -> (Tensor labels, Tensor keys, Tensor keep)");
}
