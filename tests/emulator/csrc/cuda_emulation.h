// CUDA emulation for tests: compiles the project's .cu sources with the host C++ compiler and runs
// their kernels on the CPU (test-only; never part of the installed package, see tests/emulator/cuda_emu.py).
//
// Every CUDA thread runs as a fiber of its block; blocks run one after another. Fibers switch only
// at __syncthreads*, __syncwarp, __shfl_*_sync and __ballot_sync, in an order chosen per run
// (forward, reverse or seeded random), so a missing barrier changes results under some order. The
// runtime (cuda_emulation.cpp) raises a clear error for: a barrier not reached by every thread of the
// block (divergent, or after some thread exited), a deadlock, a warp collective whose lane has exited
// or diverged or whose mask is partial, an empty or oversized grid or block, dynamic shared memory
// over 48 KB without cudaFuncAttributeMaxDynamicSharedMemorySize, and shared memory over the device
// limit. Shared memory is filled with garbage at every block start, and host allocations made under
// a c10::cuda::CUDAGuard (every at::empty of the CUDA host code) are filled with NaN / garbage.
//
// The .cu sources use the macros of csrc/cuda/platform.cuh for what plain C++ cannot parse: kernel
// launches (CM_LAUNCH) and shared arrays (CM_SHARED, CM_DYNAMIC_SHARED).
//
// With CONTRASTMASK_EMU_TRACE defined (the traced build of tests/emulator/gpu_trace.py) the runtime also records
// the memory accesses of the kernels, which that build compiles with -fsanitize=kernel-address: every
// load and store calls a hook the runtime defines (docs/DESIGN.md, "Memory-traffic trace").
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <stdint.h>
#include <string.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------- CUDA keywords and builtins

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

namespace contrastmask {
namespace emu {

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

}  // namespace emu
}  // namespace contrastmask

using dim3 = ::contrastmask::emu::dim3;
using uint3 = ::contrastmask::emu::uint3;

// The builtins of the running fiber: the scheduler writes them before switching to a fiber.
// (A switch is an opaque call, so compiled code reloads them after every synchronisation.)
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- runtime API subset

// The enums copy CUDA's names and values, one enumerator a line.

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;  // static shared memory (the emulator knows it once the kernel has run)
  int maxDynamicSharedSizeBytes = 0;
  int maxThreadsPerBlock = 1024;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace contrastmask {
namespace emu {

// The emulated device: an H100's limits.
constexpr size_t kDefaultDynamicShared = 48 * 1024;   // without the opt-in attribute
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr size_t kMaxSharedPerBlock = 227 * 1024;     // sharedMemPerBlockOptin (228 KB per SM)
constexpr int kMultiProcessors = 132;

// Fiber orders: each test runs under all three (the `device` fixture, tests/ops/conftest.py).
enum Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

void set_schedule(int order, uint64_t seed);
std::vector<int64_t> stats();  // launches, blocks, threads, fiber switches, order, attribute sets
[[noreturn]] void fail(const std::string& message);  // from kernel code: aborts the launch with this error

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* func);
const char* error_string(cudaError_t e);

// One launch: configuration, kernel identity and a type-erased body run by every fiber.
struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_shared;
  const void* func;
  const char* name;
  const char* file;
  int line;
};
// `context` (context_bytes long) holds the kernel's arguments: the traced build counts reads of it as
// parameter accesses (constant memory on a GPU), not global ones.
void run_launch(const LaunchConfig& config, void (*body)(void*), void* context, size_t context_bytes);

void* static_shared(const void* site, size_t bytes, size_t align);
void* dynamic_shared();

// Synchronisation. `file`/`line` identify the call site (divergence checks compare sites).
enum BarrierOp : int { kBarrierPlain = 0, kBarrierOr, kBarrierAnd, kBarrierCount };
int syncthreads(const char* file, int line, BarrierOp op, int predicate);
enum WarpOp : int { kShflIdx = 0, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };
uint64_t warp_collective(const char* file, int line, WarpOp op, unsigned mask, uint64_t value, int arg, int width);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffles move values of at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
template <typename T>
T shuffle(const char* file, int line, WarpOp op, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_collective(file, line, op, mask, to_bits(v), arg, width));
}
inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_collective(file, line, kSyncWarp, mask, 0, 0, 32);
}

// Kernel launch: CM_LAUNCH(grid, block, smem, stream, kernel)(args...) runs the whole grid before
// returning (kernel errors are thrown here, as c10::Error).
template <typename... Params>
struct Launch {
  using Kernel = void (*)(Params...);
  Kernel kernel;
  LaunchConfig config;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types once, like a real launch; each fiber gets a copy.
    struct Context {
      Kernel kernel;
      std::tuple<std::decay_t<Params>...> params;
    } context{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_launch(config, [](void* p) {
      auto* c = static_cast<Context*>(p);
      std::apply(c->kernel, c->params);
    }, &context, sizeof(context));
  }
};

inline dim3 to_dim3(const dim3& d) { return d; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
dim3 to_dim3(I v) {
  TORCH_CHECK(v >= 0 && static_cast<uint64_t>(v) <= 0xffffffffull, "CUDA emulation: grid or block size ", v,
              " does not fit a dim3");
  return dim3(static_cast<unsigned>(v));
}

template <typename... Params>
Launch<Params...> make_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                              const char* name, const char* file, int line) {
  return Launch<Params...>{kernel, LaunchConfig{grid, block, smem, reinterpret_cast<const void*>(kernel), name, file,
                                                line}};
}

// Shared variables: one object per block and declaration site, at the same address for every fiber.
template <typename T>
T& shared_object(const void* site) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "__shared__ variables must be trivially constructible");
  return *static_cast<T*>(static_shared(site, sizeof(T), alignof(T)));
}

#if defined(CONTRASTMASK_EMU_TRACE)
// Traced build: an atomic is recorded as one access of its own kind (at the caller's line: the atomics
// below are always inlined), and the plain load and store that emulate it are not recorded.
void trace_atomic_begin(const void* p, size_t bytes);
void trace_atomic_end();
// Tracing on: clears the records; off: returns them as JSON (tests/emulator/gpu_trace.py reads it).
void trace_begin();
std::string trace_end();
#endif

// Garbage-filled host allocations (NaN in every float dtype) while an emulated CUDA host op runs.
struct GarbageAllocations {
  GarbageAllocations();
  ~GarbageAllocations();
  GarbageAllocations(const GarbageAllocations&) = delete;
  GarbageAllocations& operator=(const GarbageAllocations&) = delete;
};

}  // namespace emu
}  // namespace contrastmask

// ---------------------------------------------------------------- device functions

#define __syncthreads() ::contrastmask::emu::syncthreads(__FILE__, __LINE__, ::contrastmask::emu::kBarrierPlain, 1)
#define __syncthreads_or(p) ::contrastmask::emu::syncthreads(__FILE__, __LINE__, ::contrastmask::emu::kBarrierOr, (p))
#define __syncthreads_and(p) \
  ::contrastmask::emu::syncthreads(__FILE__, __LINE__, ::contrastmask::emu::kBarrierAnd, (p))
#define __syncthreads_count(p) \
  ::contrastmask::emu::syncthreads(__FILE__, __LINE__, ::contrastmask::emu::kBarrierCount, (p))
#define __syncwarp(...) ::contrastmask::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __ballot_sync(mask, p)                                                                                     \
  static_cast<unsigned>(::contrastmask::emu::warp_collective(__FILE__, __LINE__, ::contrastmask::emu::kBallot, (mask), \
                                                             static_cast<uint64_t>((p) != 0), 0, 32))
#define CM_EMU_SHFL(op, mask, v, arg, ...) \
  ::contrastmask::emu::shuffle(__FILE__, __LINE__, op, (mask), (v), (arg)__VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, v, lane, ...) CM_EMU_SHFL(::contrastmask::emu::kShflIdx, mask, v, lane, __VA_ARGS__)
#define __shfl_up_sync(mask, v, delta, ...) CM_EMU_SHFL(::contrastmask::emu::kShflUp, mask, v, delta, __VA_ARGS__)
#define __shfl_down_sync(mask, v, delta, ...) CM_EMU_SHFL(::contrastmask::emu::kShflDown, mask, v, delta, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) \
  CM_EMU_SHFL(::contrastmask::emu::kShflXor, mask, v, lane_mask, __VA_ARGS__)

// Atomics: fibers never switch inside one, so plain read-modify-write is atomic here.
#if defined(CONTRASTMASK_EMU_TRACE)
#define CM_EMU_ATOMIC inline __attribute__((always_inline))
#define CM_EMU_ATOMIC_BEGIN(p) ::contrastmask::emu::trace_atomic_begin((p), sizeof(*(p)))
#define CM_EMU_ATOMIC_END() ::contrastmask::emu::trace_atomic_end()
#else
#define CM_EMU_ATOMIC inline
#define CM_EMU_ATOMIC_BEGIN(p) ((void)0)
#define CM_EMU_ATOMIC_END() ((void)0)
#endif
// One read-modify-write per atomic: `old` is the value read, `updated` the value written.
#define CM_EMU_DEFINE_ATOMIC(name, updated) \
  template <typename T>                     \
  CM_EMU_ATOMIC T name(T* p, T v) {         \
    CM_EMU_ATOMIC_BEGIN(p);                 \
    const T old = *p;                       \
    *p = (updated);                         \
    CM_EMU_ATOMIC_END();                    \
    return old;                             \
  }
CM_EMU_DEFINE_ATOMIC(atomicAdd, old + v)
CM_EMU_DEFINE_ATOMIC(atomicOr, old | v)
CM_EMU_DEFINE_ATOMIC(atomicAnd, old & v)
CM_EMU_DEFINE_ATOMIC(atomicMax, old < v ? v : old)
CM_EMU_DEFINE_ATOMIC(atomicMin, v < old ? v : old)
CM_EMU_DEFINE_ATOMIC(atomicExch, v)
#undef CM_EMU_DEFINE_ATOMIC
template <typename T>
CM_EMU_ATOMIC T atomicCAS(T* p, T compare, T v) {
  CM_EMU_ATOMIC_BEGIN(p);
  const T old = *p;
  if (old == compare) *p = v;
  CM_EMU_ATOMIC_END();
  return old;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

// ---------------------------------------------------------------- host API

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return ::contrastmask::emu::error_string(e); }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  namespace emu = ::contrastmask::emu;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = static_cast<int>(emu::kDefaultDynamicShared); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = static_cast<int>(emu::kMaxSharedPerBlock); break;
    case cudaDevAttrMultiProcessorCount: *value = emu::kMultiProcessors; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return ::contrastmask::emu::func_set_attribute(reinterpret_cast<const void*>(func), attr, value);
}
template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* func) {
  return ::contrastmask::emu::func_get_attributes(attr, reinterpret_cast<const void*>(func));
}

#define C10_CUDA_CHECK(expr)                                                                                \
  do {                                                                                                      \
    const cudaError_t cm_emu_err = (expr);                                                                  \
    TORCH_CHECK(cm_emu_err == cudaSuccess, "CUDA error: ", ::contrastmask::emu::error_string(cm_emu_err), \
                " (", #expr, ")");                                                                          \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

// c10::cuda's guard and stream, for CPU tensors standing in for CUDA ones. The guard also turns on
// garbage-filled allocations for the host op's lifetime.
namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDA emulation: the emulated ops take CPU tensors, got ", device);
  }
  ::contrastmask::emu::GarbageAllocations garbage;
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10

// ---------------------------------------------------------------- the macros of platform.cuh

#define CM_LAUNCH(grid, block, smem, stream, ...)                                                              \
  ::contrastmask::emu::make_launch(__VA_ARGS__, ::contrastmask::emu::to_dim3(grid),                            \
                                   ::contrastmask::emu::to_dim3(block), static_cast<size_t>(smem), (stream), \
                                   #__VA_ARGS__, __FILE__, __LINE__)

// A per-site tag: a static local of a lambda is unique per declaration and per template instance.
#define CM_EMU_SITE() ([]() -> const void* { static const char tag = 0; return &tag; }())
#define CM_SHARED(T, name, ...) \
  auto& name = ::contrastmask::emu::shared_object<T __VA_ARGS__>(CM_EMU_SITE())
#define CM_DYNAMIC_SHARED(T, name, align) T* const name = static_cast<T*>(::contrastmask::emu::dynamic_shared())

#define CONTRASTMASK_CUDA_DISPATCH_KEY CPU
