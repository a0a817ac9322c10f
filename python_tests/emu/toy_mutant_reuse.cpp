// The toy kernels without the __syncthreads that protects shared slots from the next reduction.
#define LTK_TOY_MUTANT 1
#define LTK_TOY_MUTANT_NO_REUSE_SYNC 1
#define LTK_TOY_NS toy_mutant_reuse
#define LTK_TOY_PREFIX ltk_emu_toy_reuse_
#include "toy.cpp"
