// Tiny kernels that test the CUDA emulator itself (tests/emulator/test_emulator.py), compiled into the
// emulation build by tests/emulator/cuda_emu.py. Each is written as CUDA with the macros of platform.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <map>
#include <string>

#include "cuda/platform.cuh"

namespace {

// out[t] = value written by thread (t + 1) % T of the block; with_barrier = 0 leaves out the barrier
// between the writes and the reads, a race that some fiber order exposes.
__global__ void neighbour_kernel(int* out, int with_barrier) {
  CM_SHARED(int, s, [1024]);
  const int t = threadIdx.x, T = blockDim.x;
  s[t] = 1000 * blockIdx.x + t;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * T + t] = s[(t + 1) % T];
}

// A barrier inside a branch that half of the block skips: the other half exits without it.
__global__ void divergent_barrier_kernel(int* out, int /*arg*/) {
  if (threadIdx.x % 2) __syncthreads();
  out[threadIdx.x] = 1;
}

// Two different barriers, one per half of the block.
__global__ void split_barrier_kernel(int* out, int /*arg*/) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Lane `arg` returns before a warp sum that needs it.
__global__ void exited_lane_kernel(int* out, int arg) {
  if (static_cast<int>(threadIdx.x) == arg) return;
  int v = threadIdx.x;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

// A shuffle over half a warp.
__global__ void partial_mask_kernel(int* out, int /*arg*/) {
  int v = threadIdx.x;
  if (threadIdx.x < 16) v += __shfl_xor_sync(0x0000ffffu, v, 1);
  out[threadIdx.x] = v;
}

// Lane 0 of warp 0 goes to the barrier while its warp waits for it in a shuffle.
__global__ void deadlock_kernel(int* out, int /*arg*/) {
  int v = threadIdx.x;
  if (threadIdx.x / 32 == 0 && threadIdx.x != 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Every shuffle kind and __syncthreads_or / __ballot_sync, for results checked in Python.
__global__ void collectives_kernel(int* out, int arg) {
  const int t = threadIdx.x, lane = t % 32;
  int* o = out + t * 6;
  o[0] = __shfl_xor_sync(0xffffffffu, t, 3);
  o[1] = __shfl_down_sync(0xffffffffu, t, 5);
  o[2] = __shfl_up_sync(0xffffffffu, t, 2, 8);
  o[3] = __shfl_sync(0xffffffffu, t, 7);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
  o[5] = __syncthreads_or(t == arg);
}

// Reads shared memory nobody wrote (garbage at every block start).
__global__ void uninitialised_shared_kernel(int* out, int /*arg*/) {
  CM_SHARED(int, s, [64]);
  out[threadIdx.x] = s[threadIdx.x % 64];
}

// Uses `arg` bytes of dynamic shared memory.
__global__ void dynamic_shared_kernel(int* out, int arg) {
  CM_DYNAMIC_SHARED(unsigned char, smem, 16);
  for (int i = threadIdx.x; i < arg; i += blockDim.x) smem[i] = 1;
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < arg; ++i) sum += smem[i];
  out[threadIdx.x] = sum;
}

// The kernels `run` launches, by name.
const std::map<std::string, void (*)(int*, int)> kTestKernels = {
    {"neighbour", neighbour_kernel},
    {"divergent_barrier", divergent_barrier_kernel},
    {"split_barrier", split_barrier_kernel},
    {"exited_lane", exited_lane_kernel},
    {"partial_mask", partial_mask_kernel},
    {"deadlock", deadlock_kernel},
    {"collectives", collectives_kernel},
    {"uninitialised_shared", uninitialised_shared_kernel},
    {"dynamic_shared", dynamic_shared_kernel},
};

// run(kernel, blocks, threads, dynamic shared bytes, arg, opt_in): out int32 (blocks * threads * 6);
// opt_in >= 0 sets cudaFuncAttributeMaxDynamicSharedMemorySize first.
at::Tensor run(const std::string& name, int64_t blocks, int64_t threads, int64_t smem, int64_t arg, int64_t opt_in) {
  const auto found = kTestKernels.find(name);
  TORCH_CHECK(found != kTestKernels.end(), "unknown test kernel ", name);
  const auto test_kernel = found->second;
  const c10::cuda::CUDAGuard guard(c10::Device(c10::kCPU));
  at::Tensor out = at::zeros({std::max<int64_t>(blocks * threads * 6, 1)}, at::kInt);
  if (opt_in >= 0)
    C10_CUDA_CHECK(cudaFuncSetAttribute(test_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(opt_in)));
  CM_LAUNCH(blocks, threads, smem, c10::cuda::getCurrentCUDAStream(), test_kernel)(out.data_ptr<int>(),
                                                                                   static_cast<int>(arg));
  return out;
}

}  // namespace

TORCH_LIBRARY(contrastmask_emulator_test, m) {
  // A tensor made by at::empty under the guard, as the CUDA host code makes its outputs.
  m.def("empty(int n, ScalarType dtype) -> Tensor", [](int64_t n, at::ScalarType dtype) {
    const c10::cuda::CUDAGuard guard(c10::Device(c10::kCPU));
    return at::empty({n}, at::TensorOptions().dtype(dtype));
  });
  m.def("run(str kernel, int blocks, int threads, int smem, int arg, int opt_in) -> Tensor", &run);
}
