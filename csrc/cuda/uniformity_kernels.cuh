// CUDA kernels of the hyperspherical uniformity op (RECONSTRUCTED FROM THE ABSTRACT of Gao et al., CAAI
// TIT 2025; per-pair math in ltk/uniformity.h) and their raw-pointer launch functions. Plain CUDA C++
// launched only through LTK_LAUNCH, so the SIMT emulator (csrc/emu) can run the same source. The Gram
// tiles are cuBLAS GEMMs and the row / column reductions ATen (orchestration in cpu/uniformity_cpu.cpp);
// these are the element-wise epilogues of one (bi, bk) tile:
//
//   launch_pair_transform  g <- a = -t max(d2, dist_eps) (gaussian; diagonal -inf), or g <- p = f'(d2),
//                          f <- f(d2) (riesz / log; diagonal 0), d2 = nI[r] + nK[c] - 2 g[r, c]
//   launch_exp_shift       prow = exp(a - mI[r]) (prow may alias a), pcol = exp(a - mK[c]) (pcol may be null);
//                          one pass per output (column pass first)
//
// Shapes are int64; grid-stride loops, so any grid is valid; empty tiles launch nothing.
#pragma once

#include <cstdint>
#include <limits>

#include "ltk/launch.cuh"
#include "ltk/uniformity.h"

namespace ltk {
namespace uniformity_cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = 65535L * 16;
constexpr int64_t kMaxGridY = 65535;

// -inf (constexpr numeric_limits: usable in device code with --expt-relaxed-constexpr, and in the emulator).
template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pair_transform_kernel(int64_t bi, int64_t bk, T* __restrict__ g, T* __restrict__ f, const T* __restrict__ nI,
                          const T* __restrict__ nK, int diag, int kernel, T param, T dist_eps) {
  for (int64_t r = blockIdx.y; r < bi; r += gridDim.y) {
    const T nr = nI[r];
    for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < bk; c += int64_t(gridDim.x) * kThreads) {
      const int64_t i = r * bk + c;
      const T d2 = uni_raw_d2<T>(nr, nK[c], g[i]);
      const bool on_diag = diag && r == c;
      if (kernel == kUniGaussian) {
        g[i] = on_diag ? neg_inf<T>() : uni_gaussian_exponent<T>(d2, param, dist_eps);
      } else {
        T fv, pv;
        uni_energy<T>(kernel, d2, param, dist_eps, fv, pv);
        f[i] = on_diag ? T(0) : fv;
        g[i] = on_diag ? T(0) : pv;
      }
    }
  }
}

// out[r, c] = exp(a[r, c] - shift[kByRow ? r : c]). Not __restrict__: out may alias a (the row pass).
template <typename T, bool kByRow>
__global__ void __launch_bounds__(kThreads)
    exp_shift_kernel(int64_t bi, int64_t bk, const T* a, const T* shift, T* out) {
  for (int64_t r = blockIdx.y; r < bi; r += gridDim.y) {
    const T* ar = a + r * bk;
    T* outr = out + r * bk;
    for (int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x; c < bk; c += int64_t(gridDim.x) * kThreads) {
      outr[c] = ltk_exp<T>(ar[c] - shift[kByRow ? r : c]);
    }
  }
}

// ---- launch functions -------------------------------------------------------------------------------

inline dim3 tile_grid(int64_t bi, int64_t bk) {
  int64_t gx = (bk + kThreads - 1) / kThreads;
  gx = gx < 1 ? 1 : (gx < kMaxGridX ? gx : kMaxGridX);
  const int64_t gy = bi < kMaxGridY ? bi : kMaxGridY;
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename T>
void launch_pair_transform(int64_t bi, int64_t bk, T* g, T* f, const T* nI, const T* nK, bool diag, int kernel,
                           T param, T dist_eps, cudaStream_t stream) {
  if (bi <= 0 || bk <= 0) return;
  LTK_LAUNCH(pair_transform_kernel<T>, tile_grid(bi, bk), dim3(kThreads), 0, stream, bi, bk, g, f, nI, nK,
             diag ? 1 : 0, kernel, param, dist_eps);
}

template <typename T>
void launch_exp_shift(int64_t bi, int64_t bk, const T* a, const T* mI, const T* mK, T* prow, T* pcol,
                      cudaStream_t stream) {
  if (bi <= 0 || bk <= 0) return;
  // the column pass first: prow may alias a
  if (pcol) LTK_LAUNCH((exp_shift_kernel<T, false>), tile_grid(bi, bk), dim3(kThreads), 0, stream, bi, bk, a, mK, pcol);
  LTK_LAUNCH((exp_shift_kernel<T, true>), tile_grid(bi, bk), dim3(kThreads), 0, stream, bi, bk, a, mI, prow);
}

}  // namespace uniformity_cuda
}  // namespace ltk
