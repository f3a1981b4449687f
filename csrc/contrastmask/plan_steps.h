// What one plan call asks for, shared by the CPU job (cpu/plan_job.h) and the CUDA kernel arguments
// (cuda/plan_kernels.cu), which add where the masks and CAMs live. Null pointers mean "not this step".
// Set from a call's inputs by set_plan_steps (ops/plan_inputs.h).
#pragma once

#include <stdint.h>

namespace contrastmask {

// The (N, H, W) grid of a call: ROIs, rows, columns.
struct PlanGrid {
  int64_t N = 0;
  int H = 0, W = 0;
};

// The sampler's parameters (SPEC step 4); ROI n hashes as n + roi_offset (its index across processes).
struct SamplingParams {
  double sigma = 0.3;
  int64_t hard_sqdist = 2, min_keys = 5, roi_offset = 0;
};

// The host's PlanInputs (ops/plan_inputs.h) holds the grid and the sampling parameters too.
struct PlanSteps : PlanGrid, SamplingParams {
  const bool* is_novel = nullptr;       // (N,)
  const bool* valid = nullptr;          // (N,), null = all valid
  bool sqdist_all_rois = false;         // boundary_sqdist: distances of every ROI, not only base ones
  const int8_t* labels_in = nullptr;    // sample_keys: given labels
  const int32_t* sqdist_in = nullptr;   // sample_keys: given distances
  int8_t* labels_out = nullptr;
  int32_t* sqdist_out = nullptr;
  uint8_t* keys_out = nullptr;          // sampling happens iff non-null
  bool* keep_out = nullptr;
  uint64_t mixed_seed = 0;              // splitmix64(seed), mixed on the host ...
  const int64_t* seed_on_device = nullptr;  // ... or (CUDA) the seed tensor on the device, mixed in the kernel
  const int64_t* roi_offset_on_device = nullptr;  // (CUDA) roi_offset read from a tensor on the device instead
};

}  // namespace contrastmask
