// Device-agnostic preparation of a margin_ce call: argument checks, per-class vectors cast to the
// accumulation type, the reduction's denominator, and the final reduction of per-row losses.
// Shared by the CPU (cpu/margin_ce_cpu.cpp) and CUDA (cuda/margin_ce_cuda.cu) entry points.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "ltk/margin_ce.h"

namespace ltk {

struct MarginCeInputs {
  at::Tensor input, target;
  std::optional<at::Tensor> col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud,
      noise, seed;
  double scale, noise_mul, angular_eps;
  int64_t offset, angular, reduction, focal;
  double gamma;
  int64_t ignore_index;
  double label_smoothing;
  bool compute_grad;
};

// Checked, contiguous, accumulation-typed copies of everything the kernels read.
struct MarginCePrepared {
  at::Tensor input, target;
  at::Tensor col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud, noise;
  at::Tensor inv_denom;  // (1,) acc dtype on the input's device
  double weight_sum = 0;
  uint64_t seed = 0;
  at::ScalarType acc_type;
  int64_t N = 0, C = 0;
};

MarginCePrepared prepare_margin_ce(const MarginCeInputs& in);

// (loss, grad_input, grad_row_shift) from the kernel's per-row losses.
at::Tensor reduce_row_losses(const at::Tensor& row_loss, const MarginCePrepared& p, int64_t reduction,
                             at::ScalarType out_dtype);

template <typename scalar_t, typename acc_t>
MarginCeArgs<scalar_t, acc_t> make_args(const MarginCeInputs& in, const MarginCePrepared& p) {
  MarginCeArgs<scalar_t, acc_t> a;
  auto ptr = [](const at::Tensor& t) -> const acc_t* { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  a.input = p.input.data_ptr<scalar_t>();
  a.target = p.target.data_ptr<int64_t>();
  a.col_scale = ptr(p.col_scale);
  a.col_bias = ptr(p.col_bias);
  a.margin = ptr(p.margin);
  a.target_scale = ptr(p.target_scale);
  a.weight = ptr(p.weight);
  a.row_shift = ptr(p.row_shift);
  a.shift_coef = ptr(p.shift_coef);
  a.cloud = ptr(p.cloud);
  a.noise = ptr(p.noise);
  a.scale = static_cast<acc_t>(in.scale);
  a.noise_mul = static_cast<acc_t>(in.noise_mul);
  a.angular_eps = static_cast<acc_t>(in.angular_eps);
  a.seed = p.seed;
  a.offset = static_cast<uint64_t>(in.offset);
  a.angular = static_cast<int>(in.angular);
  a.focal = static_cast<int>(in.focal);
  a.gamma = static_cast<acc_t>(in.gamma);
  a.ignore_index = in.ignore_index;
  a.smoothing = static_cast<acc_t>(in.label_smoothing);
  a.weight_sum = static_cast<acc_t>(p.weight_sum);
  a.inv_denom = p.inv_denom.data_ptr<acc_t>();
  a.N = p.N;
  a.C = p.C;
  return a;
}

}  // namespace ltk
