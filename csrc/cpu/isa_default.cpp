// Portable build of the CPU row kernels (at::vec's generic Vectorized, no ISA extensions).
#define CPU_CAPABILITY DEFAULT
#include "cpu/kernels_isa.h"
LTK_DEFINE_CPU_KERNELS(DEFAULT)
