// The CUDA loss kernels, compiled by the host compiler for the emulation build (tests only).
#include "cuda/loss_kernels.cu"  // csrc/ is on the include path
