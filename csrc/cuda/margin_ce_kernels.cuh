// CUDA kernels of the fused margin cross-entropy, the per-element math shared with the CPU kernel
// (ltk/transform.h, ltk/philox.h, ltk/margin_ce.h). A forward is two launches on one stream:
//   margin_ce_prologue_kernel  the call's scalars (1 / the reduction's denominator, sum_j w_j), computed on
//                              the device so that the host never reads a device value back;
//   margin_ce_kernel           the rows (below), then the last block to finish reduces the row losses in
//                              a fixed order (reduce_when_last_block): deterministic, no float atomics.
//
// margin_ce_kernel is the generic row kernel: one block per row, every option tested at run time.
// Each thread owns groups of four consecutive columns (one Philox call yields the cloud noise of a
// group). Pass 1 keeps an online (max, sum of exp) per thread and merges them across the block; pass 2
// recomputes the logits and writes the gradient. Nothing of size C is kept, so any C works with a fixed
// block, and the noise is regenerated rather than stored. Launched only through LTK_LAUNCH so that the
// SIMT emulator (csrc/emu) can run this same source on the CPU.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "ltk/block_reduce.cuh"
#include "cuda/margin_ce_reduce.cuh"
#include "cuda/margin_ce_stream.cuh"
#include "ltk/launch.cuh"
#include "ltk/margin_ce.h"
#include "ltk/philox.h"
#include "ltk/transform.h"

namespace ltk {
namespace cuda {

constexpr int kMarginCeMaxThreads = 256;

template <typename scalar_t, typename acc_t>
struct RowState {
  const MarginCeArgs<scalar_t, acc_t>& a;
  int64_t i, y;
  acc_t S, t;
  uint64_t seed, offset;  // Philox key and stream (philox_key: from the generator's state under capture)

  // Logit and jacobian of column j = 4 g + u, given the group's standard normals.
  __device__ __forceinline__ ElemOut<acc_t> at(int64_t j, const float* nz, int u) const {
    const acc_t c = static_cast<acc_t>(a.input[i * a.C + j]);
    acc_t pert = 0;
    if (a.cloud) pert = cloud_perturbation(a, j, a.noise ? a.noise[i * a.C + j] : scale_noise<acc_t>(nz[u]));
    return element_logit(a, j, y, S, t, pert, c);
  }
  __device__ __forceinline__ void normals(int64_t g, float* nz) const {
    if (a.cloud && !a.noise) {
      const philox::Normal4 v = philox::normal4(seed, offset, static_cast<uint64_t>(i), static_cast<uint64_t>(g));
      nz[0] = v.v0;
      nz[1] = v.v1;
      nz[2] = v.v2;
      nz[3] = v.v3;
    }
  }
};

// Row i of the generic kernel, by the whole block; writes a.row_loss[i] (thread 0).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void margin_ce_generic_row(const MarginCeArgs<scalar_t, acc_t>& a, int64_t i, acc_t* red,
                                                      acc_t& target_logit) {
  const int64_t C = a.C;
  const int64_t groups = (C + 3) / 4;
  const int64_t y = a.target[i];
  scalar_t* grow = a.grad ? a.grad + i * C : nullptr;
  if (y == a.ignore_index) {
    for (int64_t j = threadIdx.x; j < C && grow; j += blockDim.x) grow[j] = scalar_t(0);
    if (threadIdx.x == 0) {
      store_row_loss(a, i, acc_t(0));
      if (a.grad_row_shift) a.grad_row_shift[i] = 0;
    }
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y < C);
  uint64_t seed = 0, offset = 0;
  if (a.cloud && !a.noise) philox_key(a, seed, offset);
  const RowState<scalar_t, acc_t> row{a, i, y, a.target_scale ? a.target_scale[y] : a.scale,
                                      a.row_shift ? a.row_shift[i] : acc_t(0), seed, offset};
  const bool smoothing = a.smoothing != acc_t(0);

  // ---- pass 1: online max / sum of exp
  acc_t m = -INFINITY, s = 0;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    float nz[4];
    row.normals(g, nz);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t j = 4 * g + u;
      if (j >= C) break;
      const acc_t z = row.at(j, nz, u).z;
      if (j == y) target_logit = z;
      if (z == -INFINITY) continue;  // masked class: contributes exp(-inf) = 0 (and must not make 0 * inf)
      const acc_t mn = nan_max(m, z);
      s = s * ltk_exp<acc_t>(m - mn) + ltk_exp<acc_t>(z - mn);
      m = mn;
    }
  }
  const acc_t M = block_max(m, red);
  // threads that saw no (unmasked) column keep m = -inf, s = 0 and contribute nothing
  const acc_t sum = block_sum(m == -INFINITY ? acc_t(0) : s * ltk_exp<acc_t>(m - M), red);
  __syncthreads();  // target_logit was written by its owner thread before the reductions' barriers
  // log-sum-exp and target logit relative to the row max M (see row_coefficients): a large common offset
  // of the logits cancels exactly
  const acc_t lse = ltk_log<acc_t>(sum);
  const acc_t z_t = target_logit - M;
  const acc_t w_t = a.weight ? a.weight[y] : acc_t(1);
  // the gradient coefficients do not depend on label smoothing's sum_j w_j (z_j - M), which pass 2 adds up
  const RowCoef<acc_t> rc =
      row_coefficients<acc_t>(lse, z_t, acc_t(0), w_t, *a.weight_sum, a.smoothing, C, a.focal, a.gamma);
  const bool grad_pass = grow || a.grad_row_shift;
  if (!smoothing) {
    if (threadIdx.x == 0) store_row_loss(a, i, rc.loss);
    if (!grad_pass) return;
  }

  // ---- pass 2: gradient, already divided by the reduction's denominator, and the smoothing sum
  const acc_t inv_denom = *a.inv_denom;
  const acc_t A = rc.a / sum * inv_denom, B = rc.b * inv_denom, D = rc.d * inv_denom;
  acc_t gshift = 0, swz = 0;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
    float nz[4];
    row.normals(g, nz);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t j = 4 * g + u;
      if (j >= C) break;
      const ElemOut<acc_t> o = row.at(j, nz, u);
      const acc_t w = a.weight ? a.weight[j] : acc_t(1);
      if (smoothing) swz += w * (o.z - M);
      if (!grad_pass) continue;
      const acc_t dz = A * ltk_exp<acc_t>(o.z - M) - D * w - (j == y ? B : acc_t(0));
      if (grow) grow[j] = static_cast<scalar_t>(dz * o.dzdc);
      if (a.grad_row_shift) gshift += dz * a.shift_coef[j];
    }
  }
  if (smoothing) {
    swz = block_sum(swz, red);
    if (threadIdx.x == 0) {
      store_row_loss(
          a, i, row_coefficients<acc_t>(lse, z_t, swz, w_t, *a.weight_sum, a.smoothing, C, a.focal, a.gamma).loss);
    }
  }
  if (a.grad_row_shift) {
    gshift = block_sum(gshift, red);
    if (threadIdx.x == 0) a.grad_row_shift[i] = gshift * row.S;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMarginCeMaxThreads) margin_ce_kernel(MarginCeArgs<scalar_t, acc_t> a) {
  __shared__ acc_t red[32];
  __shared__ acc_t target_logit;
  __shared__ double dred[32];
  __shared__ unsigned last;
  margin_ce_generic_row(a, static_cast<int64_t>(blockIdx.x), red, target_logit);
  reduce_when_last_block(a, dred, last);
}

// Threads per row: enough for one group of four columns each.
inline int margin_ce_threads(int64_t C) { return row_threads((C + 3) / 4, kMarginCeMaxThreads); }

// The forward's launches: the prologue, then the rows (the stream kernel where it covers the call, else the
// generic one). a.N > 0 (the host returns empty-batch results itself).
template <typename scalar_t, typename acc_t>
void launch_margin_ce(const MarginCeArgs<scalar_t, acc_t>& a, cudaStream_t stream) {
  if (a.N == 0) return;
  LTK_LAUNCH((margin_ce_prologue_kernel<scalar_t, acc_t>), dim3(1), dim3(kMarginCePrologueThreads), 0, stream, a);
  if (launch_margin_ce_stream(a, stream)) return;
  const dim3 grid(static_cast<unsigned>(a.N));
  const dim3 block(static_cast<unsigned>(margin_ce_threads(a.C)));
  LTK_LAUNCH((margin_ce_kernel<scalar_t, acc_t>), grid, block, 0, stream, a);
}

}  // namespace cuda
}  // namespace ltk
