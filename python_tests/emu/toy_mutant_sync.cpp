// The toy kernels with the __syncthreads between shared-memory writes and reads removed.
#define LTK_TOY_MUTANT 1
#define LTK_TOY_MUTANT_NO_SYNC 1
#define LTK_TOY_NS toy_mutant_sync
#define LTK_TOY_PREFIX ltk_emu_toy_nosync_
#include "toy.cpp"
