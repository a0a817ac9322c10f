// margin_ce's backward on CUDA: the forward's gradient (for grad_output = 1) scaled in place by the
// grad_output autograd passes in. grad_output stays on the device: a scalar 1 (loss.backward()) makes every
// block return at once, so the common backward is one launch and no pass over N x C, without a host sync.
// Otherwise a grid-stride loop over the elements of the (contiguous) gradient.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ltk/launch.cuh"

namespace ltk {
namespace cuda {

constexpr int kGradScaleThreads = 256;

// grad (N, C), contiguous, *= go[0] (per_row false) or go[i] on row i.
template <typename scalar_t>
__global__ void __launch_bounds__(kGradScaleThreads)
    margin_ce_grad_scale_kernel(scalar_t* grad, const scalar_t* go, int64_t N, int64_t C, bool per_row) {
  using acc_t = std::conditional_t<sizeof(scalar_t) == 8, double, float>;
  const acc_t s0 = static_cast<acc_t>(go[0]);
  if (!per_row && s0 == acc_t(1)) return;
  // consecutive threads take consecutive elements (coalesced); the loop is memory-bound, so elements rather
  // than 16-byte vectors (a vector through a local array spilled under nvcc 13)
  const int64_t total = N * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    const acc_t s = per_row ? static_cast<acc_t>(go[j / C]) : s0;
    grad[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * s);
  }
}

// Blocks for N x C elements: one element per thread, at most max_blocks (a few per SM: grid-stride).
template <typename scalar_t>
inline unsigned grad_scale_blocks(int64_t N, int64_t C, int64_t max_blocks) {
  int64_t b = (N * C + kGradScaleThreads - 1) / kGradScaleThreads;
  if (b > max_blocks) b = max_blocks;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

template <typename scalar_t>
void launch_margin_ce_grad_scale(scalar_t* grad, const scalar_t* go, int64_t N, int64_t C, bool per_row,
                                 int64_t max_blocks, cudaStream_t stream) {
  if (N * C == 0) return;
  LTK_LAUNCH((margin_ce_grad_scale_kernel<scalar_t>), dim3(grad_scale_blocks<scalar_t>(N, C, max_blocks)),
             dim3(kGradScaleThreads), 0, stream, grad, go, N, C, per_row);
}

}  // namespace cuda
}  // namespace ltk
