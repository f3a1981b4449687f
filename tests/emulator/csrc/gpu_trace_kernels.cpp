// Tiny kernels with known memory behaviour, for the memory-traffic trace (tests/emulator/test_gpu_trace.py),
// compiled with the kernels into the traced emulation build (tests/emulator/gpu_trace.py). The tests find
// the lines by their "TRACE:" markers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/platform.cuh"

namespace {

// out[i] = in[i * stride + offset]: stride 1 is a coalesced copy, 32 a strided read, 0 a broadcast.
__global__ void copy_kernel(const float* in, float* out, int stride, int offset) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i * stride + offset];  // TRACE: copy
}

// Shared memory written with stride 1, then read at (t * stride) % 1024: stride 32 puts a warp's 32
// words in one bank, stride 1 in 32 banks, stride 0 on one word (a broadcast).
__global__ void shared_kernel(float* out, int stride, int /*unused*/) {
  CM_SHARED(float, s, [1024]);
  const int t = threadIdx.x;
  for (int i = t; i < 1024; i += blockDim.x) s[i] = static_cast<float>(i);  // TRACE: shared store
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t * stride) % 1024];  // TRACE: shared load
}

// Atomics on one shared word (every lane) and one global word (thread 0 of each block), and two
// barriers per block.
__global__ void atomic_kernel(int* out, int /*unused*/, int /*unused*/) {
  CM_SHARED(int, count);
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  atomicAdd(&count, 1);  // TRACE: shared atomic
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out, count);  // TRACE: global atomic
}

// Loads of a half-warp only (lanes 0..15), each of an 8-byte double: 16 x 8 = 128 bytes, 4 sectors.
__global__ void half_warp_kernel(const double* in, double* out, int /*unused*/) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 32 < 16) out[i] = in[i];  // TRACE: half warp
}

// A loop of 8 iterations with two conditional loads: the first skipped by some lanes in one iteration
// each (where in[it * 32 + lane] < 0), the second run by every lane once, in iteration lane % 8. On a
// GPU the warp runs each iteration together: 8 requests per line, each within one iteration.
__global__ void divergent_loop_kernel(const float* in, float* out, int /*unused*/) {
  const int lane = threadIdx.x % 32;
  float s = 0.f;
  for (int it = 0; it < 8; ++it) {
    const float v = in[it * 32 + lane];  // TRACE: loop anchor
    if (v < 0.f) continue;
    s += in[256 + it * 32 + lane];  // TRACE: loop conditional
    if (it == lane % 8) s += in[512 + lane];  // TRACE: loop once
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// run(kernel, blocks, threads, stride, offset): `in` is read by the host code first (instrumented
// too, but outside a kernel: not recorded), then the kernel runs.
at::Tensor run(const std::string& name, const at::Tensor& in, int64_t blocks, int64_t threads, int64_t stride,
               int64_t offset) {
  TORCH_CHECK(in.is_contiguous() && in.device().is_cpu(), "trace test kernels take contiguous CPU tensors");
  const c10::cuda::CUDAGuard guard(c10::Device(c10::kCPU));
  at::Tensor out = at::zeros({blocks * threads}, in.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int s = static_cast<int>(stride), o = static_cast<int>(offset);
  if (name == "host_then_copy") {
    const float* p = in.data_ptr<float>();
    volatile float sink = 0.f;
    for (int64_t i = 0; i < in.numel(); ++i) sink = sink + p[i];  // TRACE: host read
    (void)sink;
  }
  if (name == "copy" || name == "host_then_copy") {
    CM_LAUNCH(blocks, threads, 0, stream, copy_kernel)(in.data_ptr<float>(), out.data_ptr<float>(), s, o);
  } else if (name == "shared") {
    CM_LAUNCH(blocks, threads, 0, stream, shared_kernel)(out.data_ptr<float>(), s, o);
  } else if (name == "atomic") {
    CM_LAUNCH(blocks, threads, 0, stream, atomic_kernel)(out.data_ptr<int>(), s, o);
  } else if (name == "divergent_loop") {
    CM_LAUNCH(blocks, threads, 0, stream, divergent_loop_kernel)(in.data_ptr<float>(), out.data_ptr<float>(), s);
  } else if (name == "half_warp") {
    CM_LAUNCH(blocks, threads, 0, stream, half_warp_kernel)(in.data_ptr<double>(), out.data_ptr<double>(), s);
  } else {
    TORCH_CHECK(false, "unknown trace test kernel ", name);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(contrastmask_trace_test, m) {
  m.def("run(str kernel, Tensor input, int blocks, int threads, int stride, int offset) -> Tensor", &run);
}
