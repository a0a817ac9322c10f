// Cosine classifier head (docs/methods.md §1.1): device-agnostic orchestration (cosine_head_common.cpp) over
// the device primitives of CosineDeviceOps, implemented by the CPU (cpu/cosine_head_cpu.cpp) and CUDA
// (cuda/cosine_head_cuda.cu) back ends. GEMMs go through at::mm (the CPU BLAS / cuBLAS).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <optional>
#include <tuple>
#include <utility>

#include "ltk/cosine_head.h"

// Dispatch over the four floating dtypes for a CosineDeviceOps back end: data pointers are the storage type
// scalar_t, norms, dot products and the scale are acc_t (cosine_acc_t: float for the 16-bit types; the
// tensors of these are allocated and checked in cosine_head_common.cpp).
#define LTK_COSINE_DISPATCH(TYPE, NAME, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] { \
    using acc_t = ::ltk::cosine_acc_t<scalar_t>;                              \
    __VA_ARGS__();                                                            \
  })

namespace ltk {

// dtype of the norms, dot products and scale that go with data of dtype `t` (cosine_acc_t), and the options
// of such a tensor next to `like`.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(acc_dtype(like.scalar_type()));
}

// Primitives on canonical operands: `m` is a contiguous 2-D matrix whose vectors are either its rows
// (vec_rows) or its columns. Matrices share one floating dtype T; norm, dot-product and scale tensors have
// dtype cosine_acc_t<T> (float32 for float16 / bfloat16); all are on one device.
//
// Each call is recorded for the profiler under the name of the CUDA launch function it maps to
// ("ltk_device::cosine_<primitive>"), so a host-side count of these names is a count
// of a CUDA step's kernels: python_tests/test_launch_count.py counts them on the CPU (the orchestration in
// cosine_head_common.cpp is the same code for both devices) and the emulator tests count the launches each
// CUDA primitive makes. The back ends implement the protected *_impl functions.
struct CosineDeviceOps {
  virtual ~CosineDeviceOps() = default;

  // out[k] = |m_k| (raw L2 norm, not clamped); out contiguous of length n_vec.
  void norms(const at::Tensor& m, bool vec_rows, at::Tensor& out) const {
    RECORD_FUNCTION("ltk_device::cosine_norms", c10::ArrayRef<const c10::IValue>{});
    norms_impl(m, vec_rows, out);
  }
  // norms() of two matrices (the features' and the weight's): one kernel on CUDA.
  void norms_pair(const at::Tensor& a, bool a_rows, at::Tensor& a_out, const at::Tensor& b, bool b_rows,
                  at::Tensor& b_out) const {
    RECORD_FUNCTION("ltk_device::cosine_norms_pair", c10::ArrayRef<const c10::IValue>{});
    norms_pair_impl(a, a_rows, a_out, b, b_rows, b_out);
  }
  // out[i, j] = src[i, j] / max(rn[i], eps) / max(cn[j], eps). src: any strides; out contiguous, may be src
  // itself; rn / cn undefined means "no scaling along that dimension".
  void scale(const at::Tensor& src, const at::Tensor& rn, const at::Tensor& cn, double eps, at::Tensor& out) const {
    RECORD_FUNCTION("ltk_device::cosine_scale", c10::ArrayRef<const c10::IValue>{});
    scale_impl(src, rn, cn, eps, out);
  }
  // Like scale(), and the row and column sums of src * c (c contiguous, src's shape),
  // returned as (row_parts, col_parts): fixed-order partial sums of shape (P, rows) and (Q, cols) whose sums
  // over dim 0 are the sums (P, Q are the back end's: 1 on the CPU, one per kernel tile on CUDA); undefined
  // when not wanted. With c the forward's cosines and src the logit gradient G these are the dot products
  // the tangent projections need: x_i · (G2 W^T)_i = sum_j G_ij c_ij and w_j · (x^T G2)_j = sum_i G_ij c_ij
  // for G2 = G / |x_i| / |w_j|, so no pass over the (D, C) weight; tangent() takes the parts as they are.
  std::pair<at::Tensor, at::Tensor> scale_dots(const at::Tensor& src, const at::Tensor& c, const at::Tensor& rn,
                                               const at::Tensor& cn, double eps, at::Tensor& out, bool want_rows,
                                               bool want_cols) const {
    RECORD_FUNCTION("ltk_device::cosine_scale_dots", c10::ArrayRef<const c10::IValue>{});
    return scale_dots_impl(src, c, rn, cn, eps, out, want_rows, want_cols);
  }
  // In place on g (contiguous, x's shape, x contiguous), per vector k (ltk/cosine_head.h):
  //   g_k <- alpha_k (g_k - c_k x_k),  c_k = [n_k >= eps] (x_k · g_k) / n_k^2,
  //   alpha_k = s (prescaled) or s / max(n_k, eps);  s = *scale (a one-element tensor) or 1 if undefined.
  // dots: the x_k · g_k if already known, as a (n_vec,) tensor or the (P, n_vec) parts of scale_dots(); else
  // undefined (computed here).
  void tangent(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps, bool prescaled,
               const at::Tensor& scale, const at::Tensor& dots) const {
    const char* name = vec_rows         ? "ltk_device::cosine_tangent_rows"
                       : dots.defined() ? "ltk_device::cosine_tangent_cols_dots"
                                        : "ltk_device::cosine_tangent_cols";
    RECORD_FUNCTION(name, c10::ArrayRef<const c10::IValue>{});
    tangent_impl(g, x, vec_rows, norm, eps, prescaled, scale, dots);
  }

 protected:
  virtual void norms_impl(const at::Tensor& m, bool vec_rows, at::Tensor& out) const = 0;
  virtual void norms_pair_impl(const at::Tensor& a, bool a_rows, at::Tensor& a_out, const at::Tensor& b, bool b_rows,
                               at::Tensor& b_out) const {
    norms_impl(a, a_rows, a_out);
    norms_impl(b, b_rows, b_out);
  }
  virtual void scale_impl(const at::Tensor& src, const at::Tensor& rn, const at::Tensor& cn, double eps,
                          at::Tensor& out) const = 0;
  virtual std::pair<at::Tensor, at::Tensor> scale_dots_impl(const at::Tensor& src, const at::Tensor& c,
                                                            const at::Tensor& rn, const at::Tensor& cn, double eps,
                                                            at::Tensor& out, bool want_rows, bool want_cols) const = 0;
  virtual void tangent_impl(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps,
                            bool prescaled, const at::Tensor& scale, const at::Tensor& dots) const = 0;
};

const CosineDeviceOps& cosine_cpu_ops();

// Op bodies (schemas in ops.cpp); `dev` must match the tensors' device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_impl(const CosineDeviceOps& dev,
                                                                  const at::Tensor& features,
                                                                  const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> cosine_logits_backward_impl(const CosineDeviceOps& dev, const at::Tensor& grad,
                                                               const at::Tensor& features, const at::Tensor& weight,
                                                               const at::Tensor& feature_norm,
                                                               const at::Tensor& weight_norm, double eps,
                                                               bool need_features, bool need_weight, int64_t path,
                                                               const std::optional<at::Tensor>& logits);
at::Tensor cosine_norms_impl(const CosineDeviceOps& dev, const at::Tensor& m, int64_t dim);
void cosine_scale_impl(const CosineDeviceOps& dev, const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                       const std::optional<at::Tensor>& col_norm, double eps);
std::tuple<at::Tensor, at::Tensor> cosine_grad_prep_impl(const CosineDeviceOps& dev, const at::Tensor& grad,
                                                         const at::Tensor& logits, const at::Tensor& row_norm,
                                                         const at::Tensor& col_norm, double eps);
void cosine_tangent_impl(const CosineDeviceOps& dev, const at::Tensor& grad, const at::Tensor& vectors,
                         const at::Tensor& norm, double eps, int64_t dim, bool prescaled,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& dots);

}  // namespace ltk
