// CUDA kernels of the per-ROI plan: partition, boundary_sqdist, sample_keys and the fused roi_plan.
// One block per ROI, everything of the ROI in shared memory: partition labels, boundary, exact EDT
// (edt_column_pass with a thread per column, then edt_row_pass with a thread per row), candidate
// sets and the k-smallest-hash sample. Same per-pixel math as the CPU kernels (csrc/contrastmask/*.h),
// so the integer outputs are identical. Bad values (masks not 0/1, CAMs missing for a novel ROI) are
// OR-ed into a device error word, read back once after the kernel and raised by raise_plan_errors():
// no device asserts, which would kill the process.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <mutex>
#include <vector>

#include "../contrastmask/edt.h"
#include "../contrastmask/plan_steps.h"
#include "../contrastmask/sampling.h"
#include "../ops/plan_inputs.h"
#include "../ops/library.h"
#include "platform.cuh"
#include "reduce.cuh"

namespace contrastmask {
namespace {

using cuda::ceil_div;

constexpr int kPlanMaxThreads = 512;
constexpr int kDefaultSharedLimit = 48 * 1024;

// What one call asks of the per-ROI kernel (the steps, as on the CPU, plus where the inputs live).
template <typename mask_t>
struct PlanArgs : PlanSteps {
  const mask_t* masks = nullptr;    // (N, H, W) 0/1
  const float* cams_f = nullptr;    // (N, H, W) float32 CAMs (float16/bfloat16 widened on the host) ...
  const double* cams_d = nullptr;   // ... or float64 CAMs; both null when no ROI is novel
  float thr_fg_f = 0.f, thr_bg_f = 0.f;
  double thr_fg_d = 0.0, thr_bg_d = 0.0;  // CAM thresholds, already rounded to the CAM's dtype
  int32_t* errors = nullptr;        // device error word (PlanError bits), may be null when none can occur
};

// splitmix64(seed) for the kernel: read from the seed tensor on the device (no host sync; a CUDA graph
// replays with whatever value it holds then), or as the host mixed a CPU seed.
__device__ __forceinline__ uint64_t kernel_mixed_seed(const PlanSteps& a) {
  return a.seed_on_device ? splitmix64(static_cast<uint64_t>(*a.seed_on_device)) : a.mixed_seed;
}

// Dynamic shared memory of one ROI, in bytes, with Pa = P rounded up to 8:
//   [0, 11 Pa)  phase 1 (EDT): sqdist int32 | g int16 | s int16 | t int16 | boundary uint8
//               phase 2 (sampling, after the candidate sets are known): hash uint64 | index int16
//   then mask uint8, labels int8, candidate bits uint8, key bits uint8 (Pa each).
// The accessors are a table of named offsets, one line each, not repeated logic.
struct PlanLayout {
  int Pa;
  __host__ __device__ constexpr explicit PlanLayout(int P) : Pa((P + 7) / 8 * 8) {}
  __host__ __device__ constexpr size_t bytes() const { return size_t(15) * Pa; }
  __host__ __device__ size_t sqdist() const { return 0; }
  __host__ __device__ size_t g() const { return size_t(4) * Pa; }
  __host__ __device__ size_t s() const { return size_t(6) * Pa; }
  __host__ __device__ size_t t() const { return size_t(8) * Pa; }
  __host__ __device__ size_t boundary() const { return size_t(10) * Pa; }
  __host__ __device__ size_t hash() const { return 0; }
  __host__ __device__ size_t index() const { return size_t(8) * Pa; }
  __host__ __device__ size_t mask() const { return size_t(11) * Pa; }
  __host__ __device__ size_t labels() const { return size_t(12) * Pa; }
  __host__ __device__ size_t candidates() const { return size_t(13) * Pa; }
  __host__ __device__ size_t keys() const { return size_t(14) * Pa; }
};

template <typename mask_t>
__device__ __forceinline__ double mask_value(mask_t v) {
  return static_cast<double>(v);
}
template <>
__device__ __forceinline__ double mask_value<c10::Half>(c10::Half v) {
  return static_cast<double>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double mask_value<c10::BFloat16>(c10::BFloat16 v) {
  return static_cast<double>(static_cast<float>(v));
}

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;
// The histogram lives padded, one spare word after every 32 bins: warp 0's scan has lane l read bins
// 8l..8l+7, which unpadded fall in 4 banks (an 8-way conflict, the hottest line of the plan in the
// memory-traffic model); with the pad, lane l's bin 8l+q sits at 8l+q+l/4, 32 distinct banks.
constexpr int kHistWords = kRadixBins + kRadixBins / cuda::kWarp;
__device__ __forceinline__ int hist_slot(int bin) { return bin + bin / cuda::kWarp; }
// Static __shared__ arrays of roi_plan_kernel (counts, list_len, roi_errors, hist, sel) as an upper bound in
// bytes, rounded up to 256 for the compiler's alignment: a GPU's default 48 KB limit counts static and dynamic
// shared memory together. allow_plan_shared_memory checks the kernel's real figure against it.
constexpr size_t kPlanStaticSharedBound =
    (sizeof(int) * ((kNumSets + 2) + kNumSets + 1 + kHistWords + 3) + 255) / 256 * 256;

// Samples set s: sets bit s in keys_s for the k smallest (hash, pixel) pairs of its c candidates
// (0 < k < c), in time linear in c. The candidates' pairs are compacted into a list (their order does
// not matter), then a radix select over the hash, 8 bits per round from the top, narrows the digit
// prefix of the k-th smallest hash until the candidates sharing it are exactly the ones still to pick
// (usually after two rounds); candidates below the prefix are picked. Only an exact 64-bit hash tie
// at the k-th place needs the pixel order. `hist` is zero on entry; block-uniform arguments.
__device__ void select_k_smallest(const uint8_t* cand_s, int s, int P, int c, int k, uint64_t stream,
                                  uint64_t* hash_s, int16_t* idx_s, int* list_len, int* hist, int* sel,
                                  uint8_t* keys_s) {
  const int tid = threadIdx.x, T = blockDim.x;
  int shift = 64 - kRadixBits;
  // Compact the set's (hash, pixel) pairs and count the hashes' top digits.
  for (int i = tid; i < P; i += T) {
    if ((cand_s[i] >> s) & 1) {
      const uint64_t h = stream_hash(stream, i);
      const int pos = atomicAdd(&list_len[s], 1);
      hash_s[pos] = h;
      idx_s[pos] = static_cast<int16_t>(i);
      atomicAdd(&hist[hist_slot(static_cast<int>(h >> shift))], 1);
    }
  }
  __syncthreads();  // the list and its histogram are complete
  uint64_t prefix = 0;  // digits of the k-th smallest hash found so far (bits >= shift)
  int rest = k;         // candidates still to pick among those sharing the prefix
  int in_bucket = 0;
  while (true) {
    // Warp 0 finds the digit holding the rest-th smallest: lane l scans bins 8l..8l+7.
    if (tid < cuda::kWarp) {
      constexpr int kPerLane = kRadixBins / cuda::kWarp;
      int local[kPerLane], sum = 0;
      for (int q = 0; q < kPerLane; ++q) sum += local[q] = hist[hist_slot(tid * kPerLane + q)];
      int incl = sum;
      for (int offset = 1; offset < cuda::kWarp; offset *= 2) {
        const int v = __shfl_up_sync(cuda::kFullMask, incl, offset);
        if (tid >= offset) incl += v;
      }
      int below = incl - sum;
      if (below < rest && rest <= incl) {
        int q = 0;
        while (below + local[q] < rest) below += local[q++];
        sel[0] = tid * kPerLane + q;
        sel[1] = below;
        sel[2] = local[q];
      }
    }
    __syncthreads();
    prefix |= static_cast<uint64_t>(sel[0]) << shift;
    rest -= sel[1];
    in_bucket = sel[2];
    if (in_bucket == rest || shift == 0) break;
    for (int j = tid; j < kHistWords; j += T) hist[j] = 0;
    __syncthreads();  // every thread has read sel and warp 0 the histogram
    const uint64_t decided = ~0ull << shift;
    shift -= kRadixBits;
    for (int e = tid; e < c; e += T) {
      const uint64_t h = hash_s[e];
      if ((h & decided) == prefix) atomicAdd(&hist[hist_slot(static_cast<int>((h >> shift) & (kRadixBins - 1)))], 1);
    }
    __syncthreads();
  }
  // Picked: below the prefix, or sharing it when the whole bucket is wanted (else, on a full 64-bit
  // tie, by pixel index among the tied candidates).
  const uint64_t decided = ~0ull << shift;
  for (int e = tid; e < c; e += T) {
    const uint64_t h = hash_s[e];
    const int pixel = idx_s[e];
    bool picked = (h & decided) < prefix;
    if ((h & decided) == prefix) {
      if (in_bucket == rest) {
        picked = true;
      } else {
        int tied_before = 0;
        for (int j = 0; j < c; ++j) tied_before += hash_s[j] == h && idx_s[j] < pixel;
        picked = tied_before < rest;
      }
    }
    if (picked) keys_s[pixel] |= static_cast<uint8_t>(1u << s);
  }
}

template <typename mask_t>
__global__ void __launch_bounds__(kPlanMaxThreads) roi_plan_kernel(const PlanArgs<mask_t> a) {
  CM_DYNAMIC_SHARED(unsigned char, smem, 16);
  CM_SHARED(int, counts, [kNumSets + 2]);  // candidate sets, then foreground and background pixels
  CM_SHARED(int, list_len, [kNumSets]);
  CM_SHARED(int, roi_errors);
  CM_SHARED(int, hist, [kHistWords]);  // radix select: candidates per digit (padded: hist_slot)
  CM_SHARED(int, sel, [3]);            // radix select: the chosen digit, candidates below it, in it

  const int64_t n = blockIdx.x;
  const int H = a.H, W = a.W, P = H * W;
  const int tid = threadIdx.x, T = blockDim.x;
  const PlanLayout lay(P);
  int32_t* sq_s = reinterpret_cast<int32_t*>(smem + lay.sqdist());
  int16_t* g_s = reinterpret_cast<int16_t*>(smem + lay.g());
  int16_t* s_s = reinterpret_cast<int16_t*>(smem + lay.s());
  int16_t* t_s = reinterpret_cast<int16_t*>(smem + lay.t());
  uint8_t* bnd_s = smem + lay.boundary();
  uint64_t* hash_s = reinterpret_cast<uint64_t*>(smem + lay.hash());
  int16_t* idx_s = reinterpret_cast<int16_t*>(smem + lay.index());
  uint8_t* mask_s = smem + lay.mask();
  int8_t* lab_s = reinterpret_cast<int8_t*>(smem + lay.labels());
  uint8_t* cand_s = smem + lay.candidates();
  uint8_t* keys_s = smem + lay.keys();

  const bool novel = a.is_novel ? a.is_novel[n] : false;
  const bool valid = a.valid ? a.valid[n] : true;
  if (tid < kNumSets + 2) counts[tid] = 0;
  if (tid < kNumSets) list_len[tid] = 0;
  if (tid == 0) roi_errors = 0;
  __syncthreads();

  // Masks (checked 0/1) and labels: computed from masks/CAMs, or given (sample_keys).
  const bool compute_labels = !a.labels_in && (a.labels_out || a.keys_out);
  const bool has_cams = a.cams_f || a.cams_d;
  int my_errors = 0;
  if (compute_labels && novel && !has_cams) my_errors |= kMissingCams;
  const int64_t base = n * P;
  for (int i = tid; i < P; i += T) {
    bool on = false;
    if (a.masks) {
      const double v = mask_value(a.masks[base + i]);
      if (!(v == 0.0 || v == 1.0)) my_errors |= kMaskNotBinary;
      on = v != 0.0;
      mask_s[i] = on;
    }
    if (compute_labels) {
      // CAMs are read only where they decide the label (novel, valid ROIs).
      const bool use_cam = novel && valid;
      const int8_t label =
          a.cams_d ? partition_label<double>(valid, novel, on, use_cam ? a.cams_d[base + i] : 0.0, a.thr_fg_d,
                                             a.thr_bg_d)
                   : partition_label<float>(valid, novel, on, use_cam && a.cams_f ? a.cams_f[base + i] : 0.f,
                                            a.thr_fg_f, a.thr_bg_f);
      lab_s[i] = label;
      if (a.labels_out) a.labels_out[base + i] = label;
    } else if (a.labels_in && a.keys_out) {
      lab_s[i] = a.labels_in[base + i];
    }
  }
  if (my_errors) atomicOr(&roi_errors, my_errors);  // integer OR in shared memory: order-independent
  __syncthreads();
  const int errors = roi_errors;  // the same in every thread from here on

  // Distances: every ROI for boundary_sqdist, valid base ROIs for the fused plan, given for sample_keys.
  const bool compute_sqdist = !a.sqdist_in && a.masks && (a.sqdist_all_rois || (a.keys_out && valid && !novel));
  if (compute_sqdist) {
    int any_boundary = 0;
    for (int i = tid; i < P; i += T) {
      const bool b = is_boundary(mask_s, H, W, i / W, i % W);
      bnd_s[i] = b;
      any_boundary |= b;
    }
    if (__syncthreads_or(any_boundary)) {
      for (int x = tid; x < W; x += T) edt_column_pass(bnd_s, g_s, H, W, x);
      __syncthreads();
      for (int y = tid; y < H; y += T) edt_row_pass(g_s, sq_s, W, y, s_s + y * W, t_s + y * W);
    } else {
      for (int i = tid; i < P; i += T) sq_s[i] = kNoBoundary;
    }
    __syncthreads();
    if (a.sqdist_out)
      for (int i = tid; i < P; i += T) a.sqdist_out[base + i] = sq_s[i];
  }

  if (a.keys_out) {
    bool kept = false;
    if (valid && errors == 0) {  // block-uniform
      // Candidate sets and their sizes (integer counts: exact whatever the order).
      int local[kNumSets + 2] = {0, 0, 0, 0, 0, 0};
      for (int i = tid; i < P; i += T) {
        const int8_t label = lab_s[i];
        const int32_t d = novel ? kNoBoundary : (a.sqdist_in ? a.sqdist_in[base + i] : (compute_sqdist ? sq_s[i] : kNoBoundary));
        const uint8_t c = candidate_sets(label, d, novel, a.hard_sqdist);
        cand_s[i] = c;
        keys_s[i] = 0;
        for (int s = 0; s < kNumSets; ++s) local[s] += (c >> s) & 1;
        local[kNumSets] += label == kForeground;
        local[kNumSets + 1] += label == kBackground;
      }
      for (int k = 0; k < kNumSets + 2; ++k)
        if (local[k]) atomicAdd(&counts[k], local[k]);
      for (int j = tid; j < kHistWords; j += T) hist[j] = 0;
      __syncthreads();
      kept = roi_kept(counts, counts[kNumSets], counts[kNumSets + 1], a.min_keys);
      if (kept) {
        const uint64_t mixed_seed = kernel_mixed_seed(a);
        const int64_t roi_offset = a.roi_offset_on_device ? *a.roi_offset_on_device : a.roi_offset;
        for (int s = 0; s < kNumSets; ++s) {
          const int c = counts[s];
          const int k = sample_count(a.sigma, c);
          const uint8_t bit = static_cast<uint8_t>(1u << s);
          if (k >= c) {  // the whole set: no hashes needed
            for (int i = tid; i < P; i += T)
              if ((cand_s[i] >> s) & 1) keys_s[i] |= bit;
          } else {
            select_k_smallest(cand_s, s, P, c, k, key_stream(mixed_seed, n + roi_offset, s), hash_s, idx_s,
                              list_len, hist, sel, keys_s);
          }
          // Before the next set reuses the list and the histogram (zeroed here for it).
          for (int j = tid; j < kHistWords; j += T) hist[j] = 0;
          __syncthreads();
        }
      }
    }
    for (int i = tid; i < P; i += T) a.keys_out[base + i] = kept ? keys_s[i] : uint8_t(0);
    if (tid == 0) a.keep_out[n] = kept;
  }
  if (tid == 0 && errors && a.errors) atomicOr(a.errors, errors);
}

int plan_threads(int P) { return P <= 256 ? 128 : (P <= 1024 ? 256 : kPlanMaxThreads); }

// Lets the plan kernel instance use the dynamic shared memory of the largest ROI grid (kMaxPixels),
// once per device: setting it per call to the call's size could race with another host thread
// lowering it between its cudaFuncSetAttribute and our launch.
template <typename mask_t>
void allow_plan_shared_memory() {
  constexpr size_t kMaxDynamic = PlanLayout(kMaxPixels).bytes();
  static std::mutex mutex;
  static std::vector<bool> done;  // per device index
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) < done.size() && done[device]) return;
  auto kernel = roi_plan_kernel<mask_t>;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(attributes.sharedSizeBytes <= kPlanStaticSharedBound, "roi_plan: the plan kernel has ",
              attributes.sharedSizeBytes, " bytes of static shared memory, over kPlanStaticSharedBound (",
              kPlanStaticSharedBound, "): raise the bound");
  TORCH_CHECK(kMaxDynamic + attributes.sharedSizeBytes <= static_cast<size_t>(optin), "roi_plan: the plan kernel ",
              "needs ", kMaxDynamic, " bytes of dynamic and ", attributes.sharedSizeBytes, " bytes of static shared ",
              "memory per block; device ", device, " allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(kMaxDynamic)));
  if (done.size() <= static_cast<size_t>(device)) done.resize(device + 1, false);
  done[device] = true;
}

// Launches the per-ROI kernel for N ROIs; returns the error bits (one device-to-host copy) when
// `read_errors`, else 0 without any host sync.
template <typename mask_t>
int32_t launch_plan(PlanArgs<mask_t> a, const at::TensorOptions& opts, bool read_errors) {
  const int64_t N = a.N;
  if (N == 0) return 0;
  at::Tensor errors;
  if (read_errors) {
    errors = at::zeros({1}, opts.dtype(at::kInt));
    a.errors = errors.data_ptr<int32_t>();
  }
  const int P = a.H * a.W;
  const size_t smem = PlanLayout(P).bytes();
  if (smem + kPlanStaticSharedBound > kDefaultSharedLimit) allow_plan_shared_memory<mask_t>();
  TORCH_CHECK(N <= 2147483647, "roi_plan: too many ROIs for one launch (", N, ")");
  CM_LAUNCH(static_cast<unsigned>(N), plan_threads(P), smem, c10::cuda::getCurrentCUDAStream(),
            roi_plan_kernel<mask_t>)(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return read_errors ? errors.item<int32_t>() : 0;
}

// The CUDA side of PlanOps (ops/plan_inputs.h): the kernel's arguments for the mask dtype, and one launch.
// CpuPlan::run (csrc/cpu/plan_kernels.cpp) is its twin for the CPU job.
// CAMs are float32 (float16/bfloat16 widened exactly, as on the CPU) or float64.
struct CudaPlan {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr bool kReadsOffsetOnDevice = true;  // a roi_offset tensor on the device is read by the kernel

  static int32_t run(const PlanInputs& in, bool read_errors) {
    int32_t errors = 0;
    dispatch_mask_dtype(in.mask_dtype(), [&](auto mask_zero) {
      using mask_t = decltype(mask_zero);
      PlanArgs<mask_t> a;
      // A seed on the call's device is read by the kernel; a CPU one is mixed on the host (no copy to the device).
      set_plan_steps(a, in, /*kernel_reads_seed=*/in.seed.defined() && in.seed.device() == in.options.device());
      a.masks = data_or_null<mask_t>(in.masks);
      if (in.double_cams()) {
        a.cams_d = in.cams.data_ptr<double>();
      } else {
        a.cams_f = data_or_null<float>(in.cams);
      }
      a.thr_fg_f = static_cast<float>(in.thr_fg);
      a.thr_bg_f = static_cast<float>(in.thr_bg);
      a.thr_fg_d = in.thr_fg;
      a.thr_bg_d = in.thr_bg;
      errors = launch_plan(a, in.options, read_errors);
    });
    return errors;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(CONTRASTMASK_LIBRARY, CONTRASTMASK_CUDA_DISPATCH_KEY, m) { register_plan_ops<CudaPlan>(m); }

}  // namespace contrastmask
