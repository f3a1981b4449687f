// The operator namespace: torch.ops.contrastmask. The CUDA emulation build (tests only) compiles the
// same schema and kernel sources with -DCONTRASTMASK_LIBRARY=contrastmask_emu.
#pragma once

#include <torch/library.h>

#ifndef CONTRASTMASK_LIBRARY
#define CONTRASTMASK_LIBRARY contrastmask
#endif

#define CONTRASTMASK_STR2(x) #x
#define CONTRASTMASK_STR(x) CONTRASTMASK_STR2(x)
// "<namespace>::<name>", for looking an operator up in the dispatcher.
#define CONTRASTMASK_OP(name) CONTRASTMASK_STR(CONTRASTMASK_LIBRARY) "::" name
