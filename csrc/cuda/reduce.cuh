// Fixed-order reductions and launch helpers for the CUDA kernels. Every reduction here combines
// values in an order fixed by thread and lane indices (shuffle butterflies, shared-memory trees),
// never by scheduling, and uses no float atomics: the same inputs give the same bits on every run.
#pragma once

#include <stdint.h>

#include "../contrastmask/loss_math.h"
#include "platform.cuh"

namespace contrastmask {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxBlockWarps = 32;  // 1024 threads

// Sum over the 32 lanes; every lane gets the same bits (IEEE addition is commutative).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Maximum over the 32 lanes of values >= 0 (a NaN is dropped unless every lane has one).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const T o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v || v != v ? o : v;
  }
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `scratch` holds kMaxBlockWarps values; the call synchronises the block and may be repeated.
template <typename T>
__device__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = T(0);
  if (warp == 0) {
    total = lane < warps ? scratch[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

// Log-sum-exp accumulators merged across a warp in a butterfly; lane 0's result is used.
template <typename acc_t>
__device__ __forceinline__ LseAcc<acc_t> warp_merge(LseAcc<acc_t> a) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    LseAcc<acc_t> b;
    b.max = __shfl_xor_sync(kFullMask, a.max, offset);
    b.sum = __shfl_xor_sync(kFullMask, a.sum, offset);
    a.merge(b);
  }
  return a;
}

// Merge over the block; the result is valid in thread 0. `scratch` holds 2 * kMaxBlockWarps values.
template <typename acc_t>
__device__ LseAcc<acc_t> block_merge(LseAcc<acc_t> a, acc_t* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  a = warp_merge(a);
  __syncthreads();
  if (lane == 0) {
    a.store(scratch + 2 * warp);
  }
  __syncthreads();
  LseAcc<acc_t> total;
  if (warp == 0) {
    if (lane < warps) {
      total = LseAcc<acc_t>::load(scratch + 2 * lane);
    }
    total = warp_merge(total);
  }
  return total;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace contrastmask
