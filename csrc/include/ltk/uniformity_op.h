// Hyperspherical uniformity op (ltkernels::uniformity, schema in ops.cpp; per-pair math in
// ltk/uniformity.h). RECONSTRUCTED FROM THE ABSTRACT of Gao et al. (CAAI TIT 2025), not verified against
// the paper. Host-side declarations: the device-agnostic tiled orchestration (cpu/uniformity_cpu.cpp)
// runs over two element-wise device primitives implemented by the CPU (cpu/uniformity_cpu.cpp) and CUDA
// (cuda/uniformity_cuda.cu) back ends; the GEMMs and the small reductions are ATen (CPU BLAS / cuBLAS).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ltk {

struct UniformityDeviceOps {
  virtual ~UniformityDeviceOps() = default;
  // Tile edge used when the caller passes block = 0.
  virtual int64_t default_block(int64_t C, int64_t D) const = 0;
  // In place on the contiguous (bi, bk) Gram tile g = W^_I W^_K^T; nI (bi) / nK (bk) squared norms;
  // diag: the tile holds the diagonal (row r and column r are the same class).
  //   gaussian: g <- a = -t max(d2, dist_eps), diagonal <- -inf; f is not touched.
  //   riesz/log: g <- p = d f / d d2, f <- f (contiguous (bi, bk)); both 0 on the diagonal.
  virtual void pair_transform(at::Tensor& g, at::Tensor& f, const at::Tensor& nI, const at::Tensor& nK, bool diag,
                              int64_t kernel, double param, double dist_eps) const = 0;
  // prow[r, c] = exp(a[r, c] - mI[r]) (prow may be a itself); pcol[r, c] = exp(a[r, c] - mK[c]) when pcol
  // is defined. All contiguous (bi, bk).
  virtual void exp_shift(const at::Tensor& a, const at::Tensor& mI, const at::Tensor& mK, at::Tensor& prow,
                         at::Tensor& pcol) const = 0;
  // Fixed-shift epilogue (gaussian with 4 t max|w^|^2 small enough that exp(a) cannot underflow, and riesz /
  // log): g <- p (the gaussian's p = exp(a) is also its value term), and the tile's sums
  //   rowsum_p[r] = sum_c p, colsum_p[c] = sum_r p (only when colsum_p is defined), rowsum_f[r] = sum_c f
  // (riesz / log only; the gaussian's value sums are rowsum_p). `work`: a (bi, bk) scratch tile.
  // The default composes pair_transform with ATen ops; the CPU overrides it with fused passes.
  virtual void fixed_epilogue(at::Tensor& g, at::Tensor& work, const at::Tensor& nI, const at::Tensor& nK, bool diag,
                              int64_t kernel, double param, double dist_eps, at::Tensor& rowsum_p,
                              at::Tensor& colsum_p, at::Tensor& rowsum_f) const;
};

const UniformityDeviceOps& uniformity_cpu_ops();

// Op body: returns (value (0-dim), grad (C, D) = dU/dweight for grad_output 1, empty unless compute_grad).
std::tuple<at::Tensor, at::Tensor> uniformity_impl(const UniformityDeviceOps& dev, const at::Tensor& weight,
                                                   int64_t kernel, double param, double eps, double dist_eps,
                                                   int64_t block, bool compute_grad);

}  // namespace ltk
