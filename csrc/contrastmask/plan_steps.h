// What one plan call asks for, shared by the CPU job (cpu/plan_job.h) and the CUDA kernel arguments
// (cuda/plan_kernels.cu), which add where the masks and CAMs live. Null pointers mean "not this step".
// Set from a call's inputs by set_plan_steps (ops/plan_inputs.h).
#pragma once

#include <stdint.h>

namespace contrastmask {

struct PlanSteps {
  int64_t N = 0;
  int H = 0, W = 0;
  const bool* is_novel = nullptr;       // (N,)
  const bool* valid = nullptr;          // (N,), null = all valid
  bool sqdist_all_rois = false;         // boundary_sqdist: distances of every ROI, not only base ones
  const int8_t* labels_in = nullptr;    // sample_keys: given labels
  const int32_t* sqdist_in = nullptr;   // sample_keys: given distances
  int8_t* labels_out = nullptr;
  int32_t* sqdist_out = nullptr;
  uint8_t* keys_out = nullptr;          // sampling happens iff non-null
  bool* keep_out = nullptr;
  double sigma = 0.3;
  int64_t hard_sqdist = 2, min_keys = 5;
  uint64_t mixed_seed = 0;              // splitmix64(seed), mixed on the host ...
  const int64_t* seed_on_device = nullptr;  // ... or (CUDA) the seed tensor on the device, mixed in the kernel
  int64_t roi_offset = 0;               // ROI n hashes as n + roi_offset (global index across processes) ...
  const int64_t* roi_offset_on_device = nullptr;  // ... or (CUDA) roi_offset read from a tensor on the device
};

}  // namespace contrastmask
