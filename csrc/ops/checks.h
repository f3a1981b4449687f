// Argument checks shared by the CPU and CUDA kernels: shapes, dtypes, devices and parameters.
// Every message starts with the argument's name. Values (masks being 0/1, CAMs present for novel
// ROIs) are checked inside the kernels, which report through plan_error_message().
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <string>

#include "../contrastmask/sampling.h"

namespace contrastmask {

// Temperatures below this are refused: 1 / t must stay far from float32's range (the logits s / t
// reach 1 / t), so that finite inputs give a finite loss and gradient. Python: _validation.MIN_TEMPERATURE.
constexpr double kMinTemperature = 1e-4;

// A number as the shortest text that reads back to it, as Python's repr writes it ("-1.0", "1e-04"):
// the stream's default 6 digits would report sigma = 1.0000001 as "got 1".
inline std::string full(double v) {
  char buf[32];
  std::string text(buf, std::to_chars(buf, buf + sizeof(buf), v).ptr);
  if (text.find_first_not_of("-0123456789") == std::string::npos) text += ".0";  // an integral value
  return text;
}

// Bits a plan kernel sets in its error word.
enum PlanError : int32_t { kMaskNotBinary = 1, kMissingCams = 2 };

inline void check_dtype_in(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> ok,
                           const char* expected) {
  bool found = false;
  for (auto s : ok) found = found || t.scalar_type() == s;
  TORCH_CHECK_VALUE(found, name, ": expected dtype ", expected, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected device ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
}

// (N, H, W) with H * W <= kMaxPixels.
inline void check_roi_grid(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, name, ": expected shape (N, H, W), got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) >= 1 && t.size(2) >= 1, name, ": expected H >= 1 and W >= 1, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) * t.size(2) <= kMaxPixels, name, ": H * W = ", t.size(1) * t.size(2),
                    " exceeds the limit of ", kMaxPixels, " pixels per ROI");
}

inline void check_same_grid(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(),
                    " (that of ", ref_name, "), got ", t.sizes());
  check_same_device(t, name, ref, ref_name);
}

inline void check_per_roi_flags(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(0), name, ": expected shape (", ref.size(0),
                    ",) (one flag per ROI of ", ref_name, "), got ", t.sizes());
  check_dtype_in(t, name, {at::kBool}, "bool");
  check_same_device(t, name, ref, ref_name);
}

inline void check_masks(const at::Tensor& masks) {
  check_roi_grid(masks, "masks");
  check_dtype_in(masks, "masks", {at::kBool, at::kByte, at::kHalf, at::kBFloat16, at::kFloat, at::kDouble},
                 "bool, uint8 or floating");
}

inline void check_plan_inputs(const at::Tensor& masks, const c10::optional<at::Tensor>& cams,
                              const at::Tensor& is_novel, const c10::optional<at::Tensor>& valid, double delta) {
  check_masks(masks);
  if (cams.has_value()) {
    check_same_grid(*cams, "cams", masks, "masks");
    TORCH_CHECK_VALUE(at::isFloatingType(cams->scalar_type()), "cams: expected a floating dtype, got ",
                      cams->scalar_type());
  }
  check_per_roi_flags(is_novel, "is_novel", masks, "masks");
  if (valid.has_value()) check_per_roi_flags(*valid, "valid", masks, "masks");
  TORCH_CHECK_VALUE(delta >= 0.0 && delta <= 0.5, "delta: expected a value in [0, 0.5], got ", full(delta));
}

inline void check_sampling_params(double sigma, int64_t min_keys, int64_t roi_offset) {
  TORCH_CHECK_VALUE(sigma > 0.0 && sigma <= 1.0, "sigma: expected a value in (0, 1], got ", full(sigma));
  TORCH_CHECK_VALUE(min_keys >= 0, "min_keys: expected a value >= 0, got ", min_keys);
  TORCH_CHECK_VALUE(roi_offset >= 0, "roi_offset: expected a value >= 0, got ", roi_offset);
}

// The sampler's seed: a 0-dim int64 tensor on the CPU or on the device of ref (where the kernel reads it).
inline void check_seed(const at::Tensor& seed, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(seed.dim() == 0, "seed: expected a 0-dim int64 tensor, got shape ", seed.sizes());
  check_dtype_in(seed, "seed", {at::kLong}, "int64");
  TORCH_CHECK_VALUE(seed.device().is_cpu() || seed.device() == ref.device(), "seed: expected the CPU or ",
                    ref.device(), " (the device of ", ref_name, "), got ", seed.device());
}

inline void check_sample_inputs(const at::Tensor& labels, const at::Tensor& sqdist, const at::Tensor& is_novel,
                                double sigma, int64_t min_keys, const at::Tensor& seed, int64_t roi_offset) {
  check_roi_grid(labels, "labels");
  check_dtype_in(labels, "labels", {at::kChar}, "int8");
  check_same_grid(sqdist, "sqdist", labels, "labels");
  check_dtype_in(sqdist, "sqdist", {at::kInt}, "int32");
  check_per_roi_flags(is_novel, "is_novel", labels, "labels");
  check_sampling_params(sigma, min_keys, roi_offset);
  check_seed(seed, labels, "labels");
}

inline void check_loss_inputs(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys,
                              const at::Tensor& keep, double tau_easy, double tau_hard) {
  TORCH_CHECK_VALUE(z.dim() == 4, "z: expected shape (N, C, H, W), got ", z.sizes());
  check_dtype_in(z, "z", {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(z.size(1) >= 1, "z: expected at least one channel, got shape ", z.sizes());
  check_roi_grid(labels, "labels");
  check_dtype_in(labels, "labels", {at::kChar}, "int8");
  // A mismatch blames z: the plan (labels, keys, keep) comes from the masks, z from the caller's network.
  TORCH_CHECK_VALUE(labels.size(0) == z.size(0) && labels.size(1) == z.size(2) && labels.size(2) == z.size(3),
                    "z: expected N, H, W of the plan (labels ", labels.sizes(), "), got shape ", z.sizes());
  check_same_device(labels, "labels", z, "z");
  check_same_grid(keys, "keys", labels, "labels");
  check_dtype_in(keys, "keys", {at::kByte}, "uint8");
  check_per_roi_flags(keep, "keep", labels, "labels");
  TORCH_CHECK_VALUE(tau_easy >= kMinTemperature, "tau_easy: expected a temperature >= ", full(kMinTemperature),
                    ", got ", full(tau_easy));
  TORCH_CHECK_VALUE(tau_hard >= kMinTemperature, "tau_hard: expected a temperature >= ", full(kMinTemperature),
                    ", got ", full(tau_hard));
}

inline void raise_plan_errors(int32_t errors) {
  TORCH_CHECK_VALUE(!(errors & kMaskNotBinary), "masks: expected values 0 or 1 only");
  TORCH_CHECK_VALUE(!(errors & kMissingCams), "cams: required when some ROI is novel (is_novel has a True entry)");
}

}  // namespace contrastmask
