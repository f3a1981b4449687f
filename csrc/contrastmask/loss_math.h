// Per-pixel and per-term math of the contrastive loss (SPEC steps 5-6), shared by CPU and CUDA.
// Notation as in docs/DESIGN.md: terms A, B, C, D; a pixel's key byte holds its set bits.
#pragma once

#include "device_math.h"
#include "sampling.h"

namespace contrastmask {

constexpr int kNumTerms = 4;
constexpr double kNormEps = 1e-8;  // cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))

// Term t: query side (0 = q+, 1 = q-), positive set, negative set, hard or easy temperature.
CM_HD int term_side(int t) { return t >> 1; }
CM_HD int term_positive_set(int t) { return t == 0 ? kEasyFg : t == 1 ? kHardFg : t == 2 ? kEasyBg : kHardBg; }
CM_HD int term_negative_set(int t) { return term_positive_set(t) ^ 2; }  // opposite partition, same difficulty
CM_HD bool term_is_hard(int t) { return (t & 1) != 0; }

// SPEC step 6's formula variants. A new variant is one more enumerator here plus its case in each
// LossParams property below (and in parse_formulation, csrc/ops/loss_inputs.h).
enum class Formulation : int {
  kPaper = 0,     // the paper's text: s = cos(q, z), the positive's own term at temperature t
  kReleased = 1,  // the authors' code: s = cos(q, z - q), the positive's own term without temperature
};

template <typename acc_t>
struct LossParams {
  acc_t tau_easy, tau_hard;
  Formulation formulation;
  CM_HD acc_t tau(int t) const { return term_is_hard(t) ? tau_hard : tau_easy; }
  // Keys enter the cosine centred on the query (z - q) rather than as z.
  CM_HD bool centred_keys() const { return formulation == Formulation::kReleased; }
  // Temperature of the positive's own term in the denominator.
  CM_HD acc_t positive_tau(int t) const { return formulation == Formulation::kReleased ? acc_t(1) : tau(t); }
};

// Per (group, term) statistics, laid out as termstats[..., 4].
enum TermStat : int { kLse = 0, kRatio = 1, kInvPositives = 2, kValue = 3, kNumTermStats = 4 };

template <typename acc_t>
CM_HD acc_t log_add_exp(acc_t a, acc_t b) {
  const acc_t m = nan_max(a, b);
  if (m == neg_inf<acc_t>()) return m;
  const acc_t lo = (a == m) ? b : a;
  return m + cm_log1p(cm_exp(lo - m));
}

// Running log-sum-exp as (max, sum of exp(x - max)); merged in a fixed order for determinism.
template <typename acc_t>
struct LseAcc {
  acc_t max = neg_inf<acc_t>();
  acc_t sum = acc_t(0);
  CM_HD void add(acc_t x) {
    if (x > max) {
      sum = sum * cm_exp(max - x) + acc_t(1);
      max = x;
    } else if (x != x) {  // NaN poisons the result
      max = x;
      sum = x;
    } else {
      sum += cm_exp(x - max);
    }
  }
  CM_HD void merge(const LseAcc& o) {
    if (o.sum == acc_t(0) && o.max == neg_inf<acc_t>()) return;
    if (o.max != o.max || max != max) {
      max = max != max ? max : o.max;
      sum = max;
      return;
    }
    if (o.max > max) {
      sum = sum * cm_exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * cm_exp(o.max - max);
    }
  }
  CM_HD acc_t value() const { return sum == acc_t(0) ? neg_inf<acc_t>() : max + cm_log(sum); }
};

// L_p = log(exp(s_p / t') + sum_g exp(s_g / t)) for a positive with similarity s.
template <typename acc_t>
CM_HD acc_t positive_log_denominator(acc_t s, acc_t lse_negatives, const LossParams<acc_t>& p, int t) {
  return log_add_exp(s / p.positive_tau(t), lse_negatives);
}

// dL/ds+ and dL/ds- of one pixel, summed over every term and role the pixel's key bits give it.
// `stats` points at the group's kNumTerms * kNumTermStats values; `scale` = upstream grad * weight.
template <typename acc_t>
CM_HD void similarity_grads(uint8_t bits, acc_t s_pos, acc_t s_neg, const acc_t* stats,
                            const LossParams<acc_t>& p, acc_t scale, acc_t* g_pos, acc_t* g_neg) {
  acc_t g[2] = {acc_t(0), acc_t(0)};
  for (int t = 0; t < kNumTerms; ++t) {
    const acc_t* st = stats + t * kNumTermStats;
    const acc_t s = term_side(t) == 0 ? s_pos : s_neg;
    const acc_t tau = p.tau(t);
    if ((bits >> term_positive_set(t)) & 1) {
      const acc_t ptau = p.positive_tau(t);
      const acc_t L = log_add_exp(s / ptau, st[kLse]);
      g[term_side(t)] += st[kInvPositives] * (cm_exp(s / ptau - L) / ptau - acc_t(1) / tau);
    }
    if ((bits >> term_negative_set(t)) & 1) {
      g[term_side(t)] += cm_exp(s / tau - st[kLse]) * st[kRatio] / tau;
    }
  }
  *g_pos = g[0] * scale;
  *g_neg = g[1] * scale;
}

// Cosine of one pixel against one query, from the accumulated dot product and squared norm:
// "paper": s = q.z / (|q| |z|); "released": s = q.(z - q) / (|q| |z - q|).
template <typename acc_t>
CM_HD acc_t clamped_norm(acc_t n) { return n > acc_t(kNormEps) ? n : acc_t(kNormEps); }

// Backward coefficients of one pixel for one query side, given dL/ds = gs (see docs/DESIGN.md):
//   dL/dq   += alpha * z + beta * q      (reduced over pixels)
//   dL/dz_i += gamma * q + b * z_i       (written per pixel)
// qn / kn: unclamped norms of the query and of the key vector in the cosine (z or z - q).
template <typename acc_t>
struct CosGrad {
  acc_t alpha, beta, gamma, b;
};

template <typename acc_t>
CM_HD CosGrad<acc_t> cosine_backward(acc_t gs, acc_t s, acc_t qn, acc_t kn, bool centred_keys) {
  const acc_t eps = acc_t(kNormEps);
  const acc_t Nq = clamped_norm(qn), Nk = clamped_norm(kn);
  const acc_t inv_qk = acc_t(1) / (Nq * Nk);
  const acc_t q_term = qn > eps ? s / (Nq * Nq) : acc_t(0);  // from d|q|/dq, zero where clamped
  const acc_t k_term = kn > eps ? s / (Nk * Nk) : acc_t(0);  // from d|k|/dk
  CosGrad<acc_t> c;
  c.gamma = gs * (inv_qk + (centred_keys ? k_term : acc_t(0)));
  c.b = -gs * k_term;
  if (!centred_keys) {
    c.alpha = gs * inv_qk;
    c.beta = -gs * q_term;
  } else {
    // k = z - q: ds/dq = ds/dq|_k - ds/dk.
    const acc_t A = inv_qk + k_term;
    c.alpha = gs * A;
    c.beta = -gs * (A + q_term + inv_qk);
  }
  return c;
}

}  // namespace contrastmask
