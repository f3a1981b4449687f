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
#include "../ops/plan_inputs.h"
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
      // this ROI's own errors decide its keep (not the chunk's: one bad ROI drops only itself)
      int32_t roi_errors = 0;
      const bool novel = job.is_novel ? job.is_novel[n] : false;
      const bool valid = job.valid ? job.valid[n] : true;
      const uint8_t* mask = nullptr;
      if (job.masks) {
        if (!read_mask(job.masks + n * P, P, sc.mask.data())) roi_errors |= kMaskNotBinary;
        mask = sc.mask.data();
      }
      // Labels: computed from masks/CAMs, or given (sample_keys).
      const int8_t* labels = job.labels_in ? job.labels_in + n * P : nullptr;
      if (!labels && (job.labels_out || job.keys_out)) {
        int8_t* out = job.labels_out ? job.labels_out + n * P : sc.labels.data();
        if (novel && !job.cams) roi_errors |= kMissingCams;
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
            roi_errors == 0 && valid && roi_sample(job, n, labels, sqdist, novel, sc, job.keys_out + n * P);
        if (!keep) std::fill(job.keys_out + n * P, job.keys_out + (n + 1) * P, uint8_t(0));
        job.keep_out[n] = keep;
      }
      local_errors |= roi_errors;
    }
    if (local_errors) errors.fetch_or(local_errors);
  });
  return errors.load();
}

// The CPU side of PlanOps (ops/plan_inputs.h): a PlanJob for the mask and CAM dtypes, run by the per-ROI
// loop, or by the row-bitmask path for the fused plan on grids up to 64 pixels wide. CudaPlan::run
// (csrc/cuda/plan_kernels.cu) is its twin for the kernel's arguments.
struct CpuPlan {
  static constexpr bool kReadsOffsetOnDevice = false;  // a roi_offset tensor is a CPU tensor, read by the host
  struct Guard {  // the CPU needs no device guard
    explicit Guard(const c10::Device&) {}
  };

  static int32_t run(const PlanInputs& in, bool /*read_errors: the host has them at no cost*/) {
    int32_t errors = 0;
    dispatch_mask_dtype(in.mask_dtype(), [&](auto mask_zero) {
      using mask_t = decltype(mask_zero);
      auto run_job = [&](auto cam_zero) {
        using cam_t = decltype(cam_zero);
        PlanJob<mask_t, cam_t> job;
        set_plan_steps(job, in, /*kernel_reads_seed=*/false);
        job.masks = data_or_null<mask_t>(in.masks);
        job.cams = data_or_null<cam_t>(in.cams);
        job.thr_fg = static_cast<cam_t>(in.thr_fg);
        job.thr_bg = static_cast<cam_t>(in.thr_bg);
        errors = in.fused() && job.W <= kMaxRowBitsWidth ? run_row_bit_plan(job) : run_plan(job);
      };
      if (in.double_cams()) {
        run_job(double(0));
      } else {
        run_job(float(0));
      }
    });
    return errors;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(contrastmask, CPU, m) { register_plan_ops<CpuPlan>(m); }

}  // namespace contrastmask
