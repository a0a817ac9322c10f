// CPU back end of the cosine head (ops in ops.cpp, orchestration in cosine_head_common.cpp): dispatch to the
// kernels of cpu/cosine_head_kernels.h built for the best instruction set (cpu/kernels_table.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cosine_head_op.h"
#include "cpu/kernels_table.h"

namespace ltk {
namespace {

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* opt_mut_ptr(at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

struct CpuCosineOps final : CosineDeviceOps {
 protected:
  void norms_impl(const at::Tensor& m, bool vec_rows, at::Tensor& out) const override {
    LTK_COSINE_DISPATCH(m.scalar_type(), "cosine_norms_cpu", [&] {
      cpu::kernels().cosine<scalar_t>().norms(m.const_data_ptr<scalar_t>(), m.size(0), m.size(1), vec_rows,
                                              out.mutable_data_ptr<acc_t>());
    });
  }
  void scale_impl(const at::Tensor& src, const at::Tensor& rn, const at::Tensor& cn, double eps,
                  at::Tensor& out) const override {
    if (src.numel() == 0) return;
    LTK_COSINE_DISPATCH(src.scalar_type(), "cosine_scale_cpu", [&] {
      cpu::kernels().cosine<scalar_t>().scale(src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1),
                                              src.size(0), src.size(1), opt_ptr<acc_t>(rn), opt_ptr<acc_t>(cn),
                                              static_cast<acc_t>(eps), out.mutable_data_ptr<scalar_t>());
    });
  }
  // One part each: the kernel sums every row and column in one pass.
  std::pair<at::Tensor, at::Tensor> scale_dots_impl(const at::Tensor& src, const at::Tensor& c, const at::Tensor& rn,
                                                    const at::Tensor& cn, double eps, at::Tensor& out, bool want_rows,
                                                    bool want_cols) const override {
    const auto acc = acc_options(src);
    at::Tensor row_dots = want_rows ? at::zeros({1, src.size(0)}, acc) : at::Tensor();
    at::Tensor col_dots = want_cols ? at::zeros({1, src.size(1)}, acc) : at::Tensor();
    if (src.numel() == 0) return {row_dots, col_dots};
    LTK_COSINE_DISPATCH(src.scalar_type(), "cosine_scale_dots_cpu", [&] {
      cpu::kernels().cosine<scalar_t>().scale_dots(
          src.const_data_ptr<scalar_t>(), src.stride(0), src.stride(1), src.size(0), src.size(1),
          c.const_data_ptr<scalar_t>(), opt_ptr<acc_t>(rn), opt_ptr<acc_t>(cn), static_cast<acc_t>(eps),
          out.mutable_data_ptr<scalar_t>(), opt_mut_ptr<acc_t>(row_dots), opt_mut_ptr<acc_t>(col_dots));
    });
    return {row_dots, col_dots};
  }
  void tangent_impl(at::Tensor& g, const at::Tensor& x, bool vec_rows, const at::Tensor& norm, double eps,
                    bool prescaled, const at::Tensor& scale, const at::Tensor& dots) const override {
    if (g.numel() == 0) return;
    TORCH_INTERNAL_ASSERT(!dots.defined() || dots.dim() == 1 || dots.size(0) == 1, "CPU dots come in one part");
    LTK_COSINE_DISPATCH(g.scalar_type(), "cosine_tangent_cpu", [&] {
      const acc_t s = scale.defined() ? scale.item<acc_t>() : acc_t(1);
      cpu::kernels().cosine<scalar_t>().tangent(g.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                g.size(0), g.size(1), vec_rows, norm.const_data_ptr<acc_t>(),
                                                static_cast<acc_t>(eps), prescaled, s, opt_ptr<acc_t>(dots));
    });
  }
};

}  // namespace

const CosineDeviceOps& cosine_cpu_ops() {
  static const CpuCosineOps ops;
  return ops;
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CPU, m) {
  m.impl("cosine_logits", [](const at::Tensor& features, const at::Tensor& weight, double eps) {
    return ltk::cosine_logits_impl(ltk::cosine_cpu_ops(), features, weight, eps);
  });
  m.impl("cosine_logits_backward",
         [](const at::Tensor& grad, const at::Tensor& features, const at::Tensor& weight,
            const at::Tensor& feature_norm, const at::Tensor& weight_norm, double eps, bool need_features,
            bool need_weight, int64_t path, const std::optional<at::Tensor>& logits) {
           return ltk::cosine_logits_backward_impl(ltk::cosine_cpu_ops(), grad, features, weight, feature_norm,
                                                   weight_norm, eps, need_features, need_weight, path, logits);
         });
  m.impl("cosine_grad_prep_", [](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& row_norm,
                                 const at::Tensor& col_norm, double eps) {
    return ltk::cosine_grad_prep_impl(ltk::cosine_cpu_ops(), grad, logits, row_norm, col_norm, eps);
  });
  m.impl("cosine_norms", [](const at::Tensor& input, int64_t dim) {
    return ltk::cosine_norms_impl(ltk::cosine_cpu_ops(), input, dim);
  });
  m.impl("cosine_scale_", [](const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                             const std::optional<at::Tensor>& col_norm, double eps) {
    ltk::cosine_scale_impl(ltk::cosine_cpu_ops(), self, row_norm, col_norm, eps);
  });
  m.impl("cosine_tangent_", [](const at::Tensor& grad, const at::Tensor& vectors, const at::Tensor& norm,
                               double eps, int64_t dim, bool prescaled, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& dots) {
    ltk::cosine_tangent_impl(ltk::cosine_cpu_ops(), grad, vectors, norm, eps, dim, prescaled, scale, dots);
  });
}
