// The CUDA plan kernels, compiled by the host compiler for the emulation build (tests only).
#include "cuda/plan_kernels.cu"  // csrc/ is on the include path
