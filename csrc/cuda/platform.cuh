// What the CUDA sources need from CUDA and c10::cuda, plus three macros for the constructs plain C++
// cannot parse. With nvcc they expand to CUDA; in the emulation build (tests/emulator/cuda_emu.py defines
// CONTRASTMASK_CUDA_EMULATION) the same source text compiles with the host compiler against
// tests/emulator/csrc/cuda_emulation.h and runs on the CPU.
//   CM_LAUNCH(grid, block, smem, stream, kernel)(args...)  kernel<<<grid, block, smem, stream>>>(args...)
//   CM_SHARED(T, name, [dims]...);                         __shared__ T name[dims]...;
//   CM_DYNAMIC_SHARED(T, name, align);                     extern __shared__ __align__(align) T name[];
// CONTRASTMASK_CUDA_DISPATCH_KEY is the dispatch key the kernels register for (CUDA; CPU when emulated).
#pragma once

#if defined(CONTRASTMASK_CUDA_EMULATION)
#include "cuda_emulation.h"  // tests/emulator/csrc, on the emulation builds' include path
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define CM_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define CM_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define CM_DYNAMIC_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#define CONTRASTMASK_CUDA_DISPATCH_KEY CUDA
#endif
