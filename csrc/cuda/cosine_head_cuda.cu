// CUDA back end of the cosine head: the at::Tensor side of cosine_head_kernels.cuh (the orchestration and
// the cuBLAS GEMMs are shared with the CPU in cosine_head_common.cpp).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cosine_head_op.h"
#include "cuda/cosine_head_kernels.cuh"

namespace ltk {
namespace {

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Every primitive is one kernel launch, except the column tangent without known dot products (a column-dot
// kernel, then the update): python_tests/test_launch_count.py holds the count per primitive, which the
// emulator tests check against these same launch functions.
struct CudaCosineOps final : CosineDeviceOps {
 protected:
  void norms_impl(const at::Tensor& m, bool vec_rows, at::Tensor& out) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    LTK_COSINE_DISPATCH(m.scalar_type(), "cosine_norms_cuda", [&] {
      cosine_cuda::launch_norms<scalar_t>(m.size(0), m.size(1), m.const_data_ptr<scalar_t>(), vec_rows,
                                          out.mutable_data_ptr<acc_t>(), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void norms_pair_impl(const at::Tensor& a, bool a_rows, at::Tensor& a_out, const at::Tensor& b, bool b_rows,
                       at::Tensor& b_out) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    LTK_COSINE_DISPATCH(a.scalar_type(), "cosine_norms_pair_cuda", [&] {
      cosine_cuda::launch_norms_pair<scalar_t>(a.size(0), a.size(1), a.const_data_ptr<scalar_t>(), a_rows,
                                               a_out.mutable_data_ptr<acc_t>(), b.size(0), b.size(1),
                                               b.const_data_ptr<scalar_t>(), b_rows, b_out.mutable_data_ptr<acc_t>(),
                                               stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void scale_impl(const at::Tensor& src, const at::Tensor& rn, const at::Tensor& cn, double eps,
                  at::Tensor& out) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    LTK_COSINE_DISPATCH(src.scalar_type(), "cosine_scale_cuda", [&] {
      cosine_cuda::launch_scale<scalar_t>(src.size(0), src.size(1), src.const_data_ptr<scalar_t>(), src.stride(0),
                                          src.stride(1), opt_ptr<acc_t>(rn), opt_ptr<acc_t>(cn),
                                          static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>(), stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // One kernel: the scale and both sets of dot products as per-tile partial sums (no atomics, no zero fill).
  std::pair<at::Tensor, at::Tensor> scale_dots_impl(const at::Tensor& src, const at::Tensor& c, const at::Tensor& rn,
                                                    const at::Tensor& cn, double eps, at::Tensor& out, bool want_rows,
                                                    bool want_cols) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const int64_t rows = src.size(0), cols = src.size(1);
    const auto acc = acc_options(src);
    if (rows == 0 || cols == 0) {  // no tile: the sums are zero
      return {want_rows ? at::zeros({1, rows}, acc) : at::Tensor(),
              want_cols ? at::zeros({1, cols}, acc) : at::Tensor()};
    }
    at::Tensor row_parts = want_rows ? at::empty({cosine_cuda::scale_dots_row_parts(cols), rows}, acc) : at::Tensor();
    at::Tensor col_parts = want_cols ? at::empty({cosine_cuda::scale_dots_col_parts(rows), cols}, acc) : at::Tensor();
    const at::Tensor a = src.contiguous();
    LTK_COSINE_DISPATCH(src.scalar_type(), "cosine_scale_dots_cuda", [&] {
      cosine_cuda::launch_scale_dots<scalar_t>(rows, cols, a.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
                                               opt_ptr<acc_t>(rn), opt_ptr<acc_t>(cn), static_cast<acc_t>(eps),
                                               out.mutable_data_ptr<scalar_t>(),
                                               row_parts.defined() ? row_parts.mutable_data_ptr<acc_t>() : nullptr,
                                               col_parts.defined() ? col_parts.mutable_data_ptr<acc_t>() : nullptr,
                                               stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {row_parts, col_parts};
  }
  void tangent_impl(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps,
                    bool prescaled, const at::Tensor& scale, const at::Tensor& dots) const override {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (dots.defined()) {
      const int64_t n_parts = dots.dim() == 2 ? dots.size(0) : 1;
      LTK_COSINE_DISPATCH(g.scalar_type(), "cosine_tangent_dots_cuda", [&] {
        cosine_cuda::launch_tangent_dots<scalar_t>(g.size(0), g.size(1), g.mutable_data_ptr<scalar_t>(),
                                                   x.const_data_ptr<scalar_t>(), vec_rows,
                                                   norm.const_data_ptr<acc_t>(), dots.const_data_ptr<acc_t>(), n_parts,
                                                   static_cast<acc_t>(eps), prescaled, opt_ptr<acc_t>(scale),
                                                   stream);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor ws = vec_rows ? at::Tensor() : at::empty({g.size(1)}, norm.options());
    LTK_COSINE_DISPATCH(g.scalar_type(), "cosine_tangent_cuda", [&] {
      cosine_cuda::launch_tangent<scalar_t>(g.size(0), g.size(1), g.mutable_data_ptr<scalar_t>(),
                                            x.const_data_ptr<scalar_t>(), vec_rows, norm.const_data_ptr<acc_t>(),
                                            static_cast<acc_t>(eps), prescaled, opt_ptr<acc_t>(scale),
                                            ws.defined() ? ws.mutable_data_ptr<acc_t>() : nullptr, stream);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

const CosineDeviceOps& cuda_ops() {
  static const CudaCosineOps ops;
  return ops;
}

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) {
  m.impl("cosine_logits", [](const at::Tensor& features, const at::Tensor& weight, double eps) {
    const c10::cuda::CUDAGuard guard(features.device());
    return ltk::cosine_logits_impl(ltk::cuda_ops(), features, weight, eps);
  });
  m.impl("cosine_logits_backward",
         [](const at::Tensor& grad, const at::Tensor& features, const at::Tensor& weight,
            const at::Tensor& feature_norm, const at::Tensor& weight_norm, double eps, bool need_features,
            bool need_weight, int64_t path, const std::optional<at::Tensor>& logits) {
           const c10::cuda::CUDAGuard guard(features.device());
           return ltk::cosine_logits_backward_impl(ltk::cuda_ops(), grad, features, weight, feature_norm, weight_norm,
                                                   eps, need_features, need_weight, path, logits);
         });
  m.impl("cosine_grad_prep_", [](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& row_norm,
                                 const at::Tensor& col_norm, double eps) {
    const c10::cuda::CUDAGuard guard(grad.device());
    return ltk::cosine_grad_prep_impl(ltk::cuda_ops(), grad, logits, row_norm, col_norm, eps);
  });
  m.impl("cosine_norms", [](const at::Tensor& input, int64_t dim) {
    const c10::cuda::CUDAGuard guard(input.device());
    return ltk::cosine_norms_impl(ltk::cuda_ops(), input, dim);
  });
  m.impl("cosine_scale_", [](const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                             const std::optional<at::Tensor>& col_norm, double eps) {
    const c10::cuda::CUDAGuard guard(self.device());
    ltk::cosine_scale_impl(ltk::cuda_ops(), self, row_norm, col_norm, eps);
  });
  m.impl("cosine_tangent_", [](const at::Tensor& grad, const at::Tensor& vectors, const at::Tensor& norm,
                               double eps, int64_t dim, bool prescaled, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& dots) {
    const c10::cuda::CUDAGuard guard(grad.device());
    ltk::cosine_tangent_impl(ltk::cuda_ops(), grad, vectors, norm, eps, dim, prescaled, scale, dots);
  });
}
