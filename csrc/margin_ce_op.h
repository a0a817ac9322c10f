// Declarations of the margin_ce entry points registered in ops.cpp (CPU) and cuda/margin_ce_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ltk {

#define LTK_MARGIN_CE_PARAMS                                                                                  \
  const at::Tensor &input, const at::Tensor &target, const std::optional<at::Tensor>&col_scale,              \
      const std::optional<at::Tensor>&col_bias, const std::optional<at::Tensor>&margin,                      \
      const std::optional<at::Tensor>&target_scale, const std::optional<at::Tensor>&weight,                  \
      const std::optional<at::Tensor>&row_shift, const std::optional<at::Tensor>&shift_coef,                 \
      const std::optional<at::Tensor>&cloud, const std::optional<at::Tensor>&noise,                          \
      const std::optional<at::Tensor>&seed, double scale, double noise_mul, double angular_eps, int64_t offset, int64_t angular, int64_t reduction, \
      int64_t focal, double gamma, int64_t ignore_index, double label_smoothing, bool compute_grad

#define LTK_MARGIN_CE_INPUTS                                                                             \
  MarginCeInputs {                                                                                       \
    input, target, col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud, noise, \
        seed, scale, noise_mul, angular_eps, offset, angular, reduction, focal, gamma, ignore_index,       \
        label_smoothing, compute_grad                                                                    \
  }

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cpu(LTK_MARGIN_CE_PARAMS);

}  // namespace ltk
