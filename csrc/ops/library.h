// The operator namespace: torch.ops.contrastmask. The CUDA emulation build (tests only) compiles the
// same schema and kernel sources with -DCONTRASTMASK_LIBRARY=contrastmask_emu.
#pragma once

#include <torch/library.h>

#ifndef CONTRASTMASK_LIBRARY
#define CONTRASTMASK_LIBRARY contrastmask
#endif
