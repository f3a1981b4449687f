// CPU kernels of the contrastive loss (forward and backward), parallel over ROIs.
// Passes over z: forward 2 (partition sums, cosines), backward 2 (dL/dq sums, dz).
// Cross-ROI reductions run in ROI order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../contrastmask/loss_math.h"
#include "../ops/loss_inputs.h"
#include "../ops/loss_ops.h"

namespace contrastmask {
namespace {

// Sums over pixels keep kLanes partial sums, pixel i in lane i % kLanes, combined in a fixed order:
// the compiler vectorises them (one running sum is a chain of dependent adds it may not reorder),
// and the result still does not depend on the thread count.
constexpr int kLanes = 8;

template <typename Fn>
inline void for_each_lane(int64_t P, Fn&& fn) {
  int64_t i = 0;
  for (; i + kLanes <= P; i += kLanes)
    for (int j = 0; j < kLanes; ++j) fn(j, i + j);
  for (int j = 0; i < P; ++i, ++j) fn(j, i);
}

template <typename acc_t>
inline acc_t combine_lanes(const acc_t* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Shapes and raw pointers of one loss call.
template <typename scalar_t, typename acc_t>
struct LossJob : LossSizes {
  bool share_queries = true;
  LossParams<acc_t> params{};
  const scalar_t* z = nullptr;
  const int8_t* labels = nullptr;
  const uint8_t* keys = nullptr;
  const bool* keep = nullptr;
  acc_t* queries = nullptr;    // (G, kQueryRows, C): q+, q- and their lo parts (loss_math.h, split_query)
  acc_t* pixstats = nullptr;   // (N, 4, P): s+, s-, |k+|, |k-|
  acc_t* termstats = nullptr;  // (G, 4, kNumTermStats)
  int64_t group(int64_t n) const { return share_queries ? 0 : n; }
  const scalar_t* z_row(int64_t n, int64_t c) const { return z + (n * C + c) * P; }
  // Row `row` (QueryRow) of group g's queries.
  acc_t* query(int64_t g, int row) const { return queries + (g * kQueryRows + row) * C; }
};

// Calls fn(n) for each kept ROI n, in parallel over ROIs.
template <typename Job, typename Fn>
void for_each_kept_roi(const Job& job, Fn&& fn) {
  at::parallel_for(0, job.N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      if (job.keep[n]) fn(n);
  });
}

// Calls fn(n, i, key bits) for each key pixel i of each kept ROI n, in parallel over ROIs.
template <typename Job, typename Fn>
void for_each_key_pixel(const Job& job, Fn&& fn) {
  for_each_kept_roi(job, [&](int64_t n) {
    const uint8_t* key = job.keys + n * job.P;
    for (int64_t i = 0; i < job.P; ++i)
      if (key[i]) fn(n, i, key[i]);
  });
}

// out (G, K): the rows (N, K) of the kept ROIs summed per group, in ROI order.
template <typename Job, typename T>
void sum_rows_per_group(const Job& job, const T* rows, int64_t K, T* out) {
  std::fill(out, out + job.G * K, T(0));
  for (int64_t n = 0; n < job.N; ++n) {
    if (!job.keep[n]) continue;
    T* o = out + job.group(n) * K;
    for (int64_t k = 0; k < K; ++k) o[k] += rows[n * K + k];
  }
}

// ---------------------------------------------------------------- counts and weights

// count[n][side]: pixels labelled 1 (side 0) and 0 (side 1) of kept ROIs, 0 for dropped ones.
template <typename Job>
std::vector<int64_t> roi_counts(const Job& job) {
  std::vector<int64_t> count(job.N * 2, 0);
  at::parallel_for(0, job.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const int8_t* lab = job.labels + n * job.P;
      for (int64_t i = 0; i < job.P; ++i) {
        count[n * 2] += lab[i] == kForeground;
        count[n * 2 + 1] += lab[i] == kBackground;
      }
    }
  });
  return count;
}

// counts[kWithFg], counts[kWithBg]: kept ROIs whose partition is non-empty; counts[kKept]: kept ROIs.
template <typename Job>
void query_counts(const Job& job, const std::vector<int64_t>& count, double* counts) {
  int64_t with[2] = {0, 0}, kept = 0;
  for (int64_t n = 0; n < job.N * 2; ++n) with[n % 2] += count[n] > 0;
  for (int64_t n = 0; n < job.N; ++n) kept += job.keep[n];
  counts[kWithFg] = static_cast<double>(with[0]);
  counts[kWithBg] = static_cast<double>(with[1]);
  counts[kKept] = static_cast<double>(kept);
}

// w[n][side] = dq_side(group) / dz of a pixel of that partition: a query is the mean of partition means over
// kept ROIs whose partition is non-empty (DESIGN, "Queries for kept ROIs with an empty partition"); counts
// are the batch's (every rank's, for the global loss).
template <typename Job, typename acc_t>
std::vector<acc_t> query_weights(const Job& job, const std::vector<int64_t>& count, const double* counts) {
  std::vector<acc_t> w(job.N * 2, acc_t(0));
  for (int64_t n = 0; n < job.N * 2; ++n) {
    if (count[n] == 0) continue;
    const acc_t rois = job.share_queries ? acc_t(counts[kWithFg + n % 2]) : acc_t(1);
    w[n] = acc_t(1) / (rois * acc_t(count[n]));
  }
  return w;
}

// |q+|, |q-| of each group (their hi parts), summed on a scale (loss_math.h, row_norm); and, for the
// backward, the unit queries q / |q|, which stay finite where |q| is beyond the dtype's range.
template <typename Job, typename acc_t>
void query_norms(const Job& job, std::vector<acc_t>& norms, std::vector<acc_t>* unit_queries = nullptr) {
  norms.assign(job.G * 2, acc_t(0));
  if (unit_queries) unit_queries->resize(job.G * 2 * job.C);
  for (int64_t gs = 0; gs < job.G * 2; ++gs) {
    const acc_t* q = job.query(gs / 2, static_cast<int>(gs % 2));
    const RowNorm<acc_t> r = row_norm(q, job.C);
    norms[gs] = r.norm();
    if (unit_queries)
      for (int64_t c = 0; c < job.C; ++c) (*unit_queries)[gs * job.C + c] = (q[c] * r.scale) * r.unit();
  }
}

// The forward's stages (DESIGN, "Global query sharing"), each ending at a reduction point: query sums and
// counts; queries, cosines and the negatives' log-sum-exp pairs; the positives' sums; the group terms and
// the loss. The local loss runs them one after the other, the global loss sums or merges each stage's
// output over the ranks in between.

// Stage 1, pass 1 over z: partition means per ROI in double and their sums per group in ROI order
// (sums (G, 2, C); without shared queries the ROI's own means), and the counts.
template <typename scalar_t, typename acc_t>
void query_sums(const LossJob<scalar_t, acc_t>& job, double* sums, double* counts) {
  const int64_t N = job.N, C = job.C, P = job.P;
  const std::vector<int64_t> count = roi_counts(job);
  query_counts(job, count, counts);
  std::vector<double> roi_means(N * 2 * C, 0.0);
  for_each_kept_roi(job, [&](int64_t n) {
    const int8_t* lab = job.labels + n * P;
    const int64_t nf = count[n * 2], nb = count[n * 2 + 1];
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = job.z_row(n, c);
      // Selects, not products: a NaN in an ignored pixel must not reach the sums (DESIGN, "NaN").
      double fg[kLanes] = {}, bg[kLanes] = {};
      for_each_lane(P, [&](int j, int64_t i) {
        const double v = static_cast<double>(static_cast<acc_t>(row[i]));
        fg[j] += lab[i] == kForeground ? v : 0.0;
        bg[j] += lab[i] == kBackground ? v : 0.0;
      });
      roi_means[(n * 2) * C + c] = nf > 0 ? combine_lanes(fg) / static_cast<double>(nf) : 0.0;
      roi_means[(n * 2 + 1) * C + c] = nb > 0 ? combine_lanes(bg) / static_cast<double>(nb) : 0.0;
    }
  });
  sum_rows_per_group(job, roi_means.data(), 2 * C, sums);
}

// The queries (the sums divided by the number of ROIs that have the partition) split into hi and lo parts
// (loss_math.h).
template <typename scalar_t, typename acc_t>
void make_queries(const LossJob<scalar_t, acc_t>& job, const double* sums, const double* counts) {
  for (int64_t g = 0; g < job.G; ++g)
    for (int side = 0; side < 2; ++side) {
      const double rois = job.share_queries ? counts[kWithFg + side] : 1.0;
      acc_t* hi = job.query(g, kQueryPos + side);
      acc_t* lo = job.query(g, kQueryPosLo + side);
      for (int64_t c = 0; c < job.C; ++c) {
        const double s = sums[(g * 2 + side) * job.C + c];
        split_query(rois > 0 ? s / rois : 0.0, &hi[c], &lo[c]);
      }
    }
}

// Out of line: the rare path (|z| beyond ~1e18) inlined into cosines() slows its vectorised loops.
template <typename scalar_t, typename acc_t>
[[gnu::noinline, gnu::cold]] PixelCosines<acc_t> rescaled_cosines(const scalar_t* zi, int64_t P, int64_t C,
                                                                  const acc_t* qp, const acc_t* qm, const acc_t* qp_lo,
                                                                  const acc_t* qm_lo, bool centred) {
  return rescaled_pixel_cosines(zi, P, C, qp, qm, qp_lo, qm_lo, centred);
}

// Pass 2 over z: cosines of every pixel of kept ROIs with both queries of its group, and the norms of
// the key vectors (pixstats); a pixel whose sums overflow is computed again rescaled (loss_math.h).
template <typename scalar_t, typename acc_t>
void cosines(const LossJob<scalar_t, acc_t>& job, const std::vector<acc_t>& qnorm) {
  const int64_t N = job.N, C = job.C, P = job.P;
  const bool centred = job.params.centred_keys();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dot_p(P), dot_m(P), kk_p(P), kk_m(P);
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const int64_t g = job.group(n);
      const acc_t *qp = job.query(g, kQueryPos), *qm = job.query(g, kQueryNeg);
      const acc_t *qp_lo = job.query(g, kQueryPosLo), *qm_lo = job.query(g, kQueryNegLo);
      std::fill(dot_p.begin(), dot_p.end(), acc_t(0));
      std::fill(dot_m.begin(), dot_m.end(), acc_t(0));
      std::fill(kk_p.begin(), kk_p.end(), acc_t(0));
      std::fill(kk_m.begin(), kk_m.end(), acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = job.z_row(n, c);
        const acc_t a = qp[c], b = qm[c], a_lo = qp_lo[c], b_lo = qm_lo[c];
        if (centred) {
          for (int64_t i = 0; i < P; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            const acc_t up = centred_component(v, a, a_lo), um = centred_component(v, b, b_lo);
            add_cosine_component<true>(a, up, b, um, dot_p[i], dot_m[i], kk_p[i], kk_m[i]);
          }
        } else {
          for (int64_t i = 0; i < P; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            add_cosine_component<false>(a, v, b, v, dot_p[i], dot_m[i], kk_p[i], kk_m[i]);
          }
        }
      }
      acc_t* st = job.pixstats + n * 4 * P;
      for (int64_t i = 0; i < P; ++i) {
        PixelCosines<acc_t> r;
        if (!pixel_cosines_from_sums(dot_p[i], dot_m[i], kk_p[i], kk_m[i], qnorm[g * 2], qnorm[g * 2 + 1], centred, &r))
          r = rescaled_cosines(job.z_row(n, 0) + i, P, C, qp, qm, qp_lo, qm_lo, centred);
        st[i] = r.s_pos;
        st[P + i] = r.s_neg;
        st[2 * P + i] = r.kn_pos;
        st[3 * P + i] = r.kn_neg;
      }
    }
  });
}

// Log-sum-exp of each term's negatives per group as (max, sum of exp(x - max)) pairs, lse (G, 4, 2):
// per-ROI partials merged in ROI order.
template <typename scalar_t, typename acc_t>
void group_lse(const LossJob<scalar_t, acc_t>& job, acc_t* lse_out) {
  const int64_t N = job.N, P = job.P;
  std::vector<LseAcc<acc_t>> roi_lse(N * kNumTerms);
  for_each_key_pixel(job, [&](int64_t n, int64_t i, uint8_t bits) {
    const acc_t* st = job.pixstats + n * 4 * P;
    for (int t = 0; t < kNumTerms; ++t)
      if ((bits >> term_negative_set(t)) & 1)
        roi_lse[n * kNumTerms + t].add(st[term_side(t) * P + i] / job.params.tau(t));
  });
  std::vector<LseAcc<acc_t>> lse(job.G * kNumTerms);
  for (int64_t n = 0; n < N; ++n)
    for (int t = 0; t < kNumTerms; ++t) lse[job.group(n) * kNumTerms + t].merge(roi_lse[n * kNumTerms + t]);
  for (int64_t k = 0; k < job.G * kNumTerms; ++k) lse[k].store(lse_out + k * 2);
}

// Stage 3: termstats[.., kLse] from the (merged) pairs, and per group and term the positives' sums
// pos_sums (G, 4, kNumPosStats), from per-ROI partials summed in ROI order.
template <typename scalar_t, typename acc_t>
void positive_sums(const LossJob<scalar_t, acc_t>& job, const acc_t* lse, acc_t* sums) {
  const int64_t N = job.N, P = job.P;
  for (int64_t k = 0; k < job.G * kNumTerms; ++k)
    job.termstats[k * kNumTermStats + kLse] = LseAcc<acc_t>::load(lse + k * 2).value();
  std::vector<acc_t> roi_pos(N * kNumTerms * kNumPosStats, acc_t(0));
  for_each_key_pixel(job, [&](int64_t n, int64_t i, uint8_t bits) {
    const acc_t* st = job.pixstats + n * 4 * P;
    const acc_t* ts = job.termstats + job.group(n) * kNumTerms * kNumTermStats;
    acc_t* out = roi_pos.data() + n * kNumTerms * kNumPosStats;
    for (int t = 0; t < kNumTerms; ++t) {
      if (!((bits >> term_positive_set(t)) & 1)) continue;
      const acc_t s = st[term_side(t) * P + i];
      const acc_t lse_t = ts[t * kNumTermStats + kLse];
      const acc_t L = positive_log_denominator(s, lse_t, job.params, t);
      out[t * kNumPosStats + kPosLoss] += L - s / job.params.tau(t);
      out[t * kNumPosStats + kPosRatio] += cm_exp(lse_t - L);
      out[t * kNumPosStats + kPosCount] += acc_t(1);
    }
  });
  sum_rows_per_group(job, roi_pos.data(), kNumTerms * kNumPosStats, sums);
}

// Stage 4: the terms' statistics the backward reads (termstats), and the loss: the sum of the group's
// four terms, or without sharing their sum over this batch's ROIs divided by the kept count.
template <typename scalar_t, typename acc_t>
acc_t group_terms(const LossJob<scalar_t, acc_t>& job, const acc_t* pos_sums, const double* counts) {
  acc_t loss = 0;
  for (int64_t g = 0; g < job.G; ++g)
    for (int t = 0; t < kNumTerms; ++t) {
      const acc_t* sums = pos_sums + (g * kNumTerms + t) * kNumPosStats;
      acc_t* ts = job.termstats + (g * kNumTerms + t) * kNumTermStats;
      const acc_t inv = sums[kPosCount] > 0 ? acc_t(1) / sums[kPosCount] : acc_t(0);
      ts[kRatio] = sums[kPosRatio] * inv;
      ts[kInvPositives] = inv;
      ts[kValue] = sums[kPosLoss] * inv;
      loss += ts[kValue];
    }
  if (job.share_queries) return loss;
  const double kept = counts[kKept];
  return kept > 0 ? loss / acc_t(kept) : acc_t(0);
}

// Per key pixel and side: coefficients of cosine_backward and 1 / |k| of the side's key vector
// (coef (N, kNumCoef, P), the layout of the CUDA kernels).
enum Coef : int { kAP = 0, kAM, kGammaP, kGammaM, kBP, kBM, kInvP, kInvM, kNumCoef };

// Backward stage 1, in the unit vectors of cosine_backward (loss_math.h): u = (z - q) / |z - q| with centred
// keys (z - q formed as centred_component, from q's hi and lo parts), else z / |z|, and q^ = q / |q|.
// Per-pixel coefficients, and pass 1 over z: per group sum_n sum_i a_i u_i (dq (G, 2, C)) and sum of beta_i
// (beta (G, 2), in double: a key at its query has beta_i ~ dL/ds / eps, which cancels against gamma_i in
// dz; DESIGN, "Collapsed features"), both in ROI order. scale: upstream gradient (divided by the kept count
// without sharing) for the pixels' roles as positives, neg_scale for their roles as negatives.
template <typename scalar_t, typename acc_t>
void query_grads(const LossJob<scalar_t, acc_t>& job, acc_t scale, acc_t neg_scale, acc_t* coef, acc_t* dq,
                 double* beta_out) {
  const int64_t N = job.N, C = job.C, P = job.P;
  const bool centred = job.params.centred_keys();
  std::vector<acc_t> qnorm;
  query_norms(job, qnorm);
  std::fill(coef, coef + N * kNumCoef * P, acc_t(0));
  std::vector<acc_t> roi_dq(N * 2 * C, acc_t(0));
  std::vector<double> roi_beta(N * 2, 0.0);
  for_each_kept_roi(job, [&](int64_t n) {
    const int64_t g = job.group(n);
    const uint8_t* key = job.keys + n * P;
    const acc_t* st = job.pixstats + n * 4 * P;
    const acc_t* ts = job.termstats + g * kNumTerms * kNumTermStats;
    acc_t* cf = coef + n * kNumCoef * P;
    double beta[2] = {0, 0};
    for (int64_t i = 0; i < P; ++i) {
      if (!key[i]) continue;
      acc_t gs[2];
      similarity_grads(key[i], st[i], st[P + i], ts, job.params, scale, neg_scale, &gs[0], &gs[1]);
      for (int side = 0; side < 2; ++side) {
        const acc_t kn = st[(2 + side) * P + i];
        const CosGrad<acc_t> cg = cosine_backward(gs[side], st[side * P + i], qnorm[g * 2 + side], kn, centred);
        cf[(kAP + side) * P + i] = cg.a;
        cf[(kGammaP + side) * P + i] = cg.gamma;
        cf[(kBP + side) * P + i] = cg.b;
        cf[(kInvP + side) * P + i] = inverse_norm(kn);
        beta[side] += cg.beta;
      }
    }
    roi_beta[n * 2] = beta[0];
    roi_beta[n * 2 + 1] = beta[1];
    const acc_t *ap = cf + kAP * P, *am = cf + kAM * P, *ip = cf + kInvP * P, *im = cf + kInvM * P;
    const acc_t *q_pos = job.query(g, kQueryPos), *q_neg = job.query(g, kQueryNeg);
    const acc_t *q_pos_lo = job.query(g, kQueryPosLo), *q_neg_lo = job.query(g, kQueryNegLo);
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* row = job.z_row(n, c);
      const acc_t qp = centred ? q_pos[c] : acc_t(0), qm = centred ? q_neg[c] : acc_t(0);
      const acc_t qp_lo = centred ? q_pos_lo[c] : acc_t(0), qm_lo = centred ? q_neg_lo[c] : acc_t(0);
      acc_t sp[kLanes] = {}, sm[kLanes] = {};
      for_each_lane(P, [&](int j, int64_t i) {
        const acc_t v = static_cast<acc_t>(row[i]);
        const acc_t up = centred_component(v, qp, qp_lo) * ip[i] * ap[i];
        const acc_t um = centred_component(v, qm, qm_lo) * im[i] * am[i];
        sp[j] += ap[i] != acc_t(0) ? up : acc_t(0);
        sm[j] += am[i] != acc_t(0) ? um : acc_t(0);
      });
      roi_dq[(n * 2) * C + c] = combine_lanes(sp);
      roi_dq[(n * 2 + 1) * C + c] = combine_lanes(sm);
    }
  });
  sum_rows_per_group(job, roi_dq.data(), 2 * C, dq);
  sum_rows_per_group(job, roi_beta.data(), 2, beta_out);
}

// Backward stage 2, pass 2 over z: dz = partition term (through the queries: w * dL/dq, with
// dL/dq = dq + beta q^) + cosine terms of key pixels. Dropped ROIs get zeros.
template <typename scalar_t, typename acc_t>
void write_dz(const LossJob<scalar_t, acc_t>& job, const acc_t* coef, const acc_t* dq_sums, const double* beta,
              const double* counts, scalar_t* dz) {
  const int64_t N = job.N, C = job.C, P = job.P;
  const bool centred = job.params.centred_keys();
  const std::vector<int64_t> count = roi_counts(job);
  const std::vector<acc_t> w = query_weights<LossJob<scalar_t, acc_t>, acc_t>(job, count, counts);
  std::vector<acc_t> qnorm, unit_queries;
  query_norms(job, qnorm, &unit_queries);
  std::vector<acc_t> dq(dq_sums, dq_sums + job.G * 2 * C);
  for (int64_t gs = 0; gs < job.G * 2; ++gs)
    for (int64_t c = 0; c < C; ++c) dq[gs * C + c] += static_cast<acc_t>(beta[gs]) * unit_queries[gs * C + c];

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    // 1 where the pixel is in the foreground/background partition (floats, so that the loop below is one
    // vectorisable loop over float arrays).
    std::vector<acc_t> in_fg(P), in_bg(P);
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* out = dz + n * C * P;
      if (!job.keep[n]) {
        std::fill(out, out + C * P, scalar_t(0));
        continue;
      }
      const int64_t g = job.group(n);
      const int8_t* lab = job.labels + n * P;
      for (int64_t i = 0; i < P; ++i) {
        in_fg[i] = lab[i] == kForeground ? acc_t(1) : acc_t(0);
        in_bg[i] = lab[i] == kBackground ? acc_t(1) : acc_t(0);
      }
      const acc_t* cf = coef + n * kNumCoef * P;
      const acc_t *gp = cf + kGammaP * P, *gm = cf + kGammaM * P, *bp = cf + kBP * P, *bm = cf + kBM * P;
      const acc_t *ip = cf + kInvP * P, *im = cf + kInvM * P;
      const acc_t *q_pos = job.query(g, kQueryPos), *q_neg = job.query(g, kQueryNeg);
      const acc_t *q_pos_lo = job.query(g, kQueryPosLo), *q_neg_lo = job.query(g, kQueryNegLo);
      const acc_t* hat_p = unit_queries.data() + g * 2 * C;
      const acc_t* hat_m = hat_p + C;
      const acc_t* dqp = dq.data() + g * 2 * C;
      const acc_t* dqm = dqp + C;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* row = job.z_row(n, c);
        scalar_t* orow = out + c * P;
        const acc_t pf = w[n * 2] * dqp[c], pb = w[n * 2 + 1] * dqm[c], hp = hat_p[c], hm = hat_m[c];
        const acc_t qp = centred ? q_pos[c] : acc_t(0), qm = centred ? q_neg[c] : acc_t(0);
        const acc_t qp_lo = centred ? q_pos_lo[c] : acc_t(0), qm_lo = centred ? q_neg_lo[c] : acc_t(0);
        // Selects, not products, keep a NaN in an ignored non-key pixel out of dz (DESIGN, "NaN"); one of
        // the two partition selects is 0, so d equals the partition term exactly.
        // Products are taken unconditionally and then selected: a conditional product is a branch the
        // compiler may not turn into vector blends (it could trap where the branch would not).
        for (int64_t i = 0; i < P; ++i) {
          const acc_t v = static_cast<acc_t>(row[i]);
          const acc_t up = bp[i] * (centred_component(v, qp, qp_lo) * ip[i]);
          const acc_t um = bm[i] * (centred_component(v, qm, qm_lo) * im[i]);
          acc_t d = (in_fg[i] != acc_t(0) ? pf : acc_t(0)) + (in_bg[i] != acc_t(0) ? pb : acc_t(0));
          d += gp[i] * hp + gm[i] * hm;
          d += (bp[i] != acc_t(0) ? up : acc_t(0)) + (bm[i] != acc_t(0) ? um : acc_t(0));
          orow[i] = static_cast<scalar_t>(d);
        }
      }
    }
  });
}

// The backward's scales (query_grads) from the upstream gradient and the counts.
template <typename acc_t>
acc_t gradient_scale(bool share_queries, acc_t grad, const double* counts) {
  if (share_queries) return grad;
  const double kept = counts[kKept];
  return kept > 0 ? grad / acc_t(kept) : acc_t(0);
}

// The job of one call; the stage tensors given (defined) are read or written through it.
template <typename scalar_t, typename acc_t>
LossJob<scalar_t, acc_t> make_job(const LossInputs& in, const at::Tensor& queries = {}, const at::Tensor& pixstats = {},
                                  const at::Tensor& termstats = {}) {
  LossJob<scalar_t, acc_t> job;
  static_cast<LossSizes&>(job) = in;
  job.share_queries = in.share_queries;
  job.params = in.params<acc_t>();
  job.z = in.z.data_ptr<scalar_t>();
  job.labels = in.labels.data_ptr<int8_t>();
  job.keys = in.keys.data_ptr<uint8_t>();
  job.keep = in.keep.data_ptr<bool>();
  if (queries.defined()) job.queries = const_cast<acc_t*>(queries.data_ptr<acc_t>());
  if (pixstats.defined()) job.pixstats = const_cast<acc_t*>(pixstats.data_ptr<acc_t>());
  if (termstats.defined()) job.termstats = const_cast<acc_t*>(termstats.data_ptr<acc_t>());
  return job;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return const_cast<T*>(t.data_ptr<T>());
}

// ---------------------------------------------------------------- the device's side of the operators (loss_ops.h)

// The Device interface of loss_ops.h: CudaLoss in csrc/cuda/loss_kernels.cu declares the same functions (deliberate twins).

struct CpuLoss {
  struct Guard {
    explicit Guard(c10::Device) {}
  };

  static at::Tensor forward(const LossInputs& in, const at::Tensor& queries, const at::Tensor& pixstats,
                            const at::Tensor& termstats) {
    at::Tensor loss = at::zeros({}, in.acc_options());
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, queries, pixstats, termstats);
      std::vector<double> sums(in.G * 2 * in.C), counts(kNumCounts);
      contrastmask::query_sums(job, sums.data(), counts.data());
      make_queries(job, sums.data(), counts.data());
      std::vector<acc_t> qnorm;
      query_norms(job, qnorm);
      contrastmask::cosines(job, qnorm);
      std::vector<acc_t> lse(in.G * kNumTerms * 2), pos_sums(in.G * kNumTerms * kNumPosStats);
      group_lse(job, lse.data());
      positive_sums(job, lse.data(), pos_sums.data());
      loss.fill_(group_terms(job, pos_sums.data(), counts.data()));
    });
    return loss.to(in.z.scalar_type());
  }

  static void backward(const LossInputs& in, const at::Tensor& grad, const at::Tensor& queries,
                       const at::Tensor& pixstats, const at::Tensor& termstats, const at::Tensor& dz) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_backward_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, queries, pixstats, termstats);
      std::vector<double> counts(kNumCounts), beta(in.G * 2);
      query_counts(job, roi_counts(job), counts.data());
      const acc_t scale =
          gradient_scale(in.share_queries, static_cast<acc_t>(grad.to(at::kDouble).item<double>()), counts.data());
      std::vector<acc_t> coef(in.N * kNumCoef * in.P), dq(in.G * 2 * in.C);
      contrastmask::query_grads(job, scale, scale, coef.data(), dq.data(), beta.data());
      write_dz(job, coef.data(), dq.data(), beta.data(), counts.data(), ptr<scalar_t>(dz));
    });
  }

  static void query_sums(const LossInputs& in, const at::Tensor& sums, const at::Tensor& counts) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_query_sums_cpu", {
      contrastmask::query_sums(make_job<scalar_t, acc_t>(in), ptr<double>(sums), ptr<double>(counts));
    });
  }

  static void cosines(const LossInputs& in, const at::Tensor& sums, const at::Tensor& counts,
                      const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& lse) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_cosines_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, queries, pixstats);
      make_queries(job, ptr<double>(sums), ptr<double>(counts));
      std::vector<acc_t> qnorm;
      query_norms(job, qnorm);
      contrastmask::cosines(job, qnorm);
      group_lse(job, ptr<acc_t>(lse));
    });
  }

  static void terms(const LossInputs& in, const at::Tensor& pixstats, const at::Tensor& lse,
                    const at::Tensor& termstats, const at::Tensor& pos_sums) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_terms_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, {}, pixstats, termstats);
      positive_sums(job, ptr<acc_t>(lse), ptr<acc_t>(pos_sums));
    });
  }

  static void finish(const LossInputs& in, const at::Tensor& pos_sums, const at::Tensor& counts,
                     const at::Tensor& termstats, const at::Tensor& loss) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_finish_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, {}, {}, termstats);
      loss.fill_(group_terms(job, ptr<acc_t>(pos_sums), ptr<double>(counts)));
    });
  }

  static void query_grads(const LossInputs& in, const at::Tensor& grad, const c10::optional<at::Tensor>& neg_grad,
                          const at::Tensor& queries, const at::Tensor& pixstats, const at::Tensor& termstats,
                          const at::Tensor& counts, const at::Tensor& coef, const at::Tensor& dq,
                          const at::Tensor& beta) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_query_grads_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, queries, pixstats, termstats);
      const acc_t scale = gradient_scale(in.share_queries, static_cast<acc_t>(grad.to(at::kDouble).item<double>()),
                                         ptr<double>(counts));
      const acc_t neg_scale = neg_grad ? static_cast<acc_t>(neg_grad->to(at::kDouble).item<double>()) : scale;
      contrastmask::query_grads(job, scale, neg_scale, ptr<acc_t>(coef), ptr<acc_t>(dq), ptr<double>(beta));
    });
  }

  static void dz(const LossInputs& in, const at::Tensor& queries, const at::Tensor& coef, const at::Tensor& dq,
                 const at::Tensor& beta, const at::Tensor& counts, const at::Tensor& dz) {
    CM_DISPATCH_LOSS(in.z, "contrastive_loss_dz_cpu", {
      const auto job = make_job<scalar_t, acc_t>(in, queries);
      write_dz(job, ptr<acc_t>(coef), ptr<acc_t>(dq), ptr<double>(beta), ptr<double>(counts), ptr<scalar_t>(dz));
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(contrastmask, CPU, m) { register_loss_ops<CpuLoss>(m); }

}  // namespace contrastmask
