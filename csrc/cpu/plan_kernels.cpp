// CPU kernels of the per-ROI plan: partition, boundary_sqdist, sample_keys and the fused roi_plan.
// One ROI per task (at::parallel_for); the per-pixel math lives in csrc/contrastmask/*.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "../contrastmask/edt.h"
#include "../contrastmask/sampling.h"
#include "../ops/checks.h"
#include "plan_job.h"
#include "row_bit_plan.h"

namespace contrastmask {
namespace {

struct RoiScratch {
  explicit RoiScratch(size_t P)
      : mask(P), boundary(P), candidates(P), labels(P), g(P), s(P), t(P), sqdist(P) {}
  std::vector<uint8_t> mask, boundary, candidates;
  std::vector<int8_t> labels;
  std::vector<int16_t> g, s, t;
  std::vector<int32_t> sqdist;
  std::vector<std::pair<uint64_t, int>> ranked;
};

// Copies one ROI's mask as 0/1 bytes; false if some value is neither 0 nor 1.
template <typename mask_t>
bool read_mask(const mask_t* m, int64_t P, uint8_t* out) {
  bool binary = true;
  for (int64_t i = 0; i < P; ++i) {
    const double v = static_cast<double>(m[i]);
    binary = binary && (v == 0.0 || v == 1.0);
    out[i] = v != 0.0;
  }
  return binary;
}

void roi_sqdist(const uint8_t* mask, int H, int W, RoiScratch& sc, int32_t* out) {
  bool any_boundary = false;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const bool b = is_boundary(mask, H, W, y, x);
      sc.boundary[y * W + x] = b;
      any_boundary = any_boundary || b;
    }
  if (!any_boundary) {
    std::fill(out, out + int64_t(H) * W, kNoBoundary);
    return;
  }
  for (int x = 0; x < W; ++x) edt_column_pass(sc.boundary.data(), sc.g.data(), H, W, x);
  for (int y = 0; y < H; ++y) edt_row_pass(sc.g.data(), out, W, y, sc.s.data(), sc.t.data());
}

// Candidate sets, keep rule and the k-smallest-hash sample of one ROI; writes keys, returns keep.
template <typename Job>
bool roi_sample(const Job& job, int64_t n, const int8_t* labels, const int32_t* sqdist, bool novel,
                RoiScratch& sc, uint8_t* keys) {
  const int P = job.H * job.W;
  int counts[kNumSets] = {0, 0, 0, 0};
  int foreground = 0, background = 0;
  for (int i = 0; i < P; ++i) {
    foreground += labels[i] == kForeground;
    background += labels[i] == kBackground;
    // Novel ROIs have no distances; invalid ROIs (all labels -1) need none.
    const int32_t d = (novel || !sqdist) ? kNoBoundary : sqdist[i];
    const uint8_t c = candidate_sets(labels[i], d, novel, job.hard_sqdist);
    sc.candidates[i] = c;
    for (int s = 0; s < kNumSets; ++s) counts[s] += (c >> s) & 1;
  }
  std::fill_n(keys, static_cast<size_t>(job.H) * static_cast<size_t>(job.W), uint8_t(0));
  if (!roi_kept(counts, foreground, background, job.min_keys)) return false;
  for (int s = 0; s < kNumSets; ++s) {
    sc.ranked.clear();
    for (int i = 0; i < P; ++i)
      if ((sc.candidates[i] >> s) & 1) sc.ranked.emplace_back(key_hash(job.mixed_seed, n + job.roi_offset, s, i), i);
    const int k = sample_count(job.sigma, counts[s]);
    auto before = [](const std::pair<uint64_t, int>& a, const std::pair<uint64_t, int>& b) {
      return hash_before(a.first, a.second, b.first, b.second);
    };
    if (k < static_cast<int>(sc.ranked.size()))
      std::nth_element(sc.ranked.begin(), sc.ranked.begin() + k, sc.ranked.end(), before);
    for (int j = 0; j < k; ++j) keys[sc.ranked[j].second] |= uint8_t(1u << s);
  }
  return true;
}

template <typename Job>
int32_t run_plan(const Job& job) {
  const int64_t P = int64_t(job.H) * job.W;
  std::atomic<int32_t> errors{0};
  at::parallel_for(0, job.N, 1, [&](int64_t begin, int64_t end) {
    RoiScratch sc(static_cast<size_t>(P));
    int32_t local_errors = 0;
    for (int64_t n = begin; n < end; ++n) {
      const bool novel = job.is_novel ? job.is_novel[n] : false;
      const bool valid = job.valid ? job.valid[n] : true;
      const uint8_t* mask = nullptr;
      if (job.masks) {
        if (!read_mask(job.masks + n * P, P, sc.mask.data())) local_errors |= kMaskNotBinary;
        mask = sc.mask.data();
      }
      // Labels: computed from masks/CAMs, or given (sample_keys).
      const int8_t* labels = job.labels_in ? job.labels_in + n * P : nullptr;
      if (!labels && (job.labels_out || job.keys_out)) {
        int8_t* out = job.labels_out ? job.labels_out + n * P : sc.labels.data();
        if (novel && !job.cams) local_errors |= kMissingCams;
        const auto* cam = job.cams ? job.cams + n * P : nullptr;
        for (int64_t i = 0; i < P; ++i)
          out[i] = partition_label(valid, novel, mask[i] != 0, cam ? cam[i] : decltype(job.thr_fg)(0),
                                   job.thr_fg, job.thr_bg);
        labels = out;
      }
      // Distances: every ROI for boundary_sqdist, base ROIs for the fused plan, given for sample_keys.
      const int32_t* sqdist = job.sqdist_in ? job.sqdist_in + n * P : nullptr;
      if (!sqdist && mask && (job.sqdist_all_rois || (job.keys_out && valid && !novel))) {
        int32_t* out = job.sqdist_out ? job.sqdist_out + n * P : sc.sqdist.data();
        roi_sqdist(mask, job.H, job.W, sc, out);
        sqdist = out;
      }
      if (job.keys_out) {
        const bool keep =
            local_errors == 0 && valid && roi_sample(job, n, labels, sqdist, novel, sc, job.keys_out + n * P);
        if (!keep) std::fill(job.keys_out + n * P, job.keys_out + (n + 1) * P, uint8_t(0));
        job.keep_out[n] = keep;
      }
    }
    if (local_errors) errors.fetch_or(local_errors);
  });
  return errors.load();
}

// Fills the mask/CAM part of a job from tensors, dispatching over their dtypes.
template <typename Fn>
void with_plan_inputs(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, double delta, Fn&& fn) {
  at::Tensor cams_c;
  bool double_cams = false;
  double thr_fg = 0, thr_bg = 0;
  if (cams.has_value()) {
    double_cams = cams->scalar_type() == at::kDouble;
    thr_fg = round_to_dtype(1.0 - delta, cams->scalar_type());
    thr_bg = round_to_dtype(delta, cams->scalar_type());
    // float16/bfloat16 CAMs widen exactly to float32, and so do their rounded thresholds.
    cams_c = double_cams ? cams->contiguous() : cams->to(at::kFloat).contiguous();
  }
  const at::Tensor masks_c = masks.contiguous();
  // The dtypes check_masks() admits.
  AT_DISPATCH_FLOATING_TYPES_AND4(at::kBool, at::kByte, at::kHalf, at::kBFloat16, masks_c.scalar_type(),
                                  "contrastmask_plan", [&] {
    using mask_t = scalar_t;
    auto run = [&](auto cam_zero) {
      using cam_t = decltype(cam_zero);
      PlanJob<mask_t, cam_t> job;
      job.N = masks_c.size(0);
      job.H = static_cast<int>(masks_c.size(1));
      job.W = static_cast<int>(masks_c.size(2));
      job.masks = masks_c.data_ptr<mask_t>();
      job.cams = cams_c.defined() ? cams_c.data_ptr<cam_t>() : nullptr;
      job.thr_fg = static_cast<cam_t>(thr_fg);
      job.thr_bg = static_cast<cam_t>(thr_bg);
      fn(job);
    };
    if (double_cams) run(double(0)); else run(float(0));
  });
}

at::Tensor optional_contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

at::Tensor partition_cpu(const at::Tensor& masks, const c10::optional<at::Tensor>& cams, const at::Tensor& is_novel,
                         const c10::optional<at::Tensor>& valid, double delta) {
  check_plan_inputs(masks, cams, is_novel, valid, delta);
  at::Tensor labels = at::empty(masks.sizes(), masks.options().dtype(at::kChar));
  const at::Tensor novel_c = is_novel.contiguous(), valid_c = optional_contiguous(valid);
  int32_t errors = 0;
  with_plan_inputs(masks, cams, delta, [&](auto& job) {
    job.is_novel = novel_c.data_ptr<bool>();
    job.valid = valid_c.defined() ? valid_c.data_ptr<bool>() : nullptr;
    job.labels_out = labels.data_ptr<int8_t>();
    errors = run_plan(job);
  });
  raise_plan_errors(errors);
  return labels;
}

at::Tensor boundary_sqdist_cpu(const at::Tensor& masks) {
  check_masks(masks);
  at::Tensor sqdist = at::empty(masks.sizes(), masks.options().dtype(at::kInt));
  int32_t errors = 0;
  with_plan_inputs(masks, c10::nullopt, 0.0, [&](auto& job) {
    job.sqdist_all_rois = true;
    job.sqdist_out = sqdist.data_ptr<int32_t>();
    errors = run_plan(job);
  });
  raise_plan_errors(errors);
  return sqdist;
}

std::tuple<at::Tensor, at::Tensor> sample_keys_cpu(const at::Tensor& labels, const at::Tensor& sqdist,
                                                   const at::Tensor& is_novel, double sigma, int64_t hard_sqdist,
                                                   int64_t min_keys, const at::Tensor& seed, int64_t roi_offset) {
  check_sample_inputs(labels, sqdist, is_novel, sigma, min_keys, seed, roi_offset);
  const at::Tensor labels_c = labels.contiguous(), sqdist_c = sqdist.contiguous(), novel_c = is_novel.contiguous();
  at::Tensor keys = at::empty(labels.sizes(), labels.options().dtype(at::kByte));
  at::Tensor keep = at::empty({labels.size(0)}, labels.options().dtype(at::kBool));
  PlanJob<uint8_t, float> job;
  job.N = labels.size(0);
  job.H = static_cast<int>(labels.size(1));
  job.W = static_cast<int>(labels.size(2));
  job.is_novel = novel_c.data_ptr<bool>();
  job.labels_in = labels_c.data_ptr<int8_t>();
  job.sqdist_in = sqdist_c.data_ptr<int32_t>();
  job.keys_out = keys.data_ptr<uint8_t>();
  job.keep_out = keep.data_ptr<bool>();
  job.sigma = sigma;
  job.hard_sqdist = hard_sqdist;
  job.min_keys = min_keys;
  job.mixed_seed = mixed_host_seed(seed);
  job.roi_offset = roi_offset;
  run_plan(job);
  return {keys, keep};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> roi_plan_cpu(const at::Tensor& masks,
                                                            const c10::optional<at::Tensor>& cams,
                                                            const at::Tensor& is_novel,
                                                            const c10::optional<at::Tensor>& valid, double delta,
                                                            double sigma, int64_t hard_sqdist, int64_t min_keys,
                                                            const at::Tensor& seed, int64_t roi_offset) {
  check_plan_inputs(masks, cams, is_novel, valid, delta);
  check_sampling_params(sigma, min_keys, roi_offset);
  check_seed(seed, masks, "masks");
  at::Tensor labels = at::empty(masks.sizes(), masks.options().dtype(at::kChar));
  at::Tensor keys = at::empty(masks.sizes(), masks.options().dtype(at::kByte));
  at::Tensor keep = at::empty({masks.size(0)}, masks.options().dtype(at::kBool));
  const at::Tensor novel_c = is_novel.contiguous(), valid_c = optional_contiguous(valid);
  int32_t errors = 0;
  with_plan_inputs(masks, cams, delta, [&](auto& job) {
    job.is_novel = novel_c.data_ptr<bool>();
    job.valid = valid_c.defined() ? valid_c.data_ptr<bool>() : nullptr;
    job.labels_out = labels.data_ptr<int8_t>();
    job.keys_out = keys.data_ptr<uint8_t>();
    job.keep_out = keep.data_ptr<bool>();
    job.sigma = sigma;
    job.hard_sqdist = hard_sqdist;
    job.min_keys = min_keys;
    job.mixed_seed = mixed_host_seed(seed);
    job.roi_offset = roi_offset;
    errors = job.W <= kMaxRowBitsWidth ? run_row_bit_plan(job) : run_plan(job);
  });
  raise_plan_errors(errors);
  return {labels, keys, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastmask, CPU, m) {
  m.impl("partition", &partition_cpu);
  m.impl("boundary_sqdist", &boundary_sqdist_cpu);
  m.impl("sample_keys", &sample_keys_cpu);
  m.impl("roi_plan", &roi_plan_cpu);
}

}  // namespace contrastmask
