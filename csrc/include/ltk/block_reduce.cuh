// Block-wide reductions for the CUDA kernels (warp shuffles, then one warp over the per-warp partials).
// Every thread of the block must call them (they contain barriers); blockDim.x is a multiple of 32.
#pragma once

#include "ltk/launch.cuh"

namespace ltk {
namespace cuda {

// max that propagates NaN (fmax would drop it), so a NaN logit makes the row NaN like PyTorch.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// `scratch` holds 32 values in shared memory; it is free again when the function returns.
template <typename acc_t, bool kMax>
__device__ __forceinline__ acc_t block_reduce(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const acc_t identity = kMax ? acc_t(-INFINITY) : acc_t(0);
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : identity;
  v = kMax ? warp_max(v) : warp_sum(v);  // every warp reduces the partials: all threads get the result
  __syncthreads();                       // scratch may be reused by the next reduction
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* scratch) {
  return block_reduce<acc_t, false>(v, scratch);
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t v, acc_t* scratch) {
  return block_reduce<acc_t, true>(v, scratch);
}

}  // namespace cuda
}  // namespace ltk
