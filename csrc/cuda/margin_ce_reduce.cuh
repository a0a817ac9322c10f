// The device side of a margin_ce call's scalars and of its reduction, shared by every row kernel:
//   margin_ce_prologue_kernel  one block: 1 / the reduction's denominator and sum_j w_j into
//                              MarginCeScalars (ltk/margin_ce.h), and the row kernel's block counter zeroed;
//   store_row_loss             a row's loss (and, for reduction='none', the output element);
//   reduce_when_last_block     called by every block of a row kernel after its rows: the last block to
//                              finish adds the row losses up in a fixed order (so the loss is the same bits
//                              on every run: no float atomics) and writes the reduced loss.
//   row_threads                a row kernel's block size.
// So a forward is two launches and the host reads nothing back (no synchronisation).
#pragma once

#include <cstdint>

#include "ltk/block_reduce.cuh"
#include "ltk/launch.cuh"
#include "ltk/margin_ce.h"

namespace ltk {
namespace cuda {

constexpr int kMarginCePrologueThreads = 256;

// Threads for a row of `units` work items (one each): a multiple of the warp size, 32 .. max_threads.
inline int row_threads(int64_t units, int max_threads) {
  int64_t t = (units + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > max_threads) t = max_threads;
  return static_cast<int>(t);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMarginCePrologueThreads) margin_ce_prologue_kernel(MarginCeArgs<scalar_t, acc_t> a) {
  __shared__ double red[32];
  // PyTorch's weighted mean: sum of the targets' weights over rows not ignored. Out-of-range targets are
  // skipped here (the row kernel asserts on them) so that this kernel never reads out of bounds.
  double valid = 0, wsum = 0;
  if (a.reduction == kReduceMean) {
    for (int64_t i = threadIdx.x; i < a.N; i += blockDim.x) {
      const int64_t y = a.target[i];
      if (y == a.ignore_index || y < 0 || y >= a.C) continue;
      valid += a.weight ? static_cast<double>(a.weight[y]) : 1.0;
    }
  }
  if (a.weight && a.smoothing != acc_t(0)) {
    for (int64_t j = threadIdx.x; j < a.C; j += blockDim.x) wsum += static_cast<double>(a.weight[j]);
  }
  valid = block_sum(valid, red);
  wsum = block_sum(wsum, red);
  if (threadIdx.x == 0) {
    const double denom =
        a.reduction == kReduceMean ? valid : (a.reduction == kReduceBatchMean ? static_cast<double>(a.N) : 1.0);
    MarginCeScalars<acc_t>* s = a.scalars;
    s->inv_denom_d = 1.0 / denom;  // mean over no valid row: inf, and the loss 0 * inf = NaN, as PyTorch
    s->inv_denom = static_cast<acc_t>(s->inv_denom_d);
    s->weight_sum = a.weight ? static_cast<acc_t>(wsum) : static_cast<acc_t>(a.C);
    s->blocks_done = 0;
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row_loss(const MarginCeArgs<scalar_t, acc_t>& a, int64_t i, acc_t loss) {
  a.row_loss[i] = loss;
  if (a.reduction == kReduceNone && a.loss_out) a.loss_out[i] = static_cast<scalar_t>(loss);
}

// Every thread of the block calls this once, after the block's row losses are stored. The block's
// stores are released by the barrier and the fence before its ticket; the last block acquires them all
// through the ticket counter (the threadFenceReduction pattern of the CUDA samples).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void reduce_when_last_block(const MarginCeArgs<scalar_t, acc_t>& a, double* red,
                                                       unsigned& last) {
  if (a.reduction == kReduceNone || !a.loss_out) return;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&a.scalars->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  double total = 0;
  const volatile acc_t* rows = a.row_loss;  // written by other blocks: read past this SM's L1
  for (int64_t i = threadIdx.x; i < a.N; i += blockDim.x) total += static_cast<double>(rows[i]);
  total = block_sum(total, red);
  if (threadIdx.x == 0) {
    if (a.reduction != kReduceSum) total *= a.scalars->inv_denom_d;
    a.loss_out[0] = static_cast<scalar_t>(static_cast<acc_t>(total));
  }
}

}  // namespace cuda
}  // namespace ltk
