// AVX512 build of the CPU row kernels, chosen at run time when the CPU and ATEN_CPU_CAPABILITY allow.
// setuptools compiles every source with the same flags, so the instruction set is enabled here with a
// target pragma; GCC does not define the matching feature macros for a pragma, and at::vec / sleef.h
// select their AVX512 code by those macros, so they are defined by hand (only in this file).
// GCC 12 warns inside its own intrinsic headers and on lambda thunks under a target pragma
// (-Wuninitialized: _mm512_max_ps passes _mm512_undefined_ps(), a self-initialised variable, as the
// pass-through operand of its masked builtin).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
// prefer-vector-width=512: GCC otherwise auto-vectorises with 256-bit registers even here; the Philox
// noise loop (omp simd) runs 1.4x faster on 512-bit ones.
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __BMI__
#define __BMI__ 1
#endif
#ifndef __BMI2__
#define __BMI2__ 1
#endif
#ifndef __LZCNT__
#define __LZCNT__ 1
#endif
#ifndef __POPCNT__
#define __POPCNT__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/kernels_isa.h"
LTK_DEFINE_CPU_KERNELS(AVX512)
