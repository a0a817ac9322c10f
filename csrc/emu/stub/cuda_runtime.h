// Emulator stand-in for <cuda_runtime.h>: under LTK_EMULATE the SIMT emulator provides the runtime API subset
// the kernels use (csrc/emu/simt.h). Only on the include path of emulated builds.
#pragma once
#include "../simt.h"
