// The toy kernels with the grid-stride start index shifted by one.
#define LTK_TOY_MUTANT 1
#define LTK_TOY_MUTANT_SHIFT 1
#define LTK_TOY_NS toy_mutant_shift
#define LTK_TOY_PREFIX ltk_emu_toy_shift_
#include "toy.cpp"
