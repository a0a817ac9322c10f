// Device-agnostic preparation of a margin_ce call: argument checks, per-class vectors cast to the
// accumulation type, the reduction's denominator (on the CPU), and the host side of a call.
// Shared by the CPU (cpu/margin_ce_cpu.cpp) and CUDA (cuda/margin_ce_cuda.cu) entry points.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ltk/margin_ce.h"
#include "margin_ce_op.h"

namespace ltk {

// Checked, contiguous, accumulation-typed copies of everything the kernels read.
struct MarginCePrepared {
  at::Tensor input, target;
#define LTK_MCE_PREPARED_VECTOR(kind, name, len) at::Tensor name;  // undefined when absent
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_MCE_PREPARED_VECTOR, LTK_MCE_NOSEP)
#undef LTK_MCE_PREPARED_VECTOR
  at::Tensor noise;
  // The call's scalars. On the CPU they are computed here, on the host. On a device they are computed by
  // the kernels' prologue into `scalars` (MarginCeScalars, ltk/margin_ce.h), so that the host never waits
  // for the device: nothing computed on the device is read back.
  double inv_denom_host = 1, weight_sum_host = 0;
  float inv_denom_host_f = 1, weight_sum_host_f = 0;
  at::Tensor scalars;  // device only: sizeof(MarginCeScalars) bytes
  uint64_t seed = 0;
  at::ScalarType acc_type;
  int64_t N = 0, C = 0;
};

MarginCePrepared prepare_margin_ce(const MarginCeInputs& in);

template <typename scalar_t, typename acc_t>
MarginCeArgs<scalar_t, acc_t> make_args(const MarginCeInputs& in, const MarginCePrepared& p) {
  MarginCeArgs<scalar_t, acc_t> a;
  auto ptr = [](const at::Tensor& t) -> const acc_t* { return t.defined() ? t.data_ptr<acc_t>() : nullptr; };
  a.input = p.input.data_ptr<scalar_t>();
  a.target = p.target.data_ptr<int64_t>();
#define LTK_MCE_ARGS_VECTOR(kind, name, len) a.name = ptr(p.name);
  LTK_MARGIN_CE_VECTOR_ARGS(LTK_MCE_ARGS_VECTOR, LTK_MCE_NOSEP)
#undef LTK_MCE_ARGS_VECTOR
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
  a.reduction = static_cast<int>(in.reduction);
  if (p.scalars.defined()) {
    auto* s = reinterpret_cast<MarginCeScalars<acc_t>*>(p.scalars.data_ptr());
    a.inv_denom = &s->inv_denom;
    a.weight_sum = &s->weight_sum;
    a.scalars = s;
  } else if constexpr (std::is_same_v<acc_t, double>) {
    a.inv_denom = &p.inv_denom_host;
    a.weight_sum = &p.weight_sum_host;
  } else {
    a.inv_denom = &p.inv_denom_host_f;
    a.weight_sum = &p.weight_sum_host_f;
  }
  a.N = p.N;
  a.C = p.C;
  return a;
}

// One margin_ce call for a device: prepare, allocate the outputs, dispatch on the input dtype and hand
// the kernel's raw view to `launch` (a generic callable taking MarginCeArgs<scalar_t, acc_t>&).
// On the CPU the kernel writes per-row losses to a host buffer, summed here in double; on a device the
// kernels reduce themselves (MarginCeArgs::loss_out) and this issues no device work of its own.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_margin_ce(const MarginCeInputs& in, Launch&& launch) {
  const MarginCePrepared p = prepare_margin_ce(in);
  const auto opts = in.input.options();
  const auto acc_opts = opts.dtype(p.acc_type);
  const bool cpu = in.input.is_cpu();
  const bool none = in.reduction == kReduceNone;
  // On the CPU a reduced loss is summed on the host (in double) straight from a host buffer: at the
  // 128 x 100 shape the four small ATen ops a device reduction needs cost as much as the kernel.
  const bool host_reduce = cpu && !none;
  at::Tensor row_loss = host_reduce ? at::Tensor() : at::empty({p.N}, acc_opts);
  at::Tensor grad = in.compute_grad ? at::empty({p.N, p.C}, opts) : at::empty({0}, opts);
  at::Tensor grad_shift =
      (in.compute_grad && p.row_shift.defined()) ? at::empty({p.N}, acc_opts) : at::empty({0}, acc_opts);
  at::Tensor loss;
  if (!cpu) {
    if (p.N == 0) {  // mean of an empty batch: NaN, as cross_entropy returns; sum: 0
      loss = none ? at::empty({0}, opts)
                  : at::full({}, in.reduction == kReduceSum ? 0.0 : std::nan(""), opts);
      return {loss, grad, grad_shift};
    }
    loss = none ? at::empty({p.N}, opts) : at::empty({}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "margin_ce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> host_rows(host_reduce ? p.N : 0);
    if (p.N > 0) {
      auto a = make_args<scalar_t, acc_t>(in, p);
      a.row_loss = host_reduce ? host_rows.data() : row_loss.data_ptr<acc_t>();
      a.grad = in.compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
      a.grad_row_shift = grad_shift.numel() ? grad_shift.data_ptr<acc_t>() : nullptr;
      if (!cpu) a.loss_out = loss.data_ptr<scalar_t>();
      launch(a);
    }
    if (host_reduce) {
      double total = 0;
      for (const acc_t v : host_rows) total += static_cast<double>(v);
      // mean of an empty batch: 0 * inf = NaN, as cross_entropy returns
      if (in.reduction != kReduceSum) total *= p.inv_denom_host;
      loss = at::empty({}, opts);
      *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(static_cast<acc_t>(total));
    }
  });
  if (cpu && none) loss = row_loss.to(in.input.scalar_type());
  return {loss, grad, grad_shift};
}

}  // namespace ltk
