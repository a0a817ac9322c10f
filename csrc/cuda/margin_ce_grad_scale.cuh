// margin_ce's backward on CUDA: the forward's gradient (for grad_output = 1) scaled in place by the
// grad_output autograd passes in. grad_output stays on the device: a scalar 1 (loss.backward()) makes every
// block return at once, so the common backward is one launch and no pass over N x C, without a host sync.
// Otherwise a grid-stride loop over 16-byte chunks of the (contiguous) gradient, the rest element-wise.
#pragma once

#include <cstdint>
#include <cstring>
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
  constexpr int K = 16 / static_cast<int>(sizeof(scalar_t));
  const int64_t total = N * C;
  // elements before the first 16-byte boundary (grad may be a view), then whole chunks, then the rest
  int64_t head = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(grad) & 15)) & 15) / sizeof(scalar_t));
  if (head > total) head = total;
  const int64_t chunks = (total - head) / K;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  auto scale_one = [&](int64_t j) {
    const acc_t s = per_row ? static_cast<acc_t>(go[j / C]) : s0;
    grad[j] = static_cast<scalar_t>(static_cast<acc_t>(grad[j]) * s);
  };
  for (int64_t j = first; j < head; j += stride) scale_one(j);
  scalar_t* body = grad + head;
  for (int64_t q = first; q < chunks; q += stride) {
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(body) + q);
    scalar_t e[K];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t s = per_row ? static_cast<acc_t>(go[(head + q * K + k) / C]) : s0;
      e[k] = static_cast<scalar_t>(static_cast<acc_t>(e[k]) * s);
    }
    memcpy(&raw, e, 16);
    __stwb(reinterpret_cast<uint4*>(body) + q, raw);
  }
  for (int64_t j = head + chunks * K + first; j < total; j += stride) scale_one(j);
}

// Blocks for N x C elements: one 16-byte chunk per thread, at most max_blocks (a few per SM: grid-stride).
template <typename scalar_t>
inline unsigned grad_scale_blocks(int64_t N, int64_t C, int64_t max_blocks) {
  const int64_t chunks = (N * C * static_cast<int64_t>(sizeof(scalar_t)) + 15) / 16;
  int64_t b = (chunks + kGradScaleThreads - 1) / kGradScaleThreads;
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
