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
  // As the kernels keep it in memory: the pair (max, sum) at pair[0], pair[1].
  static CM_HD LseAcc load(const acc_t* pair) {
    LseAcc a;
    a.max = pair[0];
    a.sum = pair[1];
    return a;
  }
  CM_HD void store(acc_t* pair) const {
    pair[0] = max;
    pair[1] = sum;
  }
};

// L_p = log(exp(s_p / t') + sum_g exp(s_g / t)) for a positive with similarity s.
template <typename acc_t>
CM_HD acc_t positive_log_denominator(acc_t s, acc_t lse_negatives, const LossParams<acc_t>& p, int t) {
  return log_add_exp(s / p.positive_tau(t), lse_negatives);
}

// dL/ds+ and dL/ds- of one pixel, summed over every term and role the pixel's key bits give it.
// `stats` points at the group's kNumTerms * kNumTermStats values; `scale` = upstream grad * weight of the
// pixel's roles as a positive, `neg_scale` that of its roles as a negative. They differ only in the global
// loss (DESIGN, "Global query sharing"), whose kRatio already holds the ranks' upstream gradients; when
// they are equal the pixel's gradient is formed as it always was, (positives + negatives) * scale.
template <typename acc_t>
CM_HD void similarity_grads(uint8_t bits, acc_t s_pos, acc_t s_neg, const acc_t* stats,
                            const LossParams<acc_t>& p, acc_t scale, acc_t neg_scale, acc_t* g_pos, acc_t* g_neg) {
  acc_t g[2] = {acc_t(0), acc_t(0)}, gn[2] = {acc_t(0), acc_t(0)};
  const bool same = scale == neg_scale;
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
      (same ? g : gn)[term_side(t)] += cm_exp(s / tau - st[kLse]) * st[kRatio] / tau;
    }
  }
  *g_pos = same ? g[0] * scale : g[0] * scale + gn[0] * neg_scale;
  *g_neg = same ? g[1] * scale : g[1] * scale + gn[1] * neg_scale;
}

// The loss's reduction points (DESIGN, "Global query sharing"), between the stages of the forward and the
// backward. counts (kNumCounts doubles): kept ROIs with a non-empty foreground / background partition (a
// shared query's divisor), and kept ROIs (the mean's divisor without shared queries).
enum QueryCount : int { kWithFg = 0, kWithBg = 1, kKept = 2, kNumCounts = 3 };
// Per group and term, the positives' sums: sum of (L_p - s_p / t), sum of exp(lse - L_p), |P|.
enum PosStat : int { kPosLoss = 0, kPosRatio = 1, kPosCount = 2, kNumPosStats = 3 };

// Large features (DESIGN, "Numerics"). Squares and products of float32 features overflow once |z|
// reaches about 1e18. A pixel whose cosines overflow is computed again with its key vector and each query
// multiplied by powers of two (feature_scale of their largest component): a cosine does not change when
// either of its two vectors is scaled, and a power-of-two product is exact, so the result is what
// unbounded arithmetic gives, but for a vector's components 2^95 (float; 2^767 double) or more below its
// largest, whose squares underflow. Every other pixel is computed unscaled, as it always was.
// feature_scale(m) brings m to [2^(top-1), 2^top) when it is above 2^top, else 1; top = 32 (float) or
// 256 (double) keeps C * 2^(2 top) far from overflow.
template <typename acc_t>
CM_HD int scale_exponent() { return sizeof(acc_t) == 4 ? 32 : 256; }

template <typename acc_t>
CM_HD acc_t feature_scale(acc_t max_abs) {
  const int top = scale_exponent<acc_t>();
  // Not above the bound, NaN or inf: c = 1 (a NaN or inf feature then gives NaN, as without scaling).
  if (!(max_abs > cm_ldexp(acc_t(1), top)) || max_abs - max_abs != acc_t(0)) return acc_t(1);
  int e = 0;
  cm_frexp(max_abs, &e);  // max_abs = f * 2^e, f in [0.5, 1)
  return cm_ldexp(acc_t(1), top - e);
}

template <typename acc_t>
CM_HD acc_t clamped_norm(acc_t n, acc_t eps = acc_t(kNormEps)) { return n > eps ? n : eps; }

// Queries in two parts (DESIGN, "Collapsed features"). The partition sums and means behind a query are taken in
// double whatever z's dtype: for float32 features their rounding is 2^29 times smaller than float32's,
// and a constant partition's sum k * c is exact (c has 24 significant bits, k <= 4096 adds 12), so its
// mean sum / k is c exactly, as is the shared query's mean of ROI means that all equal c. Each query q
// is kept as hi + lo: hi = q rounded to acc_t, lo = q - hi rounded to acc_t (0 for float64
// z, whose acc_t is double). The saved tensor `queries` (G, kQueryRows, C) holds rows q+ hi, q- hi,
// q+ lo, q- lo. Cosines and norms use hi; a centred key ("released") is formed as (z - hi) - lo, where
// z - hi is exact whenever z lies within a factor 2 of hi (Sterbenz), i.e. whenever z - q is small
// enough for q's rounding to matter: the key is z - q to acc_t's precision of the key itself, as float64
// computes it, instead of z - round(q), whose rounding error (|q| * 2^-24 in float32) can exceed the
// key and decide its direction (a constant partition gave keys of pure rounding noise).
constexpr int kQueryRows = 4;
enum QueryRow : int { kQueryPos = 0, kQueryNeg = 1, kQueryPosLo = 2, kQueryNegLo = 3 };

// The rows of group g's queries in `queries` (G, kQueryRows, C).
template <typename acc_t>
struct QueryRows {
  const acc_t *pos, *neg, *pos_lo, *neg_lo;
};

template <typename acc_t>
CM_HD QueryRows<acc_t> query_rows(const acc_t* queries, int64_t g, int64_t C) {
  const acc_t* q = queries + g * kQueryRows * C;
  return {q + kQueryPos * C, q + kQueryNeg * C, q + kQueryPosLo * C, q + kQueryNegLo * C};
}

template <typename acc_t>
CM_HD void split_query(double q, acc_t* hi, acc_t* lo) {
  const acc_t h = static_cast<acc_t>(q);
  *hi = h;
  // hi beyond acc_t's range (inf) or NaN: no residual (a NaN query stays NaN through hi).
  *lo = is_finite(h) ? static_cast<acc_t>(q - static_cast<double>(h)) : acc_t(0);
}

// A component of the centred key z - q, with q = hi + lo.
template <typename acc_t>
CM_HD acc_t centred_component(acc_t v, acc_t hi, acc_t lo) { return (v - hi) - lo; }

// One component's step of a pixel's cosine sums: the dot products with q+ and q- (components a and b)
// and the squared norms of the key vectors. With centred keys up and um are the components of z - q+ and
// z - q-; else both are z's, the one key vector of both cosines, whose norm is kk_p (kk_m is left alone).
template <bool kCentredKeys, typename acc_t>
CM_HD void add_cosine_component(acc_t a, acc_t up, acc_t b, acc_t um, acc_t& dot_p, acc_t& dot_m, acc_t& kk_p,
                                acc_t& kk_m) {
  dot_p += a * up;
  dot_m += b * um;
  kk_p += up * up;
  if (kCentredKeys) kk_m += um * um;
}

// A row of n values (a query) measured on a scale that cannot overflow: feature_scale of its largest
// |x_i|. |x| = scaled_norm / scale (inf beyond the dtype's range), and the unit vector
// x / max(|x|, eps) = (x_i * scale) * unit(), which stays finite whatever |x| is.
template <typename acc_t>
struct RowNorm {
  acc_t scale, scaled_norm;
  CM_HD acc_t norm() const { return scaled_norm / scale; }
  CM_HD acc_t unit() const { return acc_t(1) / clamped_norm(scaled_norm, acc_t(kNormEps) * scale); }
};

template <typename acc_t>
CM_HD RowNorm<acc_t> row_norm(const acc_t* x, int64_t n) {
  acc_t m = acc_t(0);
  for (int64_t i = 0; i < n; ++i) m = nan_max(m, abs_value(x[i]));
  const acc_t c = feature_scale(m);
  acc_t ss = acc_t(0);
  for (int64_t i = 0; i < n; ++i) ss += (x[i] * c) * (x[i] * c);
  return RowNorm<acc_t>{c, cm_sqrt(ss)};
}

// One pixel's cosines with q+ and q-, and the (unscaled) norms of its key vectors:
// "paper": s = q.z / (|q| |z|); "released": s = q.(z - q) / (|q| |z - q|); each norm clamped at eps.
template <typename acc_t>
struct PixelCosines {
  acc_t s_pos, s_neg, kn_pos, kn_neg;
};

// The cosines from the pixel's unscaled sums (dot products and squared key norms), or false when they
// overflowed: the pixel is then computed again by rescaled_pixel_cosines.
template <typename acc_t>
CM_HD bool pixel_cosines_from_sums(acc_t dot_p, acc_t dot_m, acc_t kk_p, acc_t kk_m, acc_t qn_p, acc_t qn_m,
                                   bool centred_keys, PixelCosines<acc_t>* out) {
  const acc_t kp = cm_sqrt(kk_p), km = centred_keys ? cm_sqrt(kk_m) : kp;
  const acc_t den_p = clamped_norm(qn_p) * clamped_norm(kp), den_m = clamped_norm(qn_m) * clamped_norm(km);
  out->s_pos = dot_p / den_p;
  out->s_neg = dot_m / den_m;
  out->kn_pos = kp;
  out->kn_neg = km;
  return is_finite(dot_p) && is_finite(dot_m) && is_finite(den_p) && is_finite(den_m);
}

// A pixel's cosines for a pixel whose unscaled sums overflowed: each query q is taken as q * cq and the
// key vector k (z, or z - q) as k * ck, cq and ck from feature_scale of the vector's own largest
// component, and the clamp eps scales with each. The query norms are summed here on that scale too (a
// norm can overflow where its components do not). zi[k * stride], k < C: the pixel's features; qp, qm:
// the group's queries (hi parts); qp_lo, qm_lo: their lo parts (read with centred keys only).
template <typename scalar_t, typename acc_t>
CM_HD PixelCosines<acc_t> rescaled_pixel_cosines(const scalar_t* zi, int64_t stride, int64_t C, const acc_t* qp,
                                                 const acc_t* qm, const acc_t* qp_lo, const acc_t* qm_lo,
                                                 bool centred_keys) {
  // Largest |component| of z, q+, q- and, with centred keys, of z - q+ and z - q- (inf where it overflows).
  acc_t mz = acc_t(0), mp = acc_t(0), mm = acc_t(0), mdp = acc_t(0), mdm = acc_t(0);
  for (int64_t k = 0; k < C; ++k) {
    const acc_t v = static_cast<acc_t>(zi[k * stride]);
    mz = nan_max(mz, abs_value(v));
    mp = nan_max(mp, abs_value(qp[k]));
    mm = nan_max(mm, abs_value(qm[k]));
    if (centred_keys) {
      mdp = nan_max(mdp, abs_value(centred_component(v, qp[k], qp_lo[k])));
      mdm = nan_max(mdm, abs_value(centred_component(v, qm[k], qm_lo[k])));
    }
  }
  const acc_t cqp = feature_scale(mp), cqm = feature_scale(mm);
  // A centred key takes the scale of z - q itself, so that one whose large components cancel keeps its
  // digits; where z - q overflows, the scale of |z| + |q| (then z and q are scaled before subtracting).
  const acc_t ckp = feature_scale(!centred_keys ? mz : is_finite(mdp) ? mdp : nan_max(mz, mp));
  const acc_t ckm = !centred_keys ? ckp : feature_scale(is_finite(mdm) ? mdm : nan_max(mz, mm));
  acc_t dot_p = 0, dot_m = 0, kk_p = 0, kk_m = 0, qq_p = 0, qq_m = 0;
  for (int64_t k = 0; k < C; ++k) {
    const acc_t v = static_cast<acc_t>(zi[k * stride]);
    const acc_t a = qp[k] * cqp, b = qm[k] * cqm;
    qq_p += a * a;
    qq_m += b * b;
    if (centred_keys) {
      // Power-of-two scales are exact, so this is centred_component on the key's scale.
      const acc_t up = centred_component(v * ckp, qp[k] * ckp, qp_lo[k] * ckp);
      const acc_t um = centred_component(v * ckm, qm[k] * ckm, qm_lo[k] * ckm);
      add_cosine_component<true>(a, up, b, um, dot_p, dot_m, kk_p, kk_m);
    } else {
      const acc_t u = v * ckp;
      add_cosine_component<false>(a, u, b, u, dot_p, dot_m, kk_p, kk_m);
    }
  }
  const acc_t eps = acc_t(kNormEps);
  const acc_t kp = cm_sqrt(kk_p), km = centred_keys ? cm_sqrt(kk_m) : kp;
  PixelCosines<acc_t> r;
  r.s_pos = dot_p / (clamped_norm(cm_sqrt(qq_p), eps * cqp) * clamped_norm(kp, eps * ckp));
  r.s_neg = dot_m / (clamped_norm(cm_sqrt(qq_m), eps * cqm) * clamped_norm(km, eps * ckm));
  r.kn_pos = kp / ckp;
  r.kn_neg = km / ckm;
  return r;
}

// Backward of one cosine s = q.k / (max(|q|, eps) max(|k|, eps)) given dL/ds = gs, with k = z or, with
// centred keys, k = z - q. It is written on the unit vectors q^ = q / max(|q|, eps) and
// u = k / max(|k|, eps) (see docs/DESIGN.md, "Numerics"):
//   dL/dz_i += gamma q^ + b u_i          (per pixel)
//   dL/dq   += a u_i + beta q^           (summed over pixels)
// qn / kn: unscaled, unclamped norms of the query and of the key vector. Each coefficient is about
// gs / |q| or gs / |k|, never the product of two inverse norms, which underflows float32 for |z| ~ 1e19.
template <typename acc_t>
struct CosGrad {
  acc_t a, beta, gamma, b;
};

template <typename acc_t>
CM_HD CosGrad<acc_t> cosine_backward(acc_t gs, acc_t s, acc_t qn, acc_t kn, bool centred_keys) {
  const acc_t eps = acc_t(kNormEps);
  const acc_t iq = acc_t(1) / clamped_norm(qn), ik = acc_t(1) / clamped_norm(kn);
  // The terms of d|q|/dq and d|k|/dk, zero where the norm is clamped.
  const acc_t q_term = qn > eps ? gs * s * iq : acc_t(0);
  const acc_t k_term = kn > eps ? gs * s * ik : acc_t(0);
  CosGrad<acc_t> c;
  c.gamma = gs * ik;
  c.b = -k_term;
  if (!centred_keys) {
    c.a = gs * iq;
    c.beta = -q_term;
  } else {
    // k = z - q: ds/dq = ds/dq|_k - ds/dk.
    c.a = gs * iq + k_term;
    c.beta = -q_term - c.gamma;
  }
  return c;
}

// 1 / max(|k|, eps): the factor that turns a key vector k into the unit vector u of cosine_backward.
template <typename acc_t>
CM_HD acc_t inverse_norm(acc_t n) { return acc_t(1) / clamped_norm(n); }

}  // namespace contrastmask
