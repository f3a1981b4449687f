// Reductions over the ROIs for the loss kernels (csrc/cuda/loss_kernels.cu): trees of fixed shape, no float
// atomics, so the same inputs give the same bits on every run (see reduce.cuh for the warp and block steps).
#pragma once

#include <ATen/ATen.h>

#include <stdint.h>

#include <algorithm>

#include "../contrastmask/loss_math.h"
#include "platform.cuh"
#include "reduce.cuh"

namespace contrastmask {
namespace cuda {

constexpr int kReduceThreads = 256;  // threads of the chunk and per-ROI kernels

// Grids are 1-D so that N is not limited to 65535.
inline void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= 2147483647, "contrastive_loss: batch too large for one CUDA launch (", blocks, " blocks)");
}
// The grid of a launch with a thread per work item: ceil(items / threads) blocks, checked.
inline unsigned grid_for(int64_t items, int64_t threads) {
  const int64_t blocks = ceil_div(items, threads);
  check_grid(blocks);
  return static_cast<unsigned>(blocks);
}
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Shared queries reduce over every ROI (N up to 10^5 and more). The reductions are trees of fixed
// shape: level one sums chunks of kRowsPerChunk rows in blocks side by side, the next level the
// chunks' partials, and so on until one row is left; the shape depends only on the row count, so the
// same inputs give the same bits on every run.
constexpr int64_t kRowsPerChunk = 256;

// Block shape of the chunk kernels: kx columns (a power of two up to a warp) times kReduceThreads / kx rows.
inline int chunk_block_x(int64_t K) {
  int kx = 1;
  while (kx < K && kx < kWarp) kx *= 2;
  return kx;
}

// The rows [first, last) of a chunk kernel's chunk (blockIdx.y) of the M rows, and this thread's column k.
struct ChunkRows {
  int64_t k, first, last;
};

__device__ __forceinline__ ChunkRows chunk_rows(int64_t M) {
  const int64_t first = int64_t(blockIdx.y) * kRowsPerChunk;
  return {int64_t(blockIdx.x) * blockDim.x + threadIdx.x, first,
          first + kRowsPerChunk < M ? first + kRowsPerChunk : M};
}

// out[chunk][k] = sum of in[m * K + k] over the rows m of the chunk whose ROI m / R is kept (every
// row when keep is null): thread (x, y) sums rows y, y + ny, ... of its chunk, then a tree over y.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) chunk_sums_kernel(const acc_t* in, const bool* keep, int64_t R, int64_t M,
                                                              int64_t K, acc_t* out) {
  CM_SHARED(acc_t, part, [kReduceThreads]);
  const int kx = blockDim.x, ny = blockDim.y, x = threadIdx.x, y = threadIdx.y;
  const auto [k, first, last] = chunk_rows(M);
  acc_t s = acc_t(0);
  if (k < K)
    for (int64_t m = first + y; m < last; m += ny)
      if (!keep || keep[m / R]) s += in[m * K + k];
  part[y * kx + x] = s;
  __syncthreads();
  for (int stride = ny / 2; stride > 0; stride /= 2) {
    if (y < stride) part[y * kx + x] += part[(y + stride) * kx + x];
    __syncthreads();
  }
  if (y == 0 && k < K) out[int64_t(blockIdx.y) * K + k] = part[x];
}

// Log-sum-exp pairs (max, sum) merged the same way: in[m][k] and out[chunk][k] hold 2 values each.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) chunk_lse_kernel(const acc_t* in, int64_t M, int64_t K, acc_t* out) {
  CM_SHARED(acc_t, part, [2 * kReduceThreads]);
  const int kx = blockDim.x, ny = blockDim.y, x = threadIdx.x, y = threadIdx.y;
  const auto [k, first, last] = chunk_rows(M);
  LseAcc<acc_t> acc;
  if (k < K)
    for (int64_t m = first + y; m < last; m += ny) acc.merge(LseAcc<acc_t>::load(in + (m * K + k) * 2));
  const int slot = 2 * (y * kx + x);
  acc.store(part + slot);
  __syncthreads();
  for (int stride = ny / 2; stride > 0; stride /= 2) {
    if (y < stride) {
      LseAcc<acc_t> a = LseAcc<acc_t>::load(part + slot);
      const LseAcc<acc_t> b = LseAcc<acc_t>::load(part + slot + 2 * stride * kx);
      a.merge(b);
      a.store(part + slot);
    }
    __syncthreads();
  }
  if (y == 0 && k < K) {
    out[(int64_t(blockIdx.y) * K + k) * 2] = part[2 * x];
    out[(int64_t(blockIdx.y) * K + k) * 2 + 1] = part[2 * x + 1];
  }
}

// out (K values, or K pairs when lse) = the tree reduction of M rows of in (see above).
template <typename acc_t>
void launch_reduce_rows(const acc_t* in, const bool* keep, int64_t R, int64_t M, int64_t K, bool lse, acc_t* out,
                        const at::TensorOptions& acc_opts) {
  const int64_t chunks = std::max<int64_t>(ceil_div(M, kRowsPerChunk), 1);
  TORCH_CHECK(chunks <= 65535, "contrastive_loss: too many rows to reduce in one launch (", M, ")");
  const int kx = chunk_block_x(K);
  const int64_t col_blocks = ceil_div(K, kx);
  check_grid(col_blocks);
  at::Tensor partial;
  acc_t* level_out = out;
  if (chunks > 1) {
    partial = at::empty({chunks, K * (lse ? 2 : 1)}, acc_opts);
    level_out = partial.data_ptr<acc_t>();
  }
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  if (lse) {
    CM_LAUNCH(grid, dim3(kx, kReduceThreads / kx), 0, stream(), chunk_lse_kernel<acc_t>)(in, M, K, level_out);
  } else {
    CM_LAUNCH(grid, dim3(kx, kReduceThreads / kx), 0, stream(), chunk_sums_kernel<acc_t>)(in, keep, R, M, K, level_out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 1) launch_reduce_rows<acc_t>(level_out, nullptr, 1, chunks, K, lse, out, acc_opts);
}

// Per-ROI queries: out[n][k] = sum over r < R of in[(n * R + r) * K + k] for kept ROIs n, else 0; one
// thread per (n, k), in order of r.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads) sum_per_roi_kernel(const acc_t* in, const bool* keep, int64_t N, int64_t R,
                                                               int64_t K, acc_t* out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= N * K) return;
  const int64_t n = e / K, k = e % K;
  acc_t s = acc_t(0);
  if (keep[n])
    for (int64_t r = 0; r < R; ++r) s += in[(n * R + r) * K + k];
  out[e] = s;
}

// out[g][k] = sum over the kept ROIs n of group g, and r < R, of in[(n * R + r) * K + k], in a fixed
// order (G = 1 with shared queries, else G = N).
template <typename acc_t>
void launch_sum_over_rois(const acc_t* in, const bool* keep, int64_t N, int64_t R, int64_t K, bool share_queries,
                          acc_t* out, const at::TensorOptions& acc_opts) {
  if (share_queries) {
    launch_reduce_rows<acc_t>(in, keep, R, N * R, K, /*lse=*/false, out, acc_opts);
    return;
  }
  if (N * K == 0) return;
  CM_LAUNCH(grid_for(N * K, kReduceThreads), kReduceThreads, 0, stream(), sum_per_roi_kernel<acc_t>)(
      in, keep, N, R, K, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace contrastmask
