// Kernel launch and device-qualifier shim shared by real CUDA builds and the SIMT emulator.
//
// csrc/cuda/*.cuh hold kernels and raw-pointer launch functions written in plain CUDA C++. They launch
// only through LTK_LAUNCH so that the same source compiles with nvcc (real launch) and with g++ under
// LTK_EMULATE (csrc/emu/simt.h runs the grid on the CPU, one block at a time).
#pragma once

#include "ltk/hd.h"

#if defined(LTK_EMULATE)
#include "../../emu/simt.h"
#define LTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ltk::emu::launch((kernel), (grid), (block), (smem), __VA_ARGS__)
// Dynamic shared memory of the running block (the launch's `smem` bytes, 16-byte aligned); poisoned
// with 0xFF bytes (NaN) before every block and bordered by a guard page in the emulator.
#define LTK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::ltk::emu::dynamic_shared_memory())
#else
#include <cuda_runtime.h>
#define LTK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel)<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
// `LTK_DYNAMIC_SHARED(float, buf);` inside a kernel or __device__ function declares `float* buf` pointing
// at the block's dynamic shared memory. One extern array name and alignment for every kernel, so that
// kernels of different element types never redeclare `extern __shared__` incompatibly.
#define LTK_DYNAMIC_SHARED(type, name)                             \
  extern __shared__ __align__(16) unsigned char ltk_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(ltk_dynamic_smem_)
#endif

namespace ltk {
namespace cuda {

// Plain (default-cached) loads and stores of an 8- or 16-byte vector (float4, uint4, uint2, ...) from
// global or shared memory: LDG/STG/LDS/STS .64 / .128 on the GPU; in the emulator one access each (as
// __ldg does), so that the sanitizer and the memory model see the width the GPU moves. (__stwb would
// compile to STG.E.128.STRONG.SM, not the plain store.)
template <class V>
__device__ __forceinline__ V load_vector(const V* p) {
#if defined(LTK_EMULATE)
  return ::ltk::emu::detail::whole_load(p);
#else
  return *p;
#endif
}

template <class V>
__device__ __forceinline__ void store_vector(V* p, const V& v) {
#if defined(LTK_EMULATE)
  ::ltk::emu::detail::whole_store(p, v);
#else
  *p = v;
#endif
}

}  // namespace cuda
}  // namespace ltk
