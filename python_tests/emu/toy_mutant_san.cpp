// The toy kernels with the bugs that only the sanitizer and the memory-access model can see (every result
// stays right): a shared-memory and a global read-modify-write race, an accumulation into an output the
// host never initialised, a strided (uncoalesced) row load. See toy_kernels.cuh.
#define LTK_TOY_MUTANT 1
#define LTK_TOY_MUTANT_RACE 1
#define LTK_TOY_MUTANT_ACCUMULATE 1
#define LTK_TOY_MUTANT_STRIDED 1
#define LTK_TOY_NS toy_mutant_san
#define LTK_TOY_PREFIX ltk_emu_toy_san_
#include "toy.cpp"
