// Host code of the plan operators (partition, boundary_sqdist, sample_keys, roi_plan), shared by the CPU and
// CUDA kernels as loss_inputs.h is for the loss: the checked, contiguous inputs and the outputs of one call,
// the CAM thresholds rounded to the CAM's dtype, the seed, the one setter of a kernel job, and the operators
// themselves, written once over a device that runs the per-ROI kernel (PlanOps<Device>).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/TypeCast.h>
#include <torch/library.h>

#include <tuple>

#include "../contrastmask/plan_steps.h"
#include "../contrastmask/sampling.h"
#include "checks.h"

namespace contrastmask {

// Thresholds of SPEC step 1 rounded to the CAM's dtype, like `cams >= 1 - delta` in PyTorch.
// c10::convert is the conversion torch's own dtype casts use; no tensor is made (this runs every call).
inline double round_to_dtype(double v, at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return v;
    case at::kFloat: return static_cast<double>(c10::convert<float>(v));
    case at::kHalf: return static_cast<double>(static_cast<float>(c10::convert<c10::Half>(v)));
    case at::kBFloat16: return static_cast<double>(static_cast<float>(c10::convert<c10::BFloat16>(v)));
    default: return at::scalar_tensor(v, at::kDouble).to(dtype).to(at::kDouble).item<double>();
  }
}

// The seed's 64 bits arrive as int64; SPEC mixes it once.
inline uint64_t seed_bits(int64_t seed) { return static_cast<uint64_t>(seed); }

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Everything one plan call hands to a device's per-ROI kernel. Undefined tensors mean "not this step".
struct PlanInputs : PlanGrid, SamplingParams {
  at::TensorOptions options;      // device of the call (of masks, or labels for sample_keys)
  at::Tensor masks;               // undefined for sample_keys
  at::Tensor cams;                // float32 (float16/bfloat16 widened exactly, like their thresholds) or float64
  double thr_fg = 0, thr_bg = 0;  // CAM thresholds rounded to the CAM's dtype (decision "Thresholds")
  at::Tensor is_novel, valid, labels_in, sqdist_in;
  at::Tensor labels_out, sqdist_out, keys_out, keep_out;
  bool sqdist_all_rois = false;   // boundary_sqdist: the distances of every ROI
  at::Tensor seed;                // 0-dim int64 on the CPU or the call's device
  at::Tensor roi_offset_tensor;   // (CUDA) 0-dim int64 on the call's device, read by the kernel; else roi_offset

  bool double_cams() const { return cams.defined() && cams.scalar_type() == at::kDouble; }
  // The fused plan: masks in, keys out (the CPU's row-bitmask path serves only this).
  bool fused() const { return masks.defined() && keys_out.defined(); }
  // The mask dtype to instantiate the kernel for; sample_keys reads no masks, and any instance serves.
  at::ScalarType mask_dtype() const { return masks.defined() ? masks.scalar_type() : at::kByte; }
  at::Tensor new_grid(at::ScalarType dtype) const { return at::empty({N, H, W}, options.dtype(dtype)); }
};

// The (N, H, W) grid of a call and its device.
inline PlanInputs grid_inputs(const at::Tensor& grid) {
  PlanInputs in;
  in.options = grid.options();
  in.N = grid.size(0);
  in.H = static_cast<int>(grid.size(1));
  in.W = static_cast<int>(grid.size(2));
  return in;
}

// masks and (partition, roi_plan) the CAMs, their thresholds and the per-ROI flags; checked by the caller.
inline PlanInputs mask_inputs(const at::Tensor& masks, const c10::optional<at::Tensor>& cams = c10::nullopt,
                              const c10::optional<at::Tensor>& is_novel = c10::nullopt,
                              const c10::optional<at::Tensor>& valid = c10::nullopt, double delta = 0.0) {
  PlanInputs in = grid_inputs(masks);
  in.masks = masks.contiguous();
  if (cams.has_value()) {
    in.thr_fg = round_to_dtype(1.0 - delta, cams->scalar_type());
    in.thr_bg = round_to_dtype(delta, cams->scalar_type());
    in.cams = cams->scalar_type() == at::kDouble ? cams->contiguous() : cams->to(at::kFloat).contiguous();
  }
  if (is_novel.has_value()) in.is_novel = is_novel->contiguous();
  if (valid.has_value()) in.valid = valid->contiguous();
  return in;
}

// The sampling parameters, the seed and the sampler's outputs.
inline void add_sampling(PlanInputs& in, double sigma, int64_t hard_sqdist, int64_t min_keys,
                         const at::Tensor& seed, int64_t roi_offset) {
  in.sigma = sigma;
  in.hard_sqdist = hard_sqdist;
  in.min_keys = min_keys;
  in.seed = seed;
  in.roi_offset = roi_offset;
  in.keys_out = in.new_grid(at::kByte);
  in.keep_out = at::empty({in.N}, in.options.dtype(at::kBool));
}

// Calls fn(mask_t()) with the C++ type of masks' dtype (those check_masks() admits).
template <typename Fn>
void dispatch_mask_dtype(at::ScalarType dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kBool, at::kByte, at::kHalf, at::kBFloat16, dtype, "contrastmask_plan",
                                  [&] { fn(scalar_t()); });
}

// The one setter of a kernel job from a call's inputs (the CPU's PlanJob and the CUDA kernel's PlanArgs are
// PlanSteps; each sets its own masks and CAMs pointers). kernel_reads_seed: the CUDA kernel reads a seed on
// its own device (no host sync); any other seed is on the CPU and is mixed here.
inline void set_plan_steps(PlanSteps& job, const PlanInputs& in, bool kernel_reads_seed) {
  static_cast<PlanGrid&>(job) = in;
  static_cast<SamplingParams&>(job) = in;
  job.is_novel = data_or_null<bool>(in.is_novel);
  job.valid = data_or_null<bool>(in.valid);
  job.sqdist_all_rois = in.sqdist_all_rois;
  job.labels_in = data_or_null<int8_t>(in.labels_in);
  job.sqdist_in = data_or_null<int32_t>(in.sqdist_in);
  job.labels_out = data_or_null<int8_t>(in.labels_out);
  job.sqdist_out = data_or_null<int32_t>(in.sqdist_out);
  job.keys_out = data_or_null<uint8_t>(in.keys_out);
  job.keep_out = data_or_null<bool>(in.keep_out);
  job.roi_offset_on_device = data_or_null<int64_t>(in.roi_offset_tensor);
  if (!in.seed.defined()) return;  // nothing is sampled
  if (kernel_reads_seed) {
    job.seed_on_device = in.seed.data_ptr<int64_t>();
  } else {
    job.mixed_seed = splitmix64(seed_bits(*in.seed.data_ptr<int64_t>()));
  }
}

// The plan operators, written once for every device. Device::Guard is constructed from the call's device
// (the CUDA device guard; nothing on the CPU); Device::run(in, read_errors) runs the per-ROI kernel and
// returns the PlanError bits, which it need not read back when read_errors is false (sample_keys, which has
// no values to check, and check_inputs=false, which skips CUDA's host sync for graph capture).
template <typename Device>
struct PlanOps {
  static at::Tensor partition(const at::Tensor& masks, const c10::optional<at::Tensor>& cams,
                              const at::Tensor& is_novel, const c10::optional<at::Tensor>& valid, double delta,
                              bool check_inputs) {
    check_plan_inputs(masks, cams, is_novel, valid, delta);
    const typename Device::Guard guard(masks.device());
    PlanInputs in = mask_inputs(masks, cams, is_novel, valid, delta);
    in.labels_out = in.new_grid(at::kChar);
    run_checked(in, check_inputs);
    return in.labels_out;
  }

  static at::Tensor boundary_sqdist(const at::Tensor& masks, bool check_inputs) {
    check_masks(masks);
    const typename Device::Guard guard(masks.device());
    PlanInputs in = mask_inputs(masks);
    in.sqdist_all_rois = true;
    in.sqdist_out = in.new_grid(at::kInt);
    run_checked(in, check_inputs);
    return in.sqdist_out;
  }

  static std::tuple<at::Tensor, at::Tensor> sample_keys(const at::Tensor& labels, const at::Tensor& sqdist,
                                                        const at::Tensor& is_novel, double sigma, int64_t hard_sqdist,
                                                        int64_t min_keys, const at::Tensor& seed, int64_t roi_offset) {
    check_sample_inputs(labels, sqdist, is_novel, sigma, min_keys, seed, roi_offset);
    const typename Device::Guard guard(labels.device());
    PlanInputs in = grid_inputs(labels);
    in.is_novel = is_novel.contiguous();
    in.labels_in = labels.contiguous();
    in.sqdist_in = sqdist.contiguous();
    add_sampling(in, sigma, hard_sqdist, min_keys, seed, roi_offset);
    Device::run(in, /*read_errors=*/false);  // labels and distances have no values to check
    return {in.keys_out, in.keep_out};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_plan(
      const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
      const c10::optional<at::Tensor>& valid, double delta, double sigma, int64_t hard_sqdist, int64_t min_keys,
      const at::Tensor& seed, int64_t roi_offset, bool check_inputs) {
    return plan(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed, roi_offset, at::Tensor(),
                check_inputs);
  }

  // roi_plan with roi_offset a 0-dim int64 tensor: the CUDA kernel reads one on the masks' device (no host
  // sync; the caller, the global loss, computed it there from every rank's ROI count, and its range is not
  // checked); any other (a CPU tensor, or the CPU kernels) is read and checked here as the integer.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_plan_offset_tensor(
      const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
      const c10::optional<at::Tensor>& valid, double delta, double sigma, int64_t hard_sqdist, int64_t min_keys,
      const at::Tensor& seed, const at::Tensor& roi_offset, bool check_inputs) {
    TORCH_CHECK_VALUE(roi_offset.dim() == 0, "roi_offset: expected a 0-dim int64 tensor, got shape ",
                      roi_offset.sizes());
    check_dtype_in(roi_offset, "roi_offset", {at::kLong}, "int64");
    TORCH_CHECK_VALUE(roi_offset.device().is_cpu() || roi_offset.device() == masks.device(),
                      "roi_offset: expected the CPU or ", masks.device(), " (the device of masks), got ",
                      roi_offset.device());
    if (!Device::kReadsOffsetOnDevice || roi_offset.device() != masks.device())
      return roi_plan(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed,
                      *roi_offset.contiguous().data_ptr<int64_t>(), check_inputs);
    return plan(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed, 0, roi_offset.contiguous(),
                check_inputs);
  }

 private:
  // roi_plan, with its ROI offset an integer or (roi_offset_tensor defined; roi_offset is then 0) a tensor on
  // the masks' device that the kernel reads.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> plan(
      const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
      const c10::optional<at::Tensor>& valid, double delta, double sigma, int64_t hard_sqdist, int64_t min_keys,
      const at::Tensor& seed, int64_t roi_offset, const at::Tensor& roi_offset_tensor, bool check_inputs) {
    check_plan_inputs(masks, cams, is_novel, valid, delta);
    check_sampling_params(sigma, min_keys, roi_offset);
    check_seed(seed, masks, "masks");
    const typename Device::Guard guard(masks.device());
    PlanInputs in = mask_inputs(masks, cams, is_novel, valid, delta);
    in.labels_out = in.new_grid(at::kChar);
    add_sampling(in, sigma, hard_sqdist, min_keys, seed, roi_offset);
    in.roi_offset_tensor = roi_offset_tensor;
    run_checked(in, check_inputs);
    return {in.labels_out, in.keys_out, in.keep_out};
  }

  // Runs the kernel; raises on bad values unless check_inputs is false (then they give unspecified results:
  // an ROI with a bad mask, or a novel one without CAMs, is dropped by the sampler).
  static void run_checked(const PlanInputs& in, bool check_inputs) {
    const int32_t errors = Device::run(in, /*read_errors=*/check_inputs);
    if (check_inputs) raise_plan_errors(errors);
  }
};

// Registers a device's kernels of the plan operators (in its TORCH_LIBRARY_IMPL block).
template <typename Device>
void register_plan_ops(torch::Library& m) {
  m.impl("partition", &PlanOps<Device>::partition);
  m.impl("boundary_sqdist", &PlanOps<Device>::boundary_sqdist);
  m.impl("sample_keys", &PlanOps<Device>::sample_keys);
  m.impl("roi_plan", &PlanOps<Device>::roi_plan);
  m.impl("roi_plan.offset_tensor", &PlanOps<Device>::roi_plan_offset_tensor);
}

}  // namespace contrastmask
