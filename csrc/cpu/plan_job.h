// What one call of a CPU plan kernel asks of the per-ROI loop (partition, distances, sampling).
#pragma once

#include <stdint.h>

#include "../contrastmask/plan_steps.h"

namespace contrastmask {

template <typename mask_t, typename cam_t>
struct PlanJob : PlanSteps {
  const mask_t* masks = nullptr;   // (N, H, W) 0/1
  const cam_t* cams = nullptr;     // (N, H, W), may be null when no ROI is novel
  cam_t thr_fg = 0, thr_bg = 0;    // CAM thresholds, already in the CAM's dtype
};

}  // namespace contrastmask
