// Toy kernels that exercise the SIMT emulator (csrc/emu): plain CUDA C++ launched through LTK_LAUNCH, so
// the same file also compiles with nvcc. Mutants for the "a broken kernel must fail" tests are built
// from this file with macros:
//   LTK_TOY_MUTANT_NO_SYNC   drops the __syncthreads between writing and reading shared memory
//   LTK_TOY_MUTANT_SHIFT     shifts the grid-stride start index by one
//   LTK_TOY_MUTANT_NO_REUSE_SYNC drops the __syncthreads that protects the shared slots from the next
//                            reduction (a warp that runs ahead overwrites a slot another warp still reads)
// and, for the sanitizer and the memory-access model (toy_mutant_san.cpp; each result stays right, so only
// the new detectors can tell):
//   LTK_TOY_MUTANT_RACE      the shared histogram counts with a plain read-modify-write instead of
//                            atomicAdd (a race between two barriers), and sum_atomic_kernel adds its
//                            block's sum to the output without atomicAdd (a race between blocks)
//   LTK_TOY_MUTANT_ACCUMULATE row_sum accumulates into its output (out[row] += ...) instead of storing:
//                            right only when the host zeroed the output (an uninitialised read)
//   LTK_TOY_MUTANT_STRIDED   row_sum_warp reads each lane's contiguous chunk of the row (lanes a chunk
//                            apart: uncoalesced) instead of interleaved columns (coalesced)
#pragma once

#include <cassert>
#include <cstdint>

#include "ltk/launch.cuh"

#ifndef LTK_TOY_NS
#define LTK_TOY_NS toy
#endif

namespace LTK_TOY_NS {

#ifdef LTK_TOY_MUTANT_SHIFT
constexpr int kShift = 1;
#else
constexpr int kShift = 0;
#endif

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum_down(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return __shfl_sync(0xffffffffu, v, 0);
}

// Block-wide sum (blockDim.x a multiple of 32): warp shuffles, one shared slot per warp, a barrier,
// then the first warp reduces the slots. The trailing barrier lets the slots be reused.
template <typename T, int kThreads>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
#ifndef LTK_TOY_MUTANT_NO_SYNC
  __syncthreads();
#endif
  T r = lane < kThreads / 32 ? partial[lane] : T(0);
  r = warp_sum_down(r);
#ifndef LTK_TOY_MUTANT_NO_REUSE_SYNC
  __syncthreads();
#endif
  return r;
}

// out[row] = sum_j x[row, j], one block per row (grid.y rows beyond 65535 would be invalid: grid.x).
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) row_sum_kernel(const T* __restrict__ x, T* __restrict__ out, int C) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  T acc = T(0);
  for (int j = threadIdx.x; j < C; j += kThreads) acc += __ldg(xr + j);
  acc = block_sum<T, kThreads>(acc);
#ifdef LTK_TOY_MUTANT_ACCUMULATE
  if (threadIdx.x == 0) out[row] += acc;
#else
  if (threadIdx.x == 0) out[row] = acc;
#endif
}

// out[2 row] = sum_j x[row, j], out[2 row + 1] = sum_j x[row, j]^2: two block reductions in a row that
// share the shared-memory slots.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ x, T* __restrict__ out, int C) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  T s = T(0), q = T(0);
  for (int j = threadIdx.x; j < C; j += kThreads) {
    const T v = xr[j];
    s += v;
    q += v * v;
  }
  s = block_sum<T, kThreads>(s);
  q = block_sum<T, kThreads>(q);
  if (threadIdx.x == 0) {
    out[2 * row] = s;
    out[2 * row + 1] = q;
  }
}

// y[i] = a * x[i] + y[i] with a grid-stride loop over n elements.
template <typename T>
__global__ void axpy_kernel(int64_t n, T a, const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x + kShift; i < n + kShift;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = a * x[i] + y[i];
}

// *out += sum(x): grid-stride partial sums, block reduction, one atomicAdd per block.
template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) sum_atomic_kernel(int64_t n, const T* __restrict__ x, T* out) {
  T acc = T(0);
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) acc += x[i];
  acc = block_sum<T, kThreads>(acc);
#ifdef LTK_TOY_MUTANT_RACE
  if (threadIdx.x == 0) *out += acc;
#else
  if (threadIdx.x == 0) atomicAdd(out, acc);
#endif
}

// hist[b] = #{i : x[i] == b} for b < kBins: a per-block histogram in shared memory (zeroed, counted with
// shared atomics between two barriers, then added to the output with global atomics).
template <int kBins>
__global__ void shared_histogram_kernel(int64_t n, const int* __restrict__ x, int* hist) {
  __shared__ int local[kBins];
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int b = x[i];
#ifdef LTK_TOY_MUTANT_RACE
    local[b] = local[b] + 1;
#else
    atomicAdd(&local[b], 1);
#endif
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) atomicAdd(&hist[b], local[b]);
}

// out[row] = sum_j x[row, j], one warp per row (8 rows per block): lanes read interleaved columns, so
// every warp-level load covers 32 consecutive elements.
template <typename T>
__global__ void row_sum_warp_kernel(int64_t rows, int64_t cols, const T* __restrict__ x, T* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const T* xr = x + row * cols;
  T acc = T(0);
#ifdef LTK_TOY_MUTANT_STRIDED
  const int64_t chunk = (cols + 31) / 32;
  for (int64_t j = lane * chunk; j < (lane + 1) * chunk && j < cols; ++j) acc += xr[j];
#else
  for (int64_t j = lane; j < cols; j += 32) acc += xr[j];
#endif
  acc = warp_sum(acc);
  if (lane == 0) out[row] = acc;
}

// Reverses each tile of blockDim.x elements through dynamic shared memory (2D block: x fastest).
template <typename T>
__global__ void tile_reverse_kernel(int64_t n, const T* __restrict__ x, T* __restrict__ y) {
  LTK_DYNAMIC_SHARED(T, tile);
  const int nt = blockDim.x * blockDim.y;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * nt;
  const int64_t len = n - base < nt ? n - base : nt;
  if (t < len) tile[t] = x[base + t];
#ifndef LTK_TOY_MUTANT_NO_SYNC
  __syncthreads();
#endif
  if (t < len) y[base + t] = tile[len - 1 - t];
}

// Warp collectives other than shuffles: ballot / any / all / syncthreads_count per warp.
__global__ void vote_kernel(const int* __restrict__ pred, unsigned* __restrict__ ballot, int* __restrict__ any_all,
                            int* __restrict__ count) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int p = pred[blockIdx.x * blockDim.x + t];
  unsigned b = __ballot_sync(0xffffffffu, p);
  int an = __any_sync(0xffffffffu, p);
  int al = __all_sync(0xffffffffu, p);
  int c = __syncthreads_count(p);
  if (lane == 0) {
    ballot[blockIdx.x * (blockDim.x / 32) + warp] = b;
    any_all[2 * (blockIdx.x * (blockDim.x / 32) + warp)] = an;
    any_all[2 * (blockIdx.x * (blockDim.x / 32) + warp) + 1] = al;
  }
  if (t == 0) count[blockIdx.x] = c;
}

// Every shuffle kind at every width: out[(4 * log2(width) + kind) * blockDim.x + t].
__global__ void shfl_kernel(int* __restrict__ out, int arg) {
  const int t = threadIdx.x, n = blockDim.x;
  const int v = 1000 + t;
  int k = 0;
  for (int w = 1; w <= 32; w *= 2) {
    out[(k++) * n + t] = __shfl_sync(0xffffffffu, v, arg, w);
    out[(k++) * n + t] = __shfl_up_sync(0xffffffffu, v, unsigned(arg), w);
    out[(k++) * n + t] = __shfl_down_sync(0xffffffffu, v, unsigned(arg), w);
    out[(k++) * n + t] = __shfl_xor_sync(0xffffffffu, v, arg, w);
  }
}

// out[t] = x[32 * warp]: lane 0 of each warp publishes its value in shared memory, the warp synchronises
// (__syncwarp orders the lanes that take part), the other lanes read it. The race mutant drops __syncwarp.
__global__ void warp_broadcast_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float slot[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) slot[warp] = x[blockIdx.x * blockDim.x + threadIdx.x];
#ifndef LTK_TOY_MUTANT_RACE
  __syncwarp();
#endif
  out[blockIdx.x * blockDim.x + threadIdx.x] = slot[warp];
}

// y = x^T for an n x n matrix (n a multiple of 32) through a 32 x (32 + kPad) shared tile, block (32, 8).
// The read-back walks a tile column: without padding its 32 words sit in one bank (a 32-way conflict),
// one word of padding per row spreads them over all banks (the memory-access model measures both).
template <int kPad>
__global__ void transpose_kernel(int n, const float* __restrict__ x, float* __restrict__ y) {
  __shared__ float tile[32][32 + kPad];
  const int bx = blockIdx.x * 32, by = blockIdx.y * 32;
  for (int r = threadIdx.y; r < 32; r += 8) tile[r][threadIdx.x] = x[(by + r) * n + bx + threadIdx.x];
  __syncthreads();
  for (int r = threadIdx.y; r < 32; r += 8) y[(bx + r) * n + by + threadIdx.x] = tile[threadIdx.x][r];
}

// ---- deliberately broken kernels: each must end in an emulator error, never a hang or crash ----
__global__ void bad_divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}
__global__ void bad_early_return_kernel(float* out, int n) {
  if (int(threadIdx.x) >= n) return;
  out[threadIdx.x] = 1.0f;
  __syncthreads();
}
__global__ void bad_two_barriers_kernel(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
__global__ void bad_shfl_exited_lane_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 16);
}
__global__ void bad_shfl_divergent_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = float(lane);
  if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}
__global__ void bad_shfl_vs_barrier_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  float v = float(lane);
  if (lane == 0) __syncthreads();
  v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (lane != 0) __syncthreads();
  out[threadIdx.x] = v;
}
__global__ void bad_smem_oob_kernel(float* out, int n) {
  LTK_DYNAMIC_SHARED(float, s);
  s[threadIdx.x] = 1.0f;  // n = blockDim.x, but the launch passes one element less
  __syncthreads();
  out[threadIdx.x] = s[n - 1 - threadIdx.x];
}
__global__ void bad_global_oob_kernel(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = x[i];  // off by one
}
__global__ void bad_spin_kernel(volatile int* flag, int* out) {
  // thread 0 waits for thread 1 with no barrier: never yields to it under the forward schedule
  if (threadIdx.x == 0) {
    while (*flag == 0) {
    }
    out[0] = 1;
  } else if (threadIdx.x == 1) {
    *flag = 1;
  }
}
__global__ void bad_assert_kernel(const int* x) {
  assert(x[threadIdx.x] >= 0 && "negative label");
}
__device__ int deep_recursion(int d) {
  volatile char pad[4096];
  pad[0] = char(d);
  return d > 0 ? deep_recursion(d - 1) + pad[0] : 0;
}
__global__ void bad_stack_overflow_kernel(int* out, int depth) { out[threadIdx.x] = deep_recursion(depth); }
__global__ void bad_div_zero_kernel(const int* x, int* y) { y[threadIdx.x] = 100 / x[threadIdx.x]; }
__global__ void noop_kernel(int) {}
__global__ void bad_partial_warp_kernel(float* out) {
  // blockDim 48: the second warp has 16 lanes, and a full-width butterfly reads lanes 48..63
  float v = float(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

// ---- raw-pointer launch functions (what csrc/cuda/*.cuh provide for the real kernels) ----
template <typename T>
void launch_row_sum(const T* x, T* out, int N, int C, int threads, cudaStream_t stream) {
  if (N == 0) return;
  switch (threads) {
    case 32: LTK_LAUNCH((row_sum_kernel<T, 32>), dim3(N), dim3(32), 0, stream, x, out, C); break;
    case 128: LTK_LAUNCH((row_sum_kernel<T, 128>), dim3(N), dim3(128), 0, stream, x, out, C); break;
    case 256: LTK_LAUNCH((row_sum_kernel<T, 256>), dim3(N), dim3(256), 0, stream, x, out, C); break;
    default: LTK_LAUNCH((row_sum_kernel<T, 1024>), dim3(N), dim3(1024), 0, stream, x, out, C); break;
  }
}

template <typename T>
void launch_row_stats(const T* x, T* out, int N, int C, cudaStream_t stream) {
  if (N == 0) return;
  LTK_LAUNCH((row_stats_kernel<T, 256>), dim3(N), dim3(256), 0, stream, x, out, C);
}

template <typename T>
void launch_axpy(int64_t n, T a, const T* x, T* y, int max_blocks, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 128;
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  LTK_LAUNCH(axpy_kernel<T>, dim3(unsigned(blocks)), dim3(threads), 0, stream, n, a, x, y);
}

template <typename T>
void launch_sum_atomic(int64_t n, const T* x, T* out, int blocks, cudaStream_t stream) {
  LTK_LAUNCH((sum_atomic_kernel<T, 64>), dim3(blocks), dim3(64), 0, stream, n, x, out);
}

inline void launch_shared_histogram(int64_t n, const int* x, int* hist, int blocks, cudaStream_t stream) {
  if (n == 0) return;
  LTK_LAUNCH(shared_histogram_kernel<16>, dim3(blocks), dim3(128), 0, stream, n, x, hist);
}

template <typename T>
void launch_row_sum_warp(int64_t rows, int64_t cols, const T* x, T* out, cudaStream_t stream) {
  if (rows == 0) return;
  LTK_LAUNCH(row_sum_warp_kernel<T>, dim3(unsigned((rows + 7) / 8)), dim3(256), 0, stream, rows, cols, x, out);
}

template <typename T>
void launch_tile_reverse(int64_t n, const T* x, T* y, int bx, int by, cudaStream_t stream) {
  if (n == 0) return;
  const int nt = bx * by;
  const int64_t blocks = (n + nt - 1) / nt;
  LTK_LAUNCH(tile_reverse_kernel<T>, dim3(unsigned(blocks)), dim3(bx, by), size_t(nt) * sizeof(T), stream, n, x, y);
}

}  // namespace LTK_TOY_NS
