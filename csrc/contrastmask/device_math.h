// Device math shared by the host and CUDA: the CM_HD qualifier, float/double overloads of exp, log,
// sqrt, frexp/ldexp, bit counting, -inf, finiteness, |x| and a NaN-propagating max, so that the
// per-ROI math compiles for both.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define CM_HD __host__ __device__ __forceinline__
#else
#define CM_HD inline
#endif

namespace contrastmask {

// Overloads so that templated math picks the float or double routine on both devices: cm_<fn>(float)
// calls the C library's <fn>f, cm_<fn>(double) its <fn>.
#define CM_FLOAT_AND_DOUBLE(fn)                     \
  CM_HD float cm_##fn(float x) { return fn##f(x); } \
  CM_HD double cm_##fn(double x) { return fn(x); }
CM_FLOAT_AND_DOUBLE(exp)
CM_FLOAT_AND_DOUBLE(log)
CM_FLOAT_AND_DOUBLE(log1p)
CM_FLOAT_AND_DOUBLE(sqrt)
#undef CM_FLOAT_AND_DOUBLE
CM_HD float cm_frexp(float x, int* e) { return frexpf(x, e); }
CM_HD double cm_frexp(double x, int* e) { return frexp(x, e); }
CM_HD float cm_ldexp(float x, int e) { return ldexpf(x, e); }
CM_HD double cm_ldexp(double x, int e) { return ldexp(x, e); }

// Bit counting on 64-bit words (row bitmasks of the plan).
CM_HD int cm_popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}
// Index of the lowest set bit; x != 0.
CM_HD int cm_ctz64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

template <typename T>
CM_HD T neg_inf() { return static_cast<T>(-INFINITY); }

// False for inf and NaN.
template <typename T>
CM_HD bool is_finite(T x) { return x - x == T(0); }

template <typename T>
CM_HD T abs_value(T x) { return x < T(0) ? -x : x; }

// max that propagates NaN from either side (fmax would drop it).
template <typename T>
CM_HD T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }

}  // namespace contrastmask
