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
struct LossJob {
  int64_t N = 0, C = 0, P = 0, G = 0;
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

// The partitions' pixel counts count[n][side] of kept ROIs, the number of kept ROIs with a non-empty
// partition `side` (rois_with), and the weights w[n][side] = dq_side(group) / dz of a pixel of that partition:
// a query is the mean of partition means over kept ROIs whose partition is non-empty (DESIGN, "Queries for
// kept ROIs with an empty partition").
template <typename acc_t>
struct QueryWeights {
  std::vector<int64_t> count;
  int64_t rois_with[2] = {0, 0};
  std::vector<acc_t> w;
};

template <typename Job, typename acc_t>
void query_weights(const Job& job, QueryWeights<acc_t>& qw) {
  std::vector<acc_t>& w = qw.w;
  std::vector<int64_t>& count = qw.count;
  w.assign(job.N * 2, acc_t(0));
  count.assign(job.N * 2, 0);
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
  int64_t* rois_with = qw.rois_with;
  for (int64_t n = 0; n < job.N * 2; ++n) rois_with[n % 2] += count[n] > 0;
  for (int64_t n = 0; n < job.N * 2; ++n) {
    if (count[n] == 0) continue;
    const acc_t rois = job.share_queries ? acc_t(rois_with[n % 2]) : acc_t(1);
    w[n] = acc_t(1) / (rois * acc_t(count[n]));
  }
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

// The forward's stages, named as in the CUDA file: partition sums (the queries), cosines, the
// negatives' log-sum-exp per group and term, the positives' sums, and the group terms.

// Pass 1 over z: partition means per ROI in double, their sums per group in ROI order, and the queries
// (the sums divided by the number of ROIs that have the partition) split into hi and lo parts (loss_math.h).
template <typename scalar_t, typename acc_t>
void partition_means(const LossJob<scalar_t, acc_t>& job, const QueryWeights<acc_t>& qw) {
  const int64_t N = job.N, C = job.C, P = job.P;
  std::vector<double> roi_means(N * 2 * C, 0.0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const int8_t* lab = job.labels + n * P;
      const int64_t nf = qw.count[n * 2], nb = qw.count[n * 2 + 1];
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
    }
  });
  std::vector<double> sums(job.G * 2 * C, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (!job.keep[n]) continue;
    double* q = sums.data() + job.group(n) * 2 * C;
    for (int64_t k = 0; k < 2 * C; ++k) q[k] += roi_means[n * 2 * C + k];
  }
  for (int64_t g = 0; g < job.G; ++g)
    for (int side = 0; side < 2; ++side) {
      const int64_t rois = job.share_queries ? qw.rois_with[side] : 1;
      acc_t* hi = job.query(g, kQueryPos + side);
      acc_t* lo = job.query(g, kQueryPosLo + side);
      for (int64_t c = 0; c < C; ++c) {
        const double s = sums[(g * 2 + side) * C + c];
        split_query(rois > 0 ? s / static_cast<double>(rois) : 0.0, &hi[c], &lo[c]);
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
            dot_p[i] += a * up;
            dot_m[i] += b * um;
            kk_p[i] += up * up;
            kk_m[i] += um * um;
          }
        } else {
          for (int64_t i = 0; i < P; ++i) {
            const acc_t v = static_cast<acc_t>(row[i]);
            dot_p[i] += a * v;
            dot_m[i] += b * v;
            kk_p[i] += v * v;
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

// Log-sum-exp of each term's negatives per group (termstats kLse): per-ROI partials merged in ROI order.
template <typename scalar_t, typename acc_t>
void group_lse(const LossJob<scalar_t, acc_t>& job) {
  const int64_t N = job.N, P = job.P;
  std::vector<LseAcc<acc_t>> roi_lse(N * kNumTerms);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const uint8_t* key = job.keys + n * P;
      const acc_t* st = job.pixstats + n * 4 * P;
      for (int64_t i = 0; i < P; ++i) {
        if (!key[i]) continue;
        for (int t = 0; t < kNumTerms; ++t)
          if ((key[i] >> term_negative_set(t)) & 1)
            roi_lse[n * kNumTerms + t].add(st[term_side(t) * P + i] / job.params.tau(t));
      }
    }
  });
  std::vector<LseAcc<acc_t>> lse(job.G * kNumTerms);
  for (int64_t n = 0; n < N; ++n)
    for (int t = 0; t < kNumTerms; ++t) lse[job.group(n) * kNumTerms + t].merge(roi_lse[n * kNumTerms + t]);
  for (int64_t g = 0; g < job.G; ++g)
    for (int t = 0; t < kNumTerms; ++t)
      job.termstats[(g * kNumTerms + t) * kNumTermStats + kLse] = lse[g * kNumTerms + t].value();
}

constexpr int kPosStats = 3;  // per term: sum of (L_p - s_p / t), sum of exp(lse - L_p), number of positives

// Per group and term, the positives' sums (kPosStats values), from per-ROI partials summed in ROI order.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> positive_sums(const LossJob<scalar_t, acc_t>& job) {
  const int64_t N = job.N, P = job.P;
  std::vector<acc_t> roi_pos(N * kNumTerms * kPosStats, acc_t(0));
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const uint8_t* key = job.keys + n * P;
      const acc_t* st = job.pixstats + n * 4 * P;
      const acc_t* ts = job.termstats + job.group(n) * kNumTerms * kNumTermStats;
      acc_t* out = roi_pos.data() + n * kNumTerms * kPosStats;
      for (int64_t i = 0; i < P; ++i) {
        if (!key[i]) continue;
        for (int t = 0; t < kNumTerms; ++t) {
          if (!((key[i] >> term_positive_set(t)) & 1)) continue;
          const acc_t s = st[term_side(t) * P + i];
          const acc_t lse = ts[t * kNumTermStats + kLse];
          const acc_t L = positive_log_denominator(s, lse, job.params, t);
          out[t * kPosStats] += L - s / job.params.tau(t);
          out[t * kPosStats + 1] += cm_exp(lse - L);
          out[t * kPosStats + 2] += acc_t(1);
        }
      }
    }
  });
  std::vector<acc_t> sums(job.G * kNumTerms * kPosStats, acc_t(0));
  for (int64_t n = 0; n < N; ++n)
    for (int k = 0; k < kNumTerms * kPosStats; ++k)
      sums[job.group(n) * kNumTerms * kPosStats + k] += roi_pos[n * kNumTerms * kPosStats + k];
  return sums;
}

// The terms' statistics the backward reads (termstats), and the loss: the sum of the group's four
// terms, or without sharing their mean over kept ROIs.
template <typename scalar_t, typename acc_t>
acc_t group_terms(const LossJob<scalar_t, acc_t>& job, const std::vector<acc_t>& pos_sums) {
  acc_t loss = 0;
  for (int64_t g = 0; g < job.G; ++g)
    for (int t = 0; t < kNumTerms; ++t) {
      const acc_t* sums = pos_sums.data() + (g * kNumTerms + t) * kPosStats;
      acc_t* ts = job.termstats + (g * kNumTerms + t) * kNumTermStats;
      const acc_t inv = sums[2] > 0 ? acc_t(1) / sums[2] : acc_t(0);
      ts[kRatio] = sums[1] * inv;
      ts[kInvPositives] = inv;
      ts[kValue] = sums[0] * inv;
      loss += ts[kValue];
    }
  if (job.share_queries) return loss;
  int64_t kept = 0;
  for (int64_t n = 0; n < job.N; ++n) kept += job.keep[n];
  return kept > 0 ? loss / acc_t(kept) : acc_t(0);
}

template <typename scalar_t, typename acc_t>
acc_t loss_forward(const LossJob<scalar_t, acc_t>& job) {
  QueryWeights<acc_t> qw;
  std::vector<acc_t> qnorm;
  query_weights(job, qw);
  partition_means(job, qw);
  query_norms(job, qnorm);
  cosines(job, qnorm);
  group_lse(job);
  return group_terms(job, positive_sums(job));
}

// The backward in the unit vectors of cosine_backward (loss_math.h): u = (z - q) / |z - q| with centred
// keys (z - q formed as centred_component, from q's hi and lo parts), else z / |z|, and q^ = q / |q|.
template <typename scalar_t, typename acc_t>
void loss_backward(const LossJob<scalar_t, acc_t>& job, acc_t grad, scalar_t* dz) {
  const int64_t N = job.N, C = job.C, P = job.P;
  const bool centred = job.params.centred_keys();
  int64_t kept = 0;
  for (int64_t n = 0; n < N; ++n) kept += job.keep[n];
  // Upstream gradient times the groups' weight in the loss (mean over ROIs without sharing).
  const acc_t scale = job.share_queries ? grad : (kept > 0 ? grad / acc_t(kept) : acc_t(0));
  QueryWeights<acc_t> qw;
  std::vector<acc_t> qnorm, unit_queries;
  query_weights(job, qw);
  const std::vector<acc_t>& w = qw.w;
  query_norms(job, qnorm, &unit_queries);

  // Pass 1 over z: per-pixel coefficients, and per ROI sum_i a_i u_i and sum_i beta_i (the latter in double:
  // a key at its query has beta_i ~ dL/ds / eps, which cancels against gamma_i in dz; DESIGN, "Collapsed
  // features").
  // kInFg/kInBg: 1 where the pixel is in the foreground/background partition (floats, so that pass 2
  // is one vectorisable loop over float arrays). kInvP/kInvM: 1 / |k| of each side's key vector.
  enum { kAP, kAM, kGammaP, kGammaM, kBP, kBM, kInvP, kInvM, kInFg, kInBg, kNumCoef };
  std::vector<acc_t> coef(N * kNumCoef * P, acc_t(0));
  std::vector<acc_t> roi_dq(N * 2 * C, acc_t(0));
  std::vector<double> roi_beta(N * 2, 0.0);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      if (!job.keep[n]) continue;
      const int64_t g = job.group(n);
      const uint8_t* key = job.keys + n * P;
      const acc_t* st = job.pixstats + n * 4 * P;
      const acc_t* ts = job.termstats + g * kNumTerms * kNumTermStats;
      acc_t* cf = coef.data() + n * kNumCoef * P;
      const int8_t* lab = job.labels + n * P;
      for (int64_t i = 0; i < P; ++i) {
        cf[kInFg * P + i] = lab[i] == kForeground ? acc_t(1) : acc_t(0);
        cf[kInBg * P + i] = lab[i] == kBackground ? acc_t(1) : acc_t(0);
      }
      double beta[2] = {0, 0};
      for (int64_t i = 0; i < P; ++i) {
        if (!key[i]) continue;
        acc_t gs[2];
        similarity_grads(key[i], st[i], st[P + i], ts, job.params, scale, &gs[0], &gs[1]);
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
    }
  });
  // dL/dq per group, in ROI order: sum_n (sum_i a_i u_i) + (sum_n beta_n) q^.
  std::vector<acc_t> dq(job.G * 2 * C, acc_t(0));
  std::vector<double> beta(job.G * 2, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (!job.keep[n]) continue;
    const int64_t g = job.group(n);
    for (int64_t k = 0; k < 2 * C; ++k) dq[g * 2 * C + k] += roi_dq[n * 2 * C + k];
    beta[g * 2] += roi_beta[n * 2];
    beta[g * 2 + 1] += roi_beta[n * 2 + 1];
  }
  for (int64_t gs = 0; gs < job.G * 2; ++gs)
    for (int64_t c = 0; c < C; ++c) dq[gs * C + c] += static_cast<acc_t>(beta[gs]) * unit_queries[gs * C + c];

  // Pass 2 over z: dz = partition term (through the queries) + cosine terms of key pixels.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      scalar_t* out = dz + n * C * P;
      if (!job.keep[n]) {
        std::fill(out, out + C * P, scalar_t(0));
        continue;
      }
      const int64_t g = job.group(n);
      const acc_t* cf = coef.data() + n * kNumCoef * P;
      const acc_t *in_fg = cf + kInFg * P, *in_bg = cf + kInBg * P;
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

template <typename scalar_t, typename acc_t>
LossJob<scalar_t, acc_t> make_job(const LossInputs& in) {
  LossJob<scalar_t, acc_t> job;
  job.N = in.N;
  job.C = in.C;
  job.P = in.P;
  job.G = in.G;
  job.share_queries = in.share_queries;
  job.params = in.params<acc_t>();
  job.z = in.z.data_ptr<scalar_t>();
  job.labels = in.labels.data_ptr<int8_t>();
  job.keys = in.keys.data_ptr<uint8_t>();
  job.keep = in.keep.data_ptr<bool>();
  return job;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_loss_cpu(
    const at::Tensor& z, const at::Tensor& labels, const at::Tensor& keys, const at::Tensor& keep, double tau_easy,
    double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossInputs in = loss_inputs(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  at::Tensor queries = at::zeros({in.G, kQueryRows, in.C}, in.acc_options());
  at::Tensor pixstats = at::zeros({in.N, 4, in.P}, in.acc_options());
  at::Tensor termstats = at::zeros({in.G, kNumTerms, kNumTermStats}, in.acc_options());
  at::Tensor loss = at::zeros({}, in.acc_options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto job = make_job<scalar_t, acc_t>(in);
    job.queries = queries.data_ptr<acc_t>();
    job.pixstats = pixstats.data_ptr<acc_t>();
    job.termstats = termstats.data_ptr<acc_t>();
    loss.fill_(loss_forward(job));
  });
  return {loss.to(z.scalar_type()), queries, pixstats, termstats};
}

at::Tensor contrastive_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& labels,
                                         const at::Tensor& keys, const at::Tensor& keep, const at::Tensor& queries,
                                         const at::Tensor& pixstats, const at::Tensor& termstats, double tau_easy,
                                         double tau_hard, bool share_queries, c10::string_view formulation) {
  const LossInputs in = loss_inputs(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation);
  check_backward_inputs(in, grad, queries, pixstats, termstats);
  const at::Tensor queries_c = queries.contiguous(), pixstats_c = pixstats.contiguous(),
                   termstats_c = termstats.contiguous();
  at::Tensor dz = at::empty(z.sizes(), z.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto job = make_job<scalar_t, acc_t>(in);
    job.queries = const_cast<acc_t*>(queries_c.data_ptr<acc_t>());
    job.pixstats = const_cast<acc_t*>(pixstats_c.data_ptr<acc_t>());
    job.termstats = const_cast<acc_t*>(termstats_c.data_ptr<acc_t>());
    loss_backward(job, static_cast<acc_t>(grad.to(at::kDouble).item<double>()), dz.data_ptr<scalar_t>());
  });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastmask, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
}

}  // namespace contrastmask
