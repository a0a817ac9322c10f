// Host/device qualifiers for the header-only math in csrc/include/ltk: the same functions are compiled
// by g++ for the CPU kernels, by nvcc for the CUDA kernels, and by g++ again inside the SIMT emulator.
#pragma once

#if defined(__CUDACC__)
#define LTK_HD __host__ __device__ __forceinline__
#define LTK_DEVICE __device__ __forceinline__
#elif defined(LTK_EMULATE)
// the emulator header defines __device__ etc. as nothing
#define LTK_HD inline
#define LTK_DEVICE inline
#else
#define LTK_HD inline
#define LTK_DEVICE inline
#endif
