// CUDA kernels of the cosine classifier head (docs/methods.md §1.1) and their raw-pointer launch functions.
// Plain CUDA C++ launched only through LTK_LAUNCH, so the SIMT emulator (csrc/emu) runs the same source.
// The GEMMs are cuBLAS (at::mm in cosine_head_common.cpp); these are the fused pieces around them:
//
//   launch_vec_dot / launch_norms   a_k · b_k or |m_k| for the vectors of contiguous matrices
//                   (vec_dots_kernel; rows: one warp per row; columns: a 32-column tile per block, 8 row
//                   strides reduced through shared memory)
//   launch_norms_pair  the norms of two matrices (the features' and the weight's) in one launch of the
//                   same kernel: the first blocks take one matrix, the rest the other
//   launch_scale    out[i, j] = src[i, j] / max(rn[i], eps) / max(cn[j], eps)   (the forward epilogue;
//                   src any strides, out contiguous, out may be src)
//   launch_tangent  g_k <- alpha_k (g_k - c_k x_k) per vector (the backward epilogue, ltk/cosine_head.h);
//                   row vectors: one warp per row (dot product, then the update while the row is cached);
//                   column vectors: a column-dot kernel into `workspace` (n_vec values), then an
//                   elementwise update.
//   launch_scale_dots  the backward prologue in one pass over the logit gradient G: G2 = G / |x_i| / |w_j|
//                   and the tangent dot products sum_j G_ij c_ij (per row) and sum_i G_ij c_ij (per
//                   column) as fixed-order partial sums, one per 256-column / 32-row tile (no atomics, no
//                   second kernel: the tangent kernel adds the parts)
//   launch_tangent_dots  the tangent projection when the dot products x_k · g_k are already known, whole or
//                   as partial sums (parts x n_vec, from launch_scale_dots): column vectors need only the
//                   elementwise update.
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

// One set of vector dot products: out[k] = a_k · b_k (or its square root when sqrt_out) for the vectors of
// contiguous (rows, cols) matrices a, b (b may be a: squared norms), the rows (vec_rows) or the columns.
template <typename T, typename A>
struct DotSet {
  int64_t rows, cols;
  const T* a;
  const T* b;
  int vec_rows, sqrt_out;
  A* out;
};

// Row vectors, as block `block` of `nblocks` (256 threads): one warp per row, so the early exit and the
// shuffles are warp-uniform.
template <typename T, typename A>
__device__ __forceinline__ void row_dots_part(const DotSet<T, A>& s, unsigned block, unsigned nblocks) {
  const int lane = threadIdx.x % 32;
  for (int64_t row = int64_t(block) * kRowsPerBlock + threadIdx.x / 32; row < s.rows;
       row += int64_t(nblocks) * kRowsPerBlock) {
    const T* ar = s.a + row * s.cols;
    const T* br = s.b + row * s.cols;
    A acc = A(0);
    for (int64_t j = lane; j < s.cols; j += 32) acc += static_cast<A>(ar[j]) * static_cast<A>(br[j]);
    acc = warp_sum(acc);
    if (lane == 0) s.out[row] = s.sqrt_out ? device_sqrt(acc) : acc;
  }
}

// Column vectors: the 256 threads are a 32 x 8 tile owning 32 adjacent columns (coalesced row segments), its
// 8 thread rows stride over the matrix rows, and `part` (shared) adds the 8 partial sums. Ends with a
// barrier, so `part` may be reused at once.
template <typename T, typename A>
__device__ __forceinline__ void col_dots_part(const DotSet<T, A>& s, A (&part)[kTileRows][kTileCols + 1],
                                              unsigned block, unsigned nblocks) {
  const int tx = threadIdx.x % kTileCols, ty = threadIdx.x / kTileCols;
  for (int64_t c0 = int64_t(block) * kTileCols; c0 < s.cols; c0 += int64_t(nblocks) * kTileCols) {
    const int64_t col = c0 + tx;
    A acc = A(0);
    if (col < s.cols) {
      for (int64_t r = ty; r < s.rows; r += kTileRows) {
        acc += static_cast<A>(s.a[r * s.cols + col]) * static_cast<A>(s.b[r * s.cols + col]);
      }
    }
    part[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < s.cols) {
      A sum = A(0);
#pragma unroll
      for (int k = 0; k < kTileRows; ++k) sum += part[k][tx];
      s.out[col] = s.sqrt_out ? device_sqrt(sum) : sum;
    }
    __syncthreads();  // part is rewritten by the next tile
  }
}

template <typename T, typename A>
__device__ __forceinline__ void dot_set_part(const DotSet<T, A>& s, A (&part)[kTileRows][kTileCols + 1],
                                             unsigned block, unsigned nblocks) {
  if (s.vec_rows) {
    row_dots_part(s, block, nblocks);
  } else {
    col_dots_part(s, part, block, nblocks);
  }
}

// One or two sets of dot products in one launch (the second: the weight's norms next to the features').
// Blocks [0, n1) take the first set, the rest the second, where n1 is first_blocks capped so that a second
// set with vectors keeps at least one block; a one-block grid does both in turn (any grid is valid: each
// part strides over its own block count). Which set a block takes is block-uniform.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    vec_dots_kernel(DotSet<T, A> first, DotSet<T, A> second, unsigned first_blocks) {
  __shared__ A part[kTileRows][kTileCols + 1];
  const unsigned g = gridDim.x;
  const bool second_work = (second.vec_rows ? second.rows : second.cols) > 0;
  unsigned n1 = first_blocks < g ? first_blocks : g;
  if (second_work && n1 == g && g > 1) n1 = g - 1;
  if (g == 1) {
    dot_set_part(first, part, 0, 1);
    dot_set_part(second, part, 0, 1);
  } else if (blockIdx.x < n1) {
    dot_set_part(first, part, blockIdx.x, n1);
  } else {
    dot_set_part(second, part, blockIdx.x - n1, g - n1);
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

constexpr int kDotsTileCols = 256;  // scale_dots_kernel: a tile is 32 rows x 256 columns, one per block
constexpr int kDotsColsPerLane = kDotsTileCols / 32;
constexpr int kDotsRowsPerWarp = 4;
constexpr int kDotsTileRows = kDotsRowsPerWarp * (kRowThreads / 32);

// out = src / max(rn, eps)[:, None] / max(cn, eps)[None, :] (src contiguous; out may be src), and with
// v = src * c the partial sums row_parts[tx][i] = sum of v_ij over the columns of column tile tx and
// col_parts[ty][j] = sum of v_ij over the rows of row tile ty (either may be null). Every (ty, tx) tile
// writes its own slots, so the sums are in a fixed order for any grid. Warp w takes 4 rows of the tile,
// lane l the columns l + 32k; the column sums of the 8 warps meet in shared memory.
template <typename T, typename A>
__global__ void __launch_bounds__(kRowThreads)
    scale_dots_kernel(int64_t rows, int64_t cols, const T* src, const T* __restrict__ c, const A* __restrict__ rn,
                      const A* __restrict__ cn, A eps, T* out, A* __restrict__ row_parts,
                      A* __restrict__ col_parts) {
  __shared__ A colsum[kRowThreads / 32][kDotsTileCols];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row_tiles = (rows + kDotsTileRows - 1) / kDotsTileRows;
  const int64_t col_tiles = (cols + kDotsTileCols - 1) / kDotsTileCols;
  for (int64_t ty = blockIdx.y; ty < row_tiles; ty += gridDim.y) {
    for (int64_t tx = blockIdx.x; tx < col_tiles; tx += gridDim.x) {
      const int64_t j0 = tx * kDotsTileCols;
      A cinv[kDotsColsPerLane], csum[kDotsColsPerLane];
#pragma unroll
      for (int k = 0; k < kDotsColsPerLane; ++k) {
        const int64_t j = j0 + lane + 32 * k;
        cinv[k] = (cn && j < cols) ? cosine_inv_norm(cn[j], eps) : A(1);
        csum[k] = A(0);
      }
      for (int q = 0; q < kDotsRowsPerWarp; ++q) {
        const int64_t i = ty * kDotsTileRows + warp * kDotsRowsPerWarp + q;
        if (i >= rows) break;  // warp-uniform
        const A ri = rn ? cosine_inv_norm(rn[i], eps) : A(1);
        A rsum = A(0);
#pragma unroll
        for (int k = 0; k < kDotsColsPerLane; ++k) {
          const int64_t j = j0 + lane + 32 * k;
          if (j < cols) {
            const A gv = static_cast<A>(src[i * cols + j]);
            const A v = gv * static_cast<A>(c[i * cols + j]);
            rsum += v;
            csum[k] += v;
            out[i * cols + j] = static_cast<T>(gv * ri * cinv[k]);
          }
        }
        if (row_parts) {
          rsum = warp_sum(rsum);
          if (lane == 0) row_parts[tx * rows + i] = rsum;
        }
      }
      if (col_parts) {
#pragma unroll
        for (int k = 0; k < kDotsColsPerLane; ++k) colsum[warp][lane + 32 * k] = csum[k];
        __syncthreads();
        const int64_t j = j0 + threadIdx.x;
        if (j < cols) {
          A s = A(0);
#pragma unroll
          for (int w = 0; w < kRowThreads / 32; ++w) s += colsum[w][threadIdx.x];
          col_parts[ty * cols + j] = s;
        }
        __syncthreads();  // colsum is rewritten by the next tile
      }
    }
  }
}

// Row vectors: g_i <- alpha_i (g_i - c_i x_i), one warp per row. `scale`: one value or null (1). The dot
// products x_i · g_i are `n_parts` partial sums parts[p * rows + i] (kParts; the lanes add them in a fixed
// order), else computed here (parts unused). Two instantiations rather than a runtime test: one kernel with
// both ways spilled on sm_80.
template <typename T, typename A, bool kParts>
__global__ void __launch_bounds__(kRowThreads)
    row_tangent_kernel(int64_t rows, int64_t cols, T* __restrict__ g, const T* __restrict__ x,
                       const A* __restrict__ norm, const A* __restrict__ parts, int64_t n_parts, A eps, int prescaled,
                       const A* __restrict__ scale) {
  const int lane = threadIdx.x % 32;
  const A s = scale ? scale[0] : A(1);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    T* gr = g + row * cols;
    const T* xr = x + row * cols;
    A d = A(0);
    if constexpr (kParts) {
      for (int64_t p = lane; p < n_parts; p += 32) d += parts[p * rows + row];
    } else {
      for (int64_t j = lane; j < cols; j += 32) d += static_cast<A>(xr[j]) * static_cast<A>(gr[j]);
    }
    d = warp_sum(d);
    const A n = norm[row];
    const A c = cosine_tangent_coef(n, d, eps);
    const A alpha = cosine_tangent_alpha(n, eps, prescaled != 0, s);
    for (int64_t j = lane; j < cols; j += 32) {
      gr[j] = static_cast<T>(cosine_tangent_apply(static_cast<A>(gr[j]), static_cast<A>(xr[j]), alpha, c));
    }
  }
}

// Column vectors: g_j <- alpha_j (g_j - c_j x_j) with the dot products x_j · g_j given as `n_parts` partial
// sums parts[p * cols + j] (1 part: whole dots from launch_vec_dot). Each thread owns a column: it adds the
// parts once, then updates the column's elements in the block's rows (blockIdx.y, strided by gridDim.y).
template <typename T, typename A>
__global__ void __launch_bounds__(kEwThreads)
    col_tangent_kernel(int64_t rows, int64_t cols, T* __restrict__ g, const T* __restrict__ x,
                       const A* __restrict__ norm, const A* __restrict__ parts, int64_t n_parts, A eps, int prescaled,
                       const A* __restrict__ scale) {
  const A s = scale ? scale[0] : A(1);
  for (int64_t j = int64_t(blockIdx.x) * kEwThreads + threadIdx.x; j < cols; j += int64_t(gridDim.x) * kEwThreads) {
    A d = A(0);
    for (int64_t p = 0; p < n_parts; ++p) d += parts[p * cols + j];
    const A n = norm[j];
    const A c = cosine_tangent_coef(n, d, eps);
    const A alpha = cosine_tangent_alpha(n, eps, prescaled != 0, s);
    for (int64_t i = blockIdx.y; i < rows; i += gridDim.y) {
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

// Blocks vec_dots_kernel gives a set: one per 8 row vectors or 32 columns, none when it is empty.
template <typename T, typename A>
int64_t dot_set_blocks(const DotSet<T, A>& s) {
  if (s.vec_rows) return s.rows == 0 ? 0 : grid_for(s.rows, kRowsPerBlock, kMaxGridX / 2);
  return s.cols == 0 ? 0 : grid_for(s.cols, kTileCols, kMaxGridX / 2);
}

template <typename T, typename A>
void launch_dot_sets(const DotSet<T, A>& first, const DotSet<T, A>& second, cudaStream_t stream) {
  const int64_t n1 = dot_set_blocks(first), n2 = dot_set_blocks(second);
  if (n1 + n2 == 0) return;
  LTK_LAUNCH((vec_dots_kernel<T, A>), dim3(static_cast<unsigned>(n1 + n2)), dim3(kRowThreads), 0, stream, first,
             second, static_cast<unsigned>(n1));
}

// Vector dot products of two contiguous (rows, cols) matrices (b may be a: squared norms); vectors are
// the rows (vec_rows) or the columns; out has one value per vector, sqrt'ed when sqrt_out.
template <typename T, typename A = cosine_acc_t<T>>
void launch_vec_dot(int64_t rows, int64_t cols, const T* a, const T* b, bool vec_rows, bool sqrt_out, A* out,
                    cudaStream_t stream) {
  const DotSet<T, A> none{0, 0, a, a, 1, 0, out};
  launch_dot_sets<T, A>({rows, cols, a, b, int(vec_rows), int(sqrt_out), out}, none, stream);
}

// Raw L2 norms of the vectors of contiguous (rows, cols) m.
template <typename T, typename A = cosine_acc_t<T>>
void launch_norms(int64_t rows, int64_t cols, const T* m, bool vec_rows, A* out, cudaStream_t stream) {
  launch_vec_dot<T, A>(rows, cols, m, m, vec_rows, /*sqrt_out=*/true, out, stream);
}

// Raw L2 norms of the vectors of two contiguous matrices (a: (a_rows, a_cols), vectors its rows when
// a_vec_rows; b likewise) in one launch.
template <typename T, typename A = cosine_acc_t<T>>
void launch_norms_pair(int64_t a_rows, int64_t a_cols, const T* a, bool a_vec_rows, A* a_out, int64_t b_rows,
                       int64_t b_cols, const T* b, bool b_vec_rows, A* b_out, cudaStream_t stream) {
  launch_dot_sets<T, A>({a_rows, a_cols, a, a, int(a_vec_rows), 1, a_out},
                        {b_rows, b_cols, b, b, int(b_vec_rows), 1, b_out}, stream);
}

// Partial sums launch_scale_dots writes: row_parts is (scale_dots_row_parts(cols), rows), col_parts
// (scale_dots_col_parts(rows), cols).
inline int64_t scale_dots_row_parts(int64_t cols) { return (cols + kDotsTileCols - 1) / kDotsTileCols; }
inline int64_t scale_dots_col_parts(int64_t rows) { return (rows + kDotsTileRows - 1) / kDotsTileRows; }

// out = src / max(rn, eps)[:, None] / max(cn, eps)[None, :] and the partial row / column sums of src * c
// (src, c contiguous; out may be src; row_parts / col_parts may be null), one launch.
template <typename T, typename A = cosine_acc_t<T>>
void launch_scale_dots(int64_t rows, int64_t cols, const T* src, const T* c, const A* rn, const A* cn, A eps, T* out,
                       A* row_parts, A* col_parts, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t gy = scale_dots_col_parts(rows);
  const dim3 grid(grid_for(cols, kDotsTileCols, kMaxGridX), static_cast<unsigned>(gy < kMaxGridY ? gy : kMaxGridY));
  LTK_LAUNCH((scale_dots_kernel<T, A>), grid, dim3(kRowThreads), 0, stream, rows, cols, src, c, rn, cn, eps, out,
             row_parts, col_parts);
}

// Grid of col_tangent_kernel: a column per thread, and blocks of at least 8 rows per part so that adding
// the parts (once per column and block) costs at most an eighth of the update's reads.
inline dim3 col_tangent_grid(int64_t rows, int64_t cols, int64_t n_parts) {
  const int64_t rows_per_block = 8 * (n_parts > 1 ? n_parts : 1);
  const int64_t gy = (rows + rows_per_block - 1) / rows_per_block;
  return dim3(grid_for(cols, kEwThreads, kMaxGridX), static_cast<unsigned>(gy < kMaxGridY ? gy : kMaxGridY));
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
    LTK_LAUNCH((row_tangent_kernel<T, A, false>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads), 0,
               stream, rows, cols, g, x, norm, static_cast<const A*>(nullptr), int64_t(0), eps, int(prescaled), scale);
  } else {
    launch_vec_dot<T, A>(rows, cols, x, g, /*vec_rows=*/false, /*sqrt_out=*/false, workspace, stream);
    LTK_LAUNCH((col_tangent_kernel<T, A>), col_tangent_grid(rows, cols, 1), dim3(kEwThreads), 0, stream, rows, cols,
               g, x, norm, static_cast<const A*>(workspace), int64_t(1), eps, int(prescaled), scale);
  }
}

// launch_tangent with known dot products: `dots` holds n_parts partial sums per vector
// (dots[p * n_vec + k]; 1 part: the dots themselves), so no kernel computes them again (column vectors
// skip the column-dot kernel).
template <typename T, typename A = cosine_acc_t<T>>
void launch_tangent_dots(int64_t rows, int64_t cols, T* g, const T* x, bool vec_rows, const A* norm, const A* dots,
                         int64_t n_parts, A eps, bool prescaled, const A* scale, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  if (vec_rows) {
    if (dots) {
      LTK_LAUNCH((row_tangent_kernel<T, A, true>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads), 0,
                 stream, rows, cols, g, x, norm, dots, n_parts, eps, int(prescaled), scale);
    } else {  // (no parts to read: computed in the warp pass)
      LTK_LAUNCH((row_tangent_kernel<T, A, false>), dim3(grid_for(rows, kRowsPerBlock, kMaxGridX)), dim3(kRowThreads),
                 0, stream, rows, cols, g, x, norm, dots, n_parts, eps, int(prescaled), scale);
    }
  } else {
    LTK_LAUNCH((col_tangent_kernel<T, A>), col_tangent_grid(rows, cols, n_parts), dim3(kEwThreads), 0, stream, rows,
               cols, g, x, norm, dots, n_parts, eps, int(prescaled), scale);
  }
}

}  // namespace cosine_cuda
}  // namespace ltk
