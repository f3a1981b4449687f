// CUDA kernels of the contrastive loss (forward and backward). Same math as csrc/cpu/loss_kernels.cpp
// through the shared headers; the sums are taken in another (but fixed) order.
//
// Forward, all on the current stream, no host sync (N = 0 included):
//   roi_counts     block per ROI          label-1 / label-0 pixels of kept ROIs
//   roi_weights    one block              w[n][side] (DESIGN, "Queries for kept ROIs with an empty partition"),
//                                          kept count, ROIs with each partition, loss scale
//   partition_sums block per (ROI, 32 ch)  pass 1 over z: mean of z over each partition, in double
//   sum_over_rois  fixed-shape tree        the means' sums per group (G, 2, C), in double
//   split_queries  thread per value       queries (G, 4, C): q+, q- rounded to acc_t and their lo parts
//   query_norms    warp per query         |q+|, |q-| of each group
//   cosines        block per (ROI, 256 px) pass 2 over z: pixstats (a pixel whose sums overflow is computed
//                                          again rescaled, loss_math.h), per-block log-sum-exp partials
//   group_lse      warp per group         termstats[.., kLse] (shared queries: after a chunk tree)
//   positive_sums  block per (ROI, 256 px) per-block sums of (L_p - s_p/t), exp(lse - L_p), |P|
//   group_terms    warp per group         termstats ratio, 1/|P|, value (shared queries: after a chunk tree)
//   write_loss     one block              loss in z's dtype
// Backward: roi_counts, roi_weights (with the upstream gradient read on the device), query_norms,
// pixel_coefficients (similarity_grads + cosine_backward per key pixel), weighted_sums (pass 1 over z:
// sum_i a_i u_i per ROI, u_i the unit key vector), sum_over_rois (dL/dq per group), write_dz (pass 2 over z).
// No float atomics anywhere: reductions go through trees of fixed shape (reduce.cuh, roi_reduce.cuh),
// so two runs give the same bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <string>

#include "../contrastmask/loss_math.h"
#include "../ops/loss_inputs.h"
#include "../ops/loss_ops.h"
#include "../ops/library.h"
#include "platform.cuh"
#include "reduce.cuh"
#include "roi_reduce.cuh"

namespace contrastmask {
namespace {

using cuda::block_merge;
using cuda::block_sum;
using cuda::ceil_div;
using cuda::check_grid;
using cuda::grid_for;
using cuda::launch_reduce_rows;
using cuda::launch_sum_over_rois;
using cuda::kMaxBlockWarps;
using cuda::kWarp;
using cuda::stream;
using cuda::warp_sum;

constexpr int kThreads = 256;         // threads of the per-pixel and per-channel kernels
constexpr int kPixelsPerBlock = kThreads;  // pixel-chunk kernels: one pixel per thread
constexpr int kChannelsPerWarp = 4;   // channel-sum kernels: a warp sums 4 channels, reusing its pixel weights
constexpr int kChannelsPerBlock = kChannelsPerWarp * (kThreads / kWarp);
// Per key pixel and side (P, M): coefficients of cosine_backward and 1 / |k| of the side's key vector.
enum Coef : int { kAP = 0, kAM, kGammaP, kGammaM, kBP, kBM, kInvP, kInvM, kNumCoef };

// ---------------------------------------------------------------- per-ROI weights

// counts[n][side]: pixels labelled 1 (side 0) and 0 (side 1) of kept ROIs, 0 for dropped ones.
__global__ void __launch_bounds__(kThreads) roi_counts_kernel(const int8_t* labels, const bool* keep, int64_t P,
                                                              int32_t* counts) {
  CM_SHARED(int, scratch, [kMaxBlockWarps]);
  const int64_t n = blockIdx.x;
  int fg = 0, bg = 0;
  if (keep[n]) {
    for (int64_t i = threadIdx.x; i < P; i += blockDim.x) {
      const int8_t l = labels[n * P + i];
      fg += l == kForeground;
      bg += l == kBackground;
    }
  }
  fg = block_sum(fg, scratch);
  bg = block_sum(bg, scratch);
  if (threadIdx.x == 0) {
    counts[n * 2] = fg;
    counts[n * 2 + 1] = bg;
  }
}

// counts[kWithFg], counts[kWithBg]: kept ROIs with a non-empty partition; counts[kKept]: kept ROIs
// (loss_math.h, QueryCount; in double, the dtype in which the global loss sums them over ranks).
__global__ void __launch_bounds__(kThreads) query_counts_kernel(const int32_t* counts, const bool* keep, int64_t N,
                                                                double* out) {
  CM_SHARED(long long, scratch, [kMaxBlockWarps]);
  long long kept = 0, with_fg = 0, with_bg = 0;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    kept += keep[n];
    with_fg += counts[n * 2] > 0;
    with_bg += counts[n * 2 + 1] > 0;
  }
  CM_SHARED(long long, totals, [3]);
  kept = block_sum(kept, scratch);
  if (threadIdx.x == 0) totals[0] = kept;
  with_fg = block_sum(with_fg, scratch);
  if (threadIdx.x == 0) totals[1] = with_fg;
  with_bg = block_sum(with_bg, scratch);
  if (threadIdx.x == 0) totals[2] = with_bg;
  __syncthreads();
  if (threadIdx.x == 0) {
    out[kKept] = static_cast<double>(totals[0]);
    out[kWithFg] = static_cast<double>(totals[1]);
    out[kWithBg] = static_cast<double>(totals[2]);
  }
}

// w[n][side] = 1 / (rois * count) as query_weights() of the CPU kernels, rois from the batch's counts
// (every rank's for the global loss); a thread per value.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) roi_weights_kernel(const int32_t* counts, const double* query_counts,
                                                               int64_t N, bool share_queries, acc_t* w) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= N * 2) return;
  const int32_t c = counts[k];
  const acc_t rois = share_queries ? acc_t(query_counts[kWithFg + k % 2]) : acc_t(1);
  w[k] = c > 0 ? acc_t(1) / (rois * acc_t(c)) : acc_t(0);
}

// scale[0] = upstream gradient times the groups' weight in the loss (divided by the kept count without
// shared queries), scale[1] = the negatives' scale: neg_grad where given (the global loss), else scale[0].
template <typename acc_t>
__global__ void gradient_scales_kernel(const acc_t* grad, const acc_t* neg_grad, const double* query_counts,
                                       bool share_queries, acc_t* scale) {
  const acc_t g = *grad;
  const double kept = query_counts[kKept];
  scale[0] = share_queries ? g : (kept > 0 ? g / acc_t(kept) : acc_t(0));
  scale[1] = neg_grad ? *neg_grad : scale[0];
}

// ---------------------------------------------------------------- channel sums (passes 1)

// Forward pass 1: means[n][side][c] = (sum of z[n, c, i] over the pixels labelled 1 (side 0) or 0
// (side 1)) / their count, in double (loss_math.h, split_query); 0 for an empty partition. A warp owns
// kChannelsPerWarp channels, lanes stride over pixels.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) partition_sums_kernel(const scalar_t* z, const int8_t* labels,
                                                                  const bool* keep, const int32_t* counts, int64_t C,
                                                                  int64_t P, int64_t channel_blocks, double* means) {
  CM_DYNAMIC_SHARED(int8_t, lab_s, 16);
  const int64_t n = blockIdx.x / channel_blocks;
  if (!keep[n]) return;  // dropped ROIs are skipped by the reduction
  for (int64_t i = threadIdx.x; i < P; i += blockDim.x) lab_s[i] = labels[n * P + i];
  __syncthreads();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c0 = (blockIdx.x % channel_blocks) * kChannelsPerBlock + warp * kChannelsPerWarp;
  if (c0 >= C) return;  // no block-wide barrier below
  double fg[kChannelsPerWarp], bg[kChannelsPerWarp];
  const scalar_t* rows[kChannelsPerWarp];
#pragma unroll
  for (int j = 0; j < kChannelsPerWarp; ++j) {
    fg[j] = bg[j] = 0.0;
    rows[j] = z + (n * C + (c0 + j < C ? c0 + j : C - 1)) * P;
  }
  for (int64_t i = lane; i < P; i += kWarp) {
    const int8_t l = lab_s[i];
#pragma unroll
    for (int j = 0; j < kChannelsPerWarp; ++j) {
      const double v = static_cast<double>(static_cast<acc_t>(rows[j][i]));
      fg[j] += l == kForeground ? v : 0.0;
      bg[j] += l == kBackground ? v : 0.0;
    }
  }
  const int32_t nf = counts[n * 2], nb = counts[n * 2 + 1];
#pragma unroll
  for (int j = 0; j < kChannelsPerWarp; ++j) {
    const double f = warp_sum(fg[j]), b = warp_sum(bg[j]);
    if (lane == 0 && c0 + j < C) {
      means[(n * 2) * C + c0 + j] = nf > 0 ? f / static_cast<double>(nf) : 0.0;
      means[(n * 2 + 1) * C + c0 + j] = nb > 0 ? b / static_cast<double>(nb) : 0.0;
    }
  }
}

// queries[g][side] = sums[g][side] / (ROIs with that partition, or 1 without sharing; 0 when none),
// rounded to acc_t, and queries[g][2 + side] its lo part (loss_math.h, split_query); a thread per value.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) split_queries_kernel(const double* sums, const double* counts, int64_t G,
                                                                 int64_t C, bool share_queries, acc_t* queries) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= G * 2 * C) return;
  const int64_t g = e / (2 * C), side = (e / C) % 2, c = e % C;
  const double r = share_queries ? counts[kWithFg + side] : 1.0;
  acc_t* q = queries + g * kQueryRows * C;
  split_query(r > 0 ? sums[e] / r : 0.0, &q[side * C + c], &q[(2 + side) * C + c]);
}

// Backward pass 1, in partition_sums_kernel's layout (its twin: a warp per kChannelsPerWarp channels, lanes
// over pixels, then a warp sum per channel): out[n][side][c] = sum_i a_side_i u_side_i[c], u = (z - q) / |z - q|
// with centred keys (z - q from q's hi and lo parts, loss_math.h), else z / |z| (terms with a = 0 left out, as
// on the CPU, so a NaN in an unused pixel stays out).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) weighted_sums_kernel(const scalar_t* z, const acc_t* coef,
                                                                 const bool* keep, const acc_t* queries,
                                                                 bool centred_keys, bool share_queries, int64_t C,
                                                                 int64_t P, int64_t channel_blocks, acc_t* out) {
  const int64_t n = blockIdx.x / channel_blocks;
  if (!keep[n]) return;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t c0 = (blockIdx.x % channel_blocks) * kChannelsPerBlock + warp * kChannelsPerWarp;
  if (c0 >= C) return;
  const acc_t* cf = coef + n * kNumCoef * P;
  const acc_t* q = queries + (share_queries ? 0 : n) * kQueryRows * C;
  acc_t sp[kChannelsPerWarp], sm[kChannelsPerWarp], qp[kChannelsPerWarp], qm[kChannelsPerWarp];
  acc_t qp_lo[kChannelsPerWarp], qm_lo[kChannelsPerWarp];
  const scalar_t* rows[kChannelsPerWarp];
#pragma unroll
  for (int j = 0; j < kChannelsPerWarp; ++j) {
    sp[j] = sm[j] = acc_t(0);
    const int64_t c = c0 + j < C ? c0 + j : C - 1;
    rows[j] = z + (n * C + c) * P;
    qp[j] = centred_keys ? q[kQueryPos * C + c] : acc_t(0);
    qm[j] = centred_keys ? q[kQueryNeg * C + c] : acc_t(0);
    qp_lo[j] = centred_keys ? q[kQueryPosLo * C + c] : acc_t(0);
    qm_lo[j] = centred_keys ? q[kQueryNegLo * C + c] : acc_t(0);
  }
  for (int64_t i = lane; i < P; i += kWarp) {
    const acc_t ap = cf[kAP * P + i], am = cf[kAM * P + i];
    if (ap == acc_t(0) && am == acc_t(0)) continue;
    const acc_t ip = cf[kInvP * P + i], im = cf[kInvM * P + i];
#pragma unroll
    for (int j = 0; j < kChannelsPerWarp; ++j) {
      const acc_t v = static_cast<acc_t>(rows[j][i]);
      sp[j] += ap != acc_t(0) ? centred_component(v, qp[j], qp_lo[j]) * ip * ap : acc_t(0);
      sm[j] += am != acc_t(0) ? centred_component(v, qm[j], qm_lo[j]) * im * am : acc_t(0);
    }
  }
#pragma unroll
  for (int j = 0; j < kChannelsPerWarp; ++j) {
    const acc_t a = warp_sum(sp[j]), b = warp_sum(sm[j]);
    if (lane == 0 && c0 + j < C) {
      out[(n * 2) * C + c0 + j] = a;
      out[(n * 2 + 1) * C + c0 + j] = b;
    }
  }
}

// norms[row] = |q| for the G * 2 queries q (the hi rows of queries (G, 4, C)); a warp per row. The squares are summed
// on the row times feature_scale of its largest |q| (loss_math.h, row_norm), so they do not overflow;
// unit (backward, may be null) gets the row's (scale, unit()) pair: q^ = (q * scale) * unit().
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) query_norms_kernel(const acc_t* queries, int64_t rows, int64_t C,
                                                               acc_t* norms, acc_t* unit) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // whole warps leave together
  const acc_t* q = queries + ((row / 2) * kQueryRows + row % 2) * C;
  acc_t m = acc_t(0);
  for (int64_t c = lane; c < C; c += kWarp) m = nan_max(m, abs_value(q[c]));
  const acc_t scale = feature_scale(cuda::warp_max(m));
  acc_t ss = acc_t(0);
  for (int64_t c = lane; c < C; c += kWarp) ss += (q[c] * scale) * (q[c] * scale);
  ss = warp_sum(ss);
  if (lane == 0) {
    const RowNorm<acc_t> r{scale, cm_sqrt(ss)};
    norms[row] = r.norm();
    if (unit) {
      unit[row * 2] = r.scale;
      unit[row * 2 + 1] = r.unit();
    }
  }
}

// ---------------------------------------------------------------- forward pass 2 and term statistics

// Cosines of every pixel of kept ROIs with both queries of its group (pixstats), and per block the
// log-sum-exp of each term's negatives: lse_part[block][t] = (max, sum). A pixel whose sums overflow
// (|z| beyond about 1e18 in float32) is computed again on a power-of-two scale (loss_math.h).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) cosines_kernel(const scalar_t* z, const uint8_t* keys, const bool* keep,
                                                           const acc_t* queries, const acc_t* qnorms, int64_t C,
                                                           int64_t P, int64_t pixel_blocks, bool share_queries,
                                                           LossParams<acc_t> params, acc_t* pixstats,
                                                           acc_t* lse_part) {
  CM_SHARED(acc_t, scratch, [2 * kMaxBlockWarps]);
  const int64_t n = blockIdx.x / pixel_blocks;
  acc_t* part = lse_part + int64_t(blockIdx.x) * kNumTerms * 2;
  if (!keep[n]) {
    if (threadIdx.x < kNumTerms) {
      LseAcc<acc_t>().store(part + threadIdx.x * 2);  // the empty pair (-inf, 0)
    }
    return;
  }
  const int64_t g = share_queries ? 0 : n;
  const auto [qp, qm, qp_lo, qm_lo] = query_rows(queries, g, C);
  const int64_t i = (blockIdx.x % pixel_blocks) * kPixelsPerBlock + threadIdx.x;
  LseAcc<acc_t> lse[kNumTerms];
  if (i < P) {
    const scalar_t* zi = z + n * C * P + i;
    acc_t dot_p = 0, dot_m = 0, kk_p = 0, kk_m = 0;
    if (params.centred_keys()) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(zi[c * P]);
        const acc_t a = qp[c], b = qm[c];
        const acc_t up = centred_component(v, a, qp_lo[c]), um = centred_component(v, b, qm_lo[c]);
        add_cosine_component<true>(a, up, b, um, dot_p, dot_m, kk_p, kk_m);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(zi[c * P]);
        const acc_t a = qp[c], b = qm[c];
        add_cosine_component<false>(a, v, b, v, dot_p, dot_m, kk_p, kk_m);
      }
    }
    PixelCosines<acc_t> r;
    if (!pixel_cosines_from_sums(dot_p, dot_m, kk_p, kk_m, qnorms[g * 2], qnorms[g * 2 + 1], params.centred_keys(), &r))
      r = rescaled_pixel_cosines(zi, P, C, qp, qm, qp_lo, qm_lo, params.centred_keys());
    const acc_t s_pos = r.s_pos, s_neg = r.s_neg;
    acc_t* st = pixstats + n * 4 * P + i;
    st[0] = s_pos;
    st[P] = s_neg;
    st[2 * P] = r.kn_pos;
    st[3 * P] = r.kn_neg;
    const uint8_t bits = keys[n * P + i];
#pragma unroll
    for (int t = 0; t < kNumTerms; ++t)
      if ((bits >> term_negative_set(t)) & 1) lse[t].add((term_side(t) == 0 ? s_pos : s_neg) / params.tau(t));
  }
#pragma unroll
  for (int t = 0; t < kNumTerms; ++t) {
    const LseAcc<acc_t> total = block_merge(lse[t], scratch);
    if (threadIdx.x == 0) {
      total.store(part + t * 2);
    }
  }
}

// lse[g][t] = log-sum-exp pair (max, sum of exp(x - max)) of the group's negatives, merging the blocks'
// partials (with shared queries the caller passes the one row the chunk tree left: N = pixel_blocks = 1).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) group_lse_kernel(const acc_t* lse_part, int64_t N, int64_t pixel_blocks,
                                                             bool share_queries, acc_t* lse) {
  CM_SHARED(acc_t, scratch, [2 * kMaxBlockWarps]);
  const int64_t g = blockIdx.x;
  // Share: every block of every ROI; else the blocks of ROI g.
  const int64_t first = share_queries ? 0 : g * pixel_blocks;
  const int64_t last = share_queries ? N * pixel_blocks : (g + 1) * pixel_blocks;
#pragma unroll
  for (int t = 0; t < kNumTerms; ++t) {
    LseAcc<acc_t> acc;
    for (int64_t b = first + threadIdx.x; b < last; b += blockDim.x)
      acc.merge(LseAcc<acc_t>::load(lse_part + (b * kNumTerms + t) * 2));
    const LseAcc<acc_t> total = block_merge(acc, scratch);
    if (threadIdx.x == 0) {
      total.store(lse + (g * kNumTerms + t) * 2);
    }
  }
}

// termstats[g][t][kLse] = the value of the (merged) pair lse[g][t]; a thread per (group, term).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) lse_values_kernel(const acc_t* lse, int64_t G, acc_t* termstats) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= G * kNumTerms) return;
  termstats[k * kNumTermStats + kLse] = LseAcc<acc_t>::load(lse + k * 2).value();
}

// Per block and term: sum of (L_p - s_p / t), sum of exp(lse - L_p) and |P| over the positives.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) positive_sums_kernel(const acc_t* pixstats, const uint8_t* keys,
                                                                 const bool* keep, const acc_t* termstats, int64_t P,
                                                                 int64_t pixel_blocks, bool share_queries,
                                                                 LossParams<acc_t> params, acc_t* pos_part) {
  constexpr int kValues = kNumTerms * kNumPosStats;
  CM_SHARED(acc_t, warp_part, [kMaxBlockWarps][kValues]);
  const int64_t n = blockIdx.x / pixel_blocks;
  acc_t* out = pos_part + int64_t(blockIdx.x) * kValues;
  if (!keep[n]) {
    if (threadIdx.x < kValues) out[threadIdx.x] = acc_t(0);
    return;
  }
  const acc_t* ts = termstats + (share_queries ? 0 : n) * kNumTerms * kNumTermStats;
  const int64_t i = (blockIdx.x % pixel_blocks) * kPixelsPerBlock + threadIdx.x;
  acc_t v[kValues];
#pragma unroll
  for (int k = 0; k < kValues; ++k) v[k] = acc_t(0);
  const uint8_t bits = i < P ? keys[n * P + i] : uint8_t(0);
  if (bits) {
    const acc_t* st = pixstats + n * 4 * P + i;
#pragma unroll
    for (int t = 0; t < kNumTerms; ++t) {
      if (!((bits >> term_positive_set(t)) & 1)) continue;
      const acc_t s = st[term_side(t) * P];
      const acc_t lse = ts[t * kNumTermStats + kLse];
      const acc_t L = positive_log_denominator(s, lse, params, t);
      v[t * kNumPosStats + kPosLoss] = L - s / params.tau(t);
      v[t * kNumPosStats + kPosRatio] = cm_exp(lse - L);
      v[t * kNumPosStats + kPosCount] = acc_t(1);
    }
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int k = 0; k < kValues; ++k) {
    const acc_t s = warp_sum(v[k]);
    if (lane == 0) warp_part[warp][k] = s;
  }
  __syncthreads();
  if (threadIdx.x < kValues) {
    acc_t s = acc_t(0);
    for (int w = 0; w < warps; ++w) s += warp_part[w][threadIdx.x];
    out[threadIdx.x] = s;
  }
}

// pos_sums[g] = the sums of the group's blocks' partials (without shared queries: the blocks of ROI g).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) group_pos_sums_kernel(const acc_t* pos_part, int64_t pixel_blocks,
                                                                  acc_t* pos_sums) {
  constexpr int kValues = kNumTerms * kNumPosStats;
  CM_SHARED(acc_t, scratch, [kMaxBlockWarps]);
  const int64_t g = blockIdx.x;
  const int64_t first = g * pixel_blocks, last = (g + 1) * pixel_blocks;
  for (int k = 0; k < kValues; ++k) {
    acc_t s = acc_t(0);
    for (int64_t b = first + threadIdx.x; b < last; b += blockDim.x) s += pos_part[b * kValues + k];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) pos_sums[g * kValues + k] = s;
  }
}

// termstats ratio, 1/|P| and value of each group's terms from its positives' sums; a thread per (group, term).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) group_terms_kernel(const acc_t* pos_sums, int64_t G, acc_t* termstats) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= G * kNumTerms) return;
  const acc_t* sums = pos_sums + k * kNumPosStats;
  acc_t* ts = termstats + k * kNumTermStats;
  const acc_t inv = sums[kPosCount] > acc_t(0) ? acc_t(1) / sums[kPosCount] : acc_t(0);
  ts[kRatio] = sums[kPosRatio] * inv;
  ts[kInvPositives] = inv;
  ts[kValue] = sums[kPosLoss] * inv;
}

// loss = sum over groups of the four terms (divided by the kept count without sharing), in z's dtype.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) write_loss_kernel(const acc_t* termstats, int64_t G, bool share_queries,
                                                              const double* counts, scalar_t* loss) {
  CM_SHARED(acc_t, scratch, [kMaxBlockWarps]);
  acc_t s = acc_t(0);
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x)
    for (int t = 0; t < kNumTerms; ++t) s += termstats[(g * kNumTerms + t) * kNumTermStats + kValue];
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    if (!share_queries) s = counts[kKept] > 0 ? s / acc_t(counts[kKept]) : acc_t(0);
    *loss = static_cast<scalar_t>(s);
  }
}

// ---------------------------------------------------------------- backward

// Per key pixel of kept ROIs: dL/ds from similarity_grads, then the cosine's backward coefficients
// (coef (N, kNumCoef, P), zero on other pixels and on dropped ROIs: the stage op's output is defined
// everywhere, as the CPU kernel's is); per block the sums of beta for each query side, in double
// (a key at its query has beta ~ dL/ds / eps, cancelling against its gamma in dz; DESIGN, "Collapsed features").
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) pixel_coefficients_kernel(
    const uint8_t* keys, const bool* keep, const acc_t* pixstats, const acc_t* termstats, const acc_t* qnorms,
    const acc_t* scale, int64_t P, int64_t pixel_blocks, bool share_queries, LossParams<acc_t> params,
    acc_t* coef, double* beta_part) {
  CM_SHARED(double, scratch, [kMaxBlockWarps]);
  const int64_t n = blockIdx.x / pixel_blocks;
  double* bp = beta_part + int64_t(blockIdx.x) * 2;
  const int64_t g = share_queries ? 0 : n;
  const int64_t i = (blockIdx.x % pixel_blocks) * kPixelsPerBlock + threadIdx.x;
  double beta[2] = {0.0, 0.0};
  if (i < P) {
    acc_t a[2] = {acc_t(0), acc_t(0)}, gamma[2] = {acc_t(0), acc_t(0)}, b[2] = {acc_t(0), acc_t(0)},
          inv[2] = {acc_t(0), acc_t(0)};
    const uint8_t bits = keep[n] ? keys[n * P + i] : 0;  // a dropped ROI has no key pixel: zeros
    if (bits) {
      const acc_t* st = pixstats + n * 4 * P + i;
      acc_t gs[2];
      similarity_grads(bits, st[0], st[P], termstats + g * kNumTerms * kNumTermStats, params, scale[0], scale[1],
                       &gs[0], &gs[1]);
#pragma unroll
      for (int side = 0; side < 2; ++side) {
        const acc_t kn = st[(2 + side) * P];
        const CosGrad<acc_t> cg = cosine_backward(gs[side], st[side * P], qnorms[g * 2 + side], kn, params.centred_keys());
        a[side] = cg.a;
        gamma[side] = cg.gamma;
        b[side] = cg.b;
        inv[side] = inverse_norm(kn);
        beta[side] += cg.beta;
      }
    }
    acc_t* cf = coef + n * kNumCoef * P + i;
    cf[kAP * P] = a[0];
    cf[kAM * P] = a[1];
    cf[kGammaP * P] = gamma[0];
    cf[kGammaM * P] = gamma[1];
    cf[kBP * P] = b[0];
    cf[kBM * P] = b[1];
    cf[kInvP * P] = inv[0];
    cf[kInvM * P] = inv[1];
  }
  const double b0 = block_sum(beta[0], scratch);
  if (threadIdx.x == 0) bp[0] = b0;
  const double b1 = block_sum(beta[1], scratch);
  if (threadIdx.x == 0) bp[1] = b1;
}

// Pass 2: dz = partition term (through the queries: w * dL/dq) + cosine terms of key pixels, with
// dL/dq = sum_n sum_i a_i u_i + (sum beta) q^ and q^ = q / |q| = (q * scale) * unit (qunit, query_norms).
// Dropped ROIs get zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) write_dz_kernel(const scalar_t* z, const int8_t* labels, const bool* keep,
                                                            const acc_t* coef, const acc_t* queries,
                                                            const acc_t* qunit, const acc_t* dq_sums,
                                                            const double* beta, const acc_t* w, int64_t C, int64_t P,
                                                            int64_t pixel_blocks, bool share_queries,
                                                            bool centred_keys, scalar_t* dz) {
  const int64_t n = blockIdx.x / pixel_blocks;
  const int64_t i = (blockIdx.x % pixel_blocks) * kPixelsPerBlock + threadIdx.x;
  if (i >= P) return;
  scalar_t* out = dz + n * C * P + i;
  if (!keep[n]) {
    for (int64_t c = 0; c < C; ++c) out[c * P] = scalar_t(0);
    return;
  }
  const int64_t g = share_queries ? 0 : n;
  const auto [qp, qm, qp_lo, qm_lo] = query_rows(queries, g, C);
  const acc_t* sp = dq_sums + g * 2 * C;
  const acc_t* sm = sp + C;
  const acc_t beta_p = static_cast<acc_t>(beta[g * 2]), beta_m = static_cast<acc_t>(beta[g * 2 + 1]);
  const acc_t scale_p = qunit[g * 4], unit_p = qunit[g * 4 + 1], scale_m = qunit[g * 4 + 2], unit_m = qunit[g * 4 + 3];
  const int8_t label = labels[n * P + i];
  // Weight of this pixel's partition in its query (0 for ignored pixels).
  const acc_t wp = label == kForeground ? w[n * 2] : acc_t(0);
  const acc_t wm = label == kBackground ? w[n * 2 + 1] : acc_t(0);
  const acc_t* cf = coef + n * kNumCoef * P + i;
  const acc_t gamma_p = cf[kGammaP * P], gamma_m = cf[kGammaM * P], b_p = cf[kBP * P], b_m = cf[kBM * P];
  const acc_t inv_p = cf[kInvP * P], inv_m = cf[kInvM * P];
  const scalar_t* zi = z + n * C * P + i;
  for (int64_t c = 0; c < C; ++c) {
    const acc_t hat_p = (qp[c] * scale_p) * unit_p, hat_m = (qm[c] * scale_m) * unit_m;  // as the CPU's unit_queries
    acc_t d = acc_t(0);
    if (label == kForeground) d = wp * (sp[c] + beta_p * hat_p);
    if (label == kBackground) d = wm * (sm[c] + beta_m * hat_m);
    d += gamma_p * hat_p + gamma_m * hat_m;
    if (b_p != acc_t(0) || b_m != acc_t(0)) {
      const acc_t v = static_cast<acc_t>(zi[c * P]);
      const acc_t cp = centred_keys ? qp[c] : acc_t(0), cm = centred_keys ? qm[c] : acc_t(0);
      const acc_t cp_lo = centred_keys ? qp_lo[c] : acc_t(0), cm_lo = centred_keys ? qm_lo[c] : acc_t(0);
      d += (b_p != acc_t(0) ? b_p * (centred_component(v, cp, cp_lo) * inv_p) : acc_t(0)) +
           (b_m != acc_t(0) ? b_m * (centred_component(v, cm, cm_lo) * inv_m) : acc_t(0));
    }
    out[c * P] = static_cast<scalar_t>(d);
  }
}

// ---------------------------------------------------------------- host side

struct Shapes : LossSizes {
  int64_t pixel_blocks, channel_blocks;
};

Shapes shapes_of(const LossInputs& in) {
  Shapes s;
  static_cast<LossSizes&>(s) = in;
  s.pixel_blocks = ceil_div(s.P, kPixelsPerBlock);
  s.channel_blocks = ceil_div(s.C, kChannelsPerBlock);
  check_grid(s.N * std::max(s.pixel_blocks, s.channel_blocks));
  return s;
}

// Pixels of each partition of every kept ROI (roi_counts (N, 2) int32).
void launch_roi_counts(const Shapes& s, const LossInputs& in, const at::Tensor& roi_counts) {
  if (s.N == 0) return;
  CM_LAUNCH(static_cast<unsigned>(s.N), kThreads, 0, stream(), roi_counts_kernel)(
      in.labels.data_ptr<int8_t>(), in.keep.data_ptr<bool>(), s.P, roi_counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_query_counts(const Shapes& s, const LossInputs& in, const at::Tensor& roi_counts,
                         const at::Tensor& counts) {
  CM_LAUNCH(1, kThreads, 0, stream(), query_counts_kernel)(roi_counts.data_ptr<int32_t>(), in.keep.data_ptr<bool>(),
                                                           s.N, counts.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_query_norms(const Shapes& s, const at::Tensor& queries, const at::Tensor& qnorms,
                        const at::Tensor& qunit = at::Tensor()) {
  const int64_t rows = s.G * 2;
  if (rows == 0) return;
  CM_LAUNCH(grid_for(rows * kWarp, kThreads), kThreads, 0, stream(), query_norms_kernel<acc_t>)(
      queries.data_ptr<acc_t>(), rows, s.C, qnorms.data_ptr<acc_t>(),
      qunit.defined() ? qunit.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The stages (DESIGN, "Global query sharing"; the same split as the CPU kernels). All on the current stream,
// no host sync.

// Stage 1, pass 1 over z: partition means in double and their sums per group (query_sums (G, 2, C)), counts.
template <typename scalar_t, typename acc_t>
void stage_query_sums(const Shapes& s, const LossInputs& in, const at::Tensor& query_sums, const at::Tensor& counts) {
  const auto double_opts = in.double_options();
  at::Tensor roi_counts = at::empty({s.N, 2}, in.z.options().dtype(at::kInt));
  at::Tensor roi_means = at::empty({s.N, 2, s.C}, double_opts);
  launch_roi_counts(s, in, roi_counts);
  launch_query_counts(s, in, roi_counts, counts);
  if (s.N > 0) {
    CM_LAUNCH(static_cast<unsigned>(s.N * s.channel_blocks), kThreads, s.P, stream(),
              partition_sums_kernel<scalar_t, acc_t>)(in.z.data_ptr<scalar_t>(), in.labels.data_ptr<int8_t>(),
                                                      in.keep.data_ptr<bool>(), roi_counts.data_ptr<int32_t>(), s.C,
                                                      s.P, s.channel_blocks, roi_means.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_sum_over_rois<double>(roi_means.data_ptr<double>(), in.keep.data_ptr<bool>(), s.N, 1, 2 * s.C,
                               in.share_queries, query_sums.data_ptr<double>(), double_opts);
}

// Stage 2: the queries (hi and lo), pass 2 over z (pixstats) and the negatives' log-sum-exp pairs (lse (G, 4, 2)).
template <typename scalar_t, typename acc_t>
void stage_cosines(const Shapes& s, const LossInputs& in, const at::Tensor& query_sums, const at::Tensor& counts,
                   const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& lse) {
  const auto acc_opts = in.acc_options();
  const LossParams<acc_t> params = in.params<acc_t>();
  at::Tensor qnorms = at::empty({s.G, 2}, acc_opts);
  at::Tensor lse_part = at::empty({s.N * s.pixel_blocks, kNumTerms, 2}, acc_opts);
  at::Tensor group_total = at::empty({kNumTerms, 2}, acc_opts);
  if (s.G * s.C > 0) {
    CM_LAUNCH(grid_for(s.G * 2 * s.C, kThreads), kThreads, 0, stream(), split_queries_kernel<acc_t>)(
        query_sums.data_ptr<double>(), counts.data_ptr<double>(), s.G, s.C, in.share_queries,
        queries.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_query_norms<acc_t>(s, queries, qnorms);
  if (s.N > 0) {
    CM_LAUNCH(static_cast<unsigned>(s.N * s.pixel_blocks), kThreads, 0, stream(), cosines_kernel<scalar_t, acc_t>)(
        in.z.data_ptr<scalar_t>(), in.keys.data_ptr<uint8_t>(), in.keep.data_ptr<bool>(), queries.data_ptr<acc_t>(),
        qnorms.data_ptr<acc_t>(), s.C, s.P, s.pixel_blocks, in.share_queries, params, pixstats.data_ptr<acc_t>(),
        lse_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // A warp per ROI, or with shared queries a tree over every ROI's block partials first, then one warp.
  const acc_t* lse_rows = lse_part.data_ptr<acc_t>();
  int64_t rows_n = s.N, rows_blocks = s.pixel_blocks;
  if (in.share_queries) {
    launch_reduce_rows<acc_t>(lse_rows, nullptr, 1, s.N * s.pixel_blocks, kNumTerms, /*lse=*/true,
                              group_total.data_ptr<acc_t>(), acc_opts);
    lse_rows = group_total.data_ptr<acc_t>();
    rows_n = rows_blocks = 1;
  }
  if (s.G > 0) {
    CM_LAUNCH(static_cast<unsigned>(s.G), kWarp, 0, stream(), group_lse_kernel<acc_t>)(
        lse_rows, rows_n, rows_blocks, in.share_queries, lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Stage 3: termstats[.., kLse] from the (merged) pairs, and the positives' sums (pos_sums (G, 4, 3)).
template <typename acc_t>
void stage_terms(const Shapes& s, const LossInputs& in, const at::Tensor& pixstats, const at::Tensor& lse,
                 const at::Tensor& termstats, const at::Tensor& pos_sums) {
  if (s.G == 0) return;
  const auto acc_opts = in.acc_options();
  const LossParams<acc_t> params = in.params<acc_t>();
  CM_LAUNCH(grid_for(s.G * kNumTerms, kThreads), kThreads, 0, stream(), lse_values_kernel<acc_t>)(
      lse.data_ptr<acc_t>(), s.G, termstats.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor pos_part = at::empty({s.N * s.pixel_blocks, kNumTerms, kNumPosStats}, acc_opts);
  if (s.N > 0) {
    CM_LAUNCH(static_cast<unsigned>(s.N * s.pixel_blocks), kThreads, 0, stream(), positive_sums_kernel<acc_t>)(
        pixstats.data_ptr<acc_t>(), in.keys.data_ptr<uint8_t>(), in.keep.data_ptr<bool>(),
        termstats.data_ptr<acc_t>(), s.P, s.pixel_blocks, in.share_queries, params, pos_part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (in.share_queries) {
    launch_reduce_rows<acc_t>(pos_part.data_ptr<acc_t>(), nullptr, 1, s.N * s.pixel_blocks, kNumTerms * kNumPosStats,
                              /*lse=*/false, pos_sums.data_ptr<acc_t>(), acc_opts);
  } else {
    CM_LAUNCH(static_cast<unsigned>(s.G), kWarp, 0, stream(), group_pos_sums_kernel<acc_t>)(
        pos_part.data_ptr<acc_t>(), s.pixel_blocks, pos_sums.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Stage 4: termstats' ratio, 1/|P| and value, and the loss (out_t: z's dtype, or acc_t for the stage op).
template <typename out_t, typename acc_t>
void stage_finish(const Shapes& s, const LossInputs& in, const at::Tensor& pos_sums, const at::Tensor& counts,
                  const at::Tensor& termstats, const at::Tensor& loss) {
  if (s.G > 0) {
    CM_LAUNCH(grid_for(s.G * kNumTerms, kThreads), kThreads, 0, stream(), group_terms_kernel<acc_t>)(
        pos_sums.data_ptr<acc_t>(), s.G, termstats.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  CM_LAUNCH(1, kThreads, 0, stream(), write_loss_kernel<out_t, acc_t>)(
      termstats.data_ptr<acc_t>(), s.G, in.share_queries, counts.data_ptr<double>(), loss.data_ptr<out_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Backward stage 1: per-pixel coefficients (coef (N, kNumCoef, P)), pass 1 over z: dq (G, 2, C) and beta (G, 2).
// grad and neg_grad: 0-dim acc_t tensors on the device (neg_grad may be undefined).
template <typename scalar_t, typename acc_t>
void stage_query_grads(const Shapes& s, const LossInputs& in, const at::Tensor& grad, const at::Tensor& neg_grad,
                       const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& termstats,
                       const at::Tensor& counts, const at::Tensor& coef, const at::Tensor& dq,
                       const at::Tensor& beta) {
  const auto acc_opts = in.acc_options();
  const LossParams<acc_t> params = in.params<acc_t>();
  if (s.N == 0) {  // nothing to sum: zero sums (the global loss still sends them)
    dq.zero_();
    beta.zero_();
    return;
  }
  const bool* keep_p = in.keep.data_ptr<bool>();
  at::Tensor scale = at::empty({2}, acc_opts);
  at::Tensor qnorms = at::empty({s.G, 2}, acc_opts);
  at::Tensor beta_part = at::empty({s.N * s.pixel_blocks, 2}, in.double_options());
  at::Tensor roi_dq = at::empty({s.N, 2, s.C}, acc_opts);
  CM_LAUNCH(1, 1, 0, stream(), gradient_scales_kernel<acc_t>)(
      grad.data_ptr<acc_t>(), neg_grad.defined() ? neg_grad.data_ptr<acc_t>() : nullptr, counts.data_ptr<double>(),
      in.share_queries, scale.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_query_norms<acc_t>(s, queries, qnorms);
  CM_LAUNCH(static_cast<unsigned>(s.N * s.pixel_blocks), kThreads, 0, stream(), pixel_coefficients_kernel<acc_t>)(
      in.keys.data_ptr<uint8_t>(), keep_p, pixstats.data_ptr<acc_t>(), termstats.data_ptr<acc_t>(),
      qnorms.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), s.P, s.pixel_blocks, in.share_queries, params,
      coef.data_ptr<acc_t>(), beta_part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  CM_LAUNCH(static_cast<unsigned>(s.N * s.channel_blocks), kThreads, 0, stream(),
            weighted_sums_kernel<scalar_t, acc_t>)(in.z.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), keep_p,
                                                   queries.data_ptr<acc_t>(), params.centred_keys(),
                                                   in.share_queries, s.C, s.P, s.channel_blocks,
                                                   roi_dq.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_sum_over_rois<acc_t>(roi_dq.data_ptr<acc_t>(), keep_p, s.N, 1, 2 * s.C, in.share_queries,
                              dq.data_ptr<acc_t>(), acc_opts);
  launch_sum_over_rois<double>(beta_part.data_ptr<double>(), keep_p, s.N, s.pixel_blocks, 2, in.share_queries,
                               beta.data_ptr<double>(), in.double_options());
}

// Backward stage 2, pass 2 over z: dz.
template <typename scalar_t, typename acc_t>
void stage_dz(const Shapes& s, const LossInputs& in, const at::Tensor& queries, const at::Tensor& coef,
              const at::Tensor& dq, const at::Tensor& beta, const at::Tensor& counts, const at::Tensor& dz) {
  if (s.N == 0) return;
  const auto acc_opts = in.acc_options();
  at::Tensor roi_counts = at::empty({s.N, 2}, in.z.options().dtype(at::kInt));
  at::Tensor w = at::empty({s.N, 2}, acc_opts);
  at::Tensor qnorms = at::empty({s.G, 2}, acc_opts);
  at::Tensor qunit = at::empty({s.G, 2, 2}, acc_opts);  // (scale, unit) of each query: q^ = (q * scale) * unit
  launch_roi_counts(s, in, roi_counts);
  CM_LAUNCH(grid_for(s.N * 2, kThreads), kThreads, 0, stream(), roi_weights_kernel<acc_t>)(
      roi_counts.data_ptr<int32_t>(), counts.data_ptr<double>(), s.N, in.share_queries, w.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_query_norms<acc_t>(s, queries, qnorms, qunit);
  CM_LAUNCH(static_cast<unsigned>(s.N * s.pixel_blocks), kThreads, 0, stream(), write_dz_kernel<scalar_t, acc_t>)(
      in.z.data_ptr<scalar_t>(), in.labels.data_ptr<int8_t>(), in.keep.data_ptr<bool>(), coef.data_ptr<acc_t>(),
      queries.data_ptr<acc_t>(), qunit.data_ptr<acc_t>(), dq.data_ptr<acc_t>(), beta.data_ptr<double>(),
      w.data_ptr<acc_t>(), s.C, s.P, s.pixel_blocks, in.share_queries, in.params<acc_t>().centred_keys(),
      dz.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- the device's side of the operators (loss_ops.h)

// The Device interface of loss_ops.h: CpuLoss in csrc/cpu/loss_kernels.cpp declares the same functions (deliberate twins).

struct CudaLoss {
  using Guard = c10::cuda::CUDAGuard;

  static at::Tensor forward(const LossInputs& in, const at::Tensor& queries, const at::Tensor& pixstats,
                            const at::Tensor& termstats) {
    const Shapes s = shapes_of(in);
    const StageTensors st = stage_tensors(in);
    at::Tensor loss = at::empty({}, in.z.options());
    at::Tensor sums = at::zeros(st.query_sums, in.double_options());
    at::Tensor counts = at::empty({kNumCounts}, in.double_options());
    at::Tensor lse = at::empty(st.lse, in.acc_options());
    at::Tensor pos_sums = at::empty(st.pos_sums, in.acc_options());
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_cuda", {
      stage_query_sums<scalar_t, acc_t>(s, in, sums, counts);
      stage_cosines<scalar_t, acc_t>(s, in, sums, counts, queries, pixstats, lse);
      stage_terms<acc_t>(s, in, pixstats, lse, termstats, pos_sums);
      stage_finish<scalar_t, acc_t>(s, in, pos_sums, counts, termstats, loss);
    });
    return loss;
  }

  static void backward(const LossInputs& in, const at::Tensor& grad, const at::Tensor& queries,
                       const at::Tensor& pixstats, const at::Tensor& termstats, const at::Tensor& dz) {
    const Shapes s = shapes_of(in);
    const StageTensors st = stage_tensors(in);
    const auto acc_opts = in.acc_options();
    // The upstream gradient stays on the device (no .item(): no host sync).
    const at::Tensor grad_acc = grad.reshape({}).to(acc_opts).contiguous();
    at::Tensor roi_counts = at::empty({s.N, 2}, in.z.options().dtype(at::kInt));
    at::Tensor counts = at::empty({kNumCounts}, in.double_options());
    at::Tensor coef = at::empty(st.coef, acc_opts);
    at::Tensor dq = at::empty(st.dq, acc_opts);
    at::Tensor beta = at::empty(st.beta, in.double_options());
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_backward_cuda", {
      launch_roi_counts(s, in, roi_counts);
      launch_query_counts(s, in, roi_counts, counts);
      stage_query_grads<scalar_t, acc_t>(s, in, grad_acc, at::Tensor(), queries, pixstats, termstats, counts, coef,
                                         dq, beta);
      stage_dz<scalar_t, acc_t>(s, in, queries, coef, dq, beta, counts, dz);
    });
  }

  static void query_sums(const LossInputs& in, const at::Tensor& sums, const at::Tensor& counts) {
    const Shapes s = shapes_of(in);
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_query_sums_cuda", {
      stage_query_sums<scalar_t, acc_t>(s, in, sums, counts);
    });
  }

  static void cosines(const LossInputs& in, const at::Tensor& sums, const at::Tensor& counts,
                      const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& lse) {
    const Shapes s = shapes_of(in);
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_cosines_cuda", {
      stage_cosines<scalar_t, acc_t>(s, in, sums, counts, queries, pixstats, lse);
    });
  }

  static void terms(const LossInputs& in, const at::Tensor& pixstats, const at::Tensor& lse,
                    const at::Tensor& termstats, const at::Tensor& pos_sums) {
    const Shapes s = shapes_of(in);
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_terms_cuda", {
      stage_terms<acc_t>(s, in, pixstats, lse, termstats, pos_sums);
    });
  }

  static void finish(const LossInputs& in, const at::Tensor& pos_sums, const at::Tensor& counts,
                     const at::Tensor& termstats, const at::Tensor& loss) {
    const Shapes s = shapes_of(in);
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_finish_cuda", {
      stage_finish<acc_t, acc_t>(s, in, pos_sums, counts, termstats, loss);
    });
  }

  static void query_grads(const LossInputs& in, const at::Tensor& grad, const c10::optional<at::Tensor>& neg_grad,
                          const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& termstats,
                          const at::Tensor& counts, const at::Tensor& coef, const at::Tensor& dq,
                          const at::Tensor& beta) {
    const Shapes s = shapes_of(in);
    const auto acc_opts = in.acc_options();
    // The upstream gradients stay on the device (no .item(): no host sync).
    const at::Tensor grad_acc = grad.reshape({}).to(acc_opts).contiguous();
    const at::Tensor neg_acc = neg_grad ? neg_grad->reshape({}).to(acc_opts).contiguous() : at::Tensor();
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_query_grads_cuda", {
      stage_query_grads<scalar_t, acc_t>(s, in, grad_acc, neg_acc, queries, pixstats, termstats, counts, coef, dq,
                                         beta);
    });
  }

  static void dz(const LossInputs& in, const at::Tensor& queries, const at::Tensor& coef, const at::Tensor& dq,
                 const at::Tensor& beta, const at::Tensor& counts, const at::Tensor& dz) {
    const Shapes s = shapes_of(in);
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_dz_cuda", {
      stage_dz<scalar_t, acc_t>(s, in, queries, coef, dq, beta, counts, dz);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(CONTRASTMASK_LIBRARY, CONTRASTMASK_CUDA_DISPATCH_KEY, m) { register_loss_ops<CudaLoss>(m); }

}  // namespace contrastmask
