// What one call of a CPU plan kernel asks of the per-ROI loop (partition, distances, sampling).
#pragma once

#include <stdint.h>

namespace contrastmask {

// What one call asks of the per-ROI loop; null pointers mean "not this step".
template <typename mask_t, typename cam_t>
struct PlanJob {
  int64_t N = 0;
  int H = 0, W = 0;
  const mask_t* masks = nullptr;   // (N, H, W) 0/1
  const cam_t* cams = nullptr;     // (N, H, W), may be null when no ROI is novel
  const bool* is_novel = nullptr;  // (N,)
  const bool* valid = nullptr;     // (N,), null = all valid
  cam_t thr_fg = 0, thr_bg = 0;    // CAM thresholds, already in the CAM's dtype
  bool sqdist_all_rois = false;    // boundary_sqdist: distances of every ROI, not only base ones
  const int8_t* labels_in = nullptr;    // sample_keys: given labels
  const int32_t* sqdist_in = nullptr;   // sample_keys: given distances
  int8_t* labels_out = nullptr;
  int32_t* sqdist_out = nullptr;
  uint8_t* keys_out = nullptr;     // sampling happens iff non-null
  bool* keep_out = nullptr;
  double sigma = 0.3;
  int64_t hard_sqdist = 2, min_keys = 5;
  uint64_t mixed_seed = 0;
};

}  // namespace contrastmask
