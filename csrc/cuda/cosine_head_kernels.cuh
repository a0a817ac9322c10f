// CUDA kernels of the cosine classifier head (docs/methods.md §1.1) and their raw-pointer launch functions.
// Plain CUDA C++ launched only through LTK_LAUNCH, so the SIMT emulator (csrc/emu) runs the same source.
// The GEMMs are cuBLAS (at::mm in cosine_head_common.cpp); these are the fused pieces around them:
//
//   launch_norms    |m_k| of the vectors of a contiguous matrix (rows: one warp per row;
//                   columns: a 32-column tile per block, 8 row strides reduced through shared memory)
//   launch_scale    out[i, j] = src[i, j] / max(rn[i], eps) / max(cn[j], eps)   (the forward epilogue;
//                   src any strides, out contiguous, out may be src)
//   launch_tangent  g_k <- alpha_k (g_k - c_k x_k) per vector (the backward epilogue, ltk/cosine_head.h);
//                   row vectors: one warp per row (dot product, then the update while the row is cached);
//                   column vectors: a column-dot kernel into `workspace` (n_vec values), then an
//                   elementwise update.
//   launch_tangent_dots  the same when the dot products x_k · g_k are already known (from the logits:
//                   sum_j G_ij c_ij, see cosine_head_op.h): column vectors need only the elementwise update.
// Every kernel takes the storage type T and the math type A = cosine_acc_t<T> (ltk/cosine_head.h): 16-bit
// elements are widened on load and rounded once on store; norms, dot products and the scale are A.
// Shapes are int64; every kernel uses grid-stride loops, so any grid size is valid and all launches of
// an empty problem are skipped.
#pragma once

#include <cstdint>

#include "ltk/cosine_head.h"
#include "ltk/launch.cuh"

namespace ltk {
namespace cosine_cuda {

constexpr int kRowThreads = 256;            // 8 warps, one row each
constexpr int kRowsPerBlock = kRowThreads / 32;
constexpr int kTileCols = 32;               // column kernels: blockDim (32, 8)
constexpr int kTileRows = 8;
constexpr int kEwThreads = 256;             // elementwise kernels: blockDim.x
constexpr int64_t kMaxGridX = 65535L * 16;  // cap for grid-stride launches
constexpr int64_t kMaxGridY = 65535;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T device_sqrt(T v) {
  return sqrt(v);
}

// out[k] = a_k · b_k (or its square root when sqrt_out) for the rows of contiguous (rows, cols) a, b.
// A row belongs to one warp, so the early exit and the shuffles are warp-uniform.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    row_dot_kernel(int64_t rows, int64_t cols, const T* __restrict__ a, const T* __restrict__ b,
                   A* __restrict__ out, int sqrt_out) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* ar = a + row * cols;
    const T* br = b + row * cols;
    A acc = A(0);
    for (int64_t j = lane; j < cols; j += 32) acc += static_cast<A>(ar[j]) * static_cast<A>(br[j]);
    acc = warp_sum(acc);
    if (lane == 0) out[row] = sqrt_out ? device_sqrt(acc) : acc;
  }
}

// The same for the columns: block (32, 8) owns 32 adjacent columns (coalesced row segments), its 8 thread
// rows stride over the matrix rows, and shared memory adds the 8 partial sums.
template <typename T, typename A>
__global__ void __launch_bounds__(kTileCols* kTileRows)
    col_dot_kernel(int64_t rows, int64_t cols, const T* __restrict__ a, const T* __restrict__ b,
                   A* __restrict__ out, int sqrt_out) {
  __shared__ A part[kTileRows][kTileCols + 1];
  for (int64_t c0 = int64_t(blockIdx.x) * kTileCols; c0 < cols; c0 += int64_t(gridDim.x) * kTileCols) {
    const int64_t col = c0 + threadIdx.x;
    A acc = A(0);
    if (col < cols) {
      for (int64_t r = threadIdx.y; r < rows; r += kTileRows) {
        acc += static_cast<A>(a[r * cols + col]) * static_cast<A>(b[r * cols + col]);
      }
    }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
      A s = A(0);
#pragma unroll
      for (int k = 0; k < kTileRows; ++k) s += part[k][threadIdx.x];
      out[col] = sqrt_out ? device_sqrt(s) : s;
    }
    __syncthreads();  // part is rewritten by the next tile
  }
}

// out[i * cols + j] = src[i * s0 + j * s1] / max(rn[i], eps) / max(cn[j], eps); rn / cn may be null.
// Not __restrict__: out may alias src (the in-place forward epilogue).
template <typename T, typename A>
__global__ void __launch_bounds__(kEwThreads)
    scale_kernel(int64_t rows, int64_t cols, const T* src, int64_t s0, int64_t s1, const A* rn, const A* cn, A eps,
                 T* out) {
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    const A ri = rn ? cosine_inv_norm(rn[i], eps) : A(1);
    for (int64_t j = int64_t(blockIdx.x) * kEwThreads + threadIdx.x; j < cols; j += int64_t(gridDim.x) * kEwThreads) {
      A f = static_cast<A>(src[i * s0 + j * s1]) * ri;
      if (cn) f *= cosine_inv_norm(cn[j], eps);
      out[i * cols + j] = static_cast<T>(f);
    }
  }
}

// Row vectors: g_i <- alpha_i (g_i - c_i x_i), one warp per row. `scale`: one value or null (1).
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    row_tangent_kernel(int64_t rows, int64_t cols, T* __restrict__ g, const T* __restrict__ x,
                       const A* __restrict__ norm, A eps, int prescaled, const A* __restrict__ scale) {
  const int lane = threadIdx.x % 32;
  const A s = scale ? scale[0] : A(1);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    T* gr = g + row * cols;
    const T* xr = x + row * cols;
    A d = A(0);
    for (int64_t j = lane; j < cols; j += 32) d += static_cast<A>(xr[j]) * static_cast<A>(gr[j]);
    d = warp_sum(d);
    const A n = norm[row];
    const A c = cosine_tangent_coef(n, d, eps);
    const A alpha = cosine_tangent_alpha(n, eps, prescaled != 0, s);
    for (int64_t j = lane; j < cols; j += 32) {
      gr[j] = static_cast<T>(cosine_tangent_apply(static_cast<A>(gr[j]), static_cast<A>(xr[j]), alpha, c));
    }
  }
}

// Column vectors, second pass: dots[j] = x_j · g_j from col_dot_kernel.
template <typename T, typename A>
__global__ void __launch_bounds__(kEwThreads)
    col_tangent_kernel(int64_t rows, int64_t cols, T* __restrict__ g, const T* __restrict__ x,
                       const A* __restrict__ norm, const A* __restrict__ dots, A eps, int prescaled,
                       const A* __restrict__ scale) {
  const A s = scale ? scale[0] : A(1);
  for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
    for (int64_t j = int64_t(blockIdx.x) * kEwThreads + threadIdx.x; j < cols; j += int64_t(gridDim.x) * kEwThreads) {
      const A n = norm[j];
      const A c = cosine_tangent_coef(n, dots[j], eps);
      const A alpha = cosine_tangent_alpha(n, eps, prescaled != 0, s);
      g[i * cols + j] = static_cast<T>(
          cosine_tangent_apply(static_cast<A>(g[i * cols + j]), static_cast<A>(x[i * cols + j]), alpha, c));
    }
  }
}

// ---- launch functions -------------------------------------------------------------------------------

inline unsigned grid_for(int64_t work, int64_t per_block, int64_t cap) {
  int64_t g = (work + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

// Vector dot products of two contiguous (rows, cols) matrices (b may be a: squared norms); vectors are
// the rows (vec_rows) or the columns; out has one value per vector, sqrt'ed when sqrt_out.
template <typename T, typename A = cosine_acc_t<T>>
void launch_vec_dot(int64_t rows, int64_t cols, const T* a, const T* b, bool vec_rows, bool sqrt_out, A* out,
                    cudaStream_t stream) {
  if (vec_rows) {
    if (rows == 0) return;
    LTK_LAUNCH((row_dot_kernel<T, A>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads), 0, stream,
               rows, cols, a, b, out, int(sqrt_out));
  } else {
    if (cols == 0) return;
    LTK_LAUNCH((col_dot_kernel<T, A>), dim3(grid_for(cols, kTileCols, kMaxGridX)), dim3(kTileCols, kTileRows), 0,
               stream, rows, cols, a, b, out, int(sqrt_out));
  }
}

// Raw L2 norms of the vectors of contiguous (rows, cols) m.
template <typename T, typename A = cosine_acc_t<T>>
void launch_norms(int64_t rows, int64_t cols, const T* m, bool vec_rows, A* out, cudaStream_t stream) {
  launch_vec_dot<T, A>(rows, cols, m, m, vec_rows, /*sqrt_out=*/true, out, stream);
}

// out = src / max(rn, eps)[:, None] / max(cn, eps)[None, :]; src with strides (s0, s1), out contiguous.
template <typename T, typename A = cosine_acc_t<T>>
void launch_scale(int64_t rows, int64_t cols, const T* src, int64_t s0, int64_t s1, const A* rn, const A* cn, A eps,
                  T* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const dim3 grid(grid_for(cols, kEwThreads, kMaxGridX), static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
  LTK_LAUNCH((scale_kernel<T, A>), grid, dim3(kEwThreads), 0, stream, rows, cols, src, s0, s1, rn, cn, eps, out);
}

// Tangent projection of g (contiguous (rows, cols), in place) against x (same layout); `workspace` holds
// one value per vector and is needed only for column vectors (may be null for row vectors).
template <typename T, typename A = cosine_acc_t<T>>
void launch_tangent(int64_t rows, int64_t cols, T* g, const T* x, bool vec_rows, const A* norm, A eps, bool prescaled,
                    const A* scale, A* workspace, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (vec_rows) {
    LTK_LAUNCH((row_tangent_kernel<T, A>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads), 0, stream,
               rows, cols, g, x, norm, eps, int(prescaled), scale);
  } else {
    launch_vec_dot<T, A>(rows, cols, x, g, /*vec_rows=*/false, /*sqrt_out=*/false, workspace, stream);
    const dim3 grid(grid_for(cols, kEwThreads, kMaxGridX),
                    static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
    LTK_LAUNCH((col_tangent_kernel<T, A>), grid, dim3(kEwThreads), 0, stream, rows, cols, g, x, norm,
               static_cast<const A*>(workspace), eps, int(prescaled), scale);
  }
}

// launch_tangent with known dot products `dots` (one per vector). Row vectors recompute them in the same
// warp pass (free: the row is read anyway); column vectors skip the column-dot kernel.
template <typename T, typename A = cosine_acc_t<T>>
void launch_tangent_dots(int64_t rows, int64_t cols, T* g, const T* x, bool vec_rows, const A* norm, const A* dots,
                         A eps, bool prescaled, const A* scale, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (vec_rows) {
    LTK_LAUNCH((row_tangent_kernel<T, A>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads), 0, stream,
               rows, cols, g, x, norm, eps, int(prescaled), scale);
  } else {
    const dim3 grid(grid_for(cols, kEwThreads, kMaxGridX),
                    static_cast<unsigned>(rows < kMaxGridY ? rows : kMaxGridY));
    LTK_LAUNCH((col_tangent_kernel<T, A>), grid, dim3(kEwThreads), 0, stream, rows, cols, g, x, norm, dots, eps,
               int(prescaled), scale);
  }
}

}  // namespace cosine_cuda
}  // namespace ltk
