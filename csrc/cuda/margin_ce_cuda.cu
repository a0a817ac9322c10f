// CUDA entry point of margin_ce: the shared preparation (margin_ce_common), one kernel launch on the
// current stream, the shared reduction of per-row losses.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/margin_ce_kernels.cuh"
#include "margin_ce_common.h"
#include "margin_ce_op.h"

namespace ltk {

std::tuple<at::Tensor, at::Tensor, at::Tensor> margin_ce_cuda(LTK_MARGIN_CE_PARAMS) {
  const c10::cuda::CUDAGuard guard(input.device());
  const MarginCeInputs in = LTK_MARGIN_CE_INPUTS;
  const MarginCePrepared p = prepare_margin_ce(in);
  const auto acc_opts = input.options().dtype(p.acc_type);
  at::Tensor row_loss = at::empty({p.N}, acc_opts);
  at::Tensor grad = in.compute_grad ? at::empty({p.N, p.C}, input.options()) : at::empty({0}, input.options());
  at::Tensor grad_shift = (in.compute_grad && p.row_shift.defined()) ? at::empty({p.N}, acc_opts)
                                                                      : at::empty({0}, acc_opts);
  TORCH_CHECK_VALUE(p.N <= 0x7fffffff, "margin_ce: N = ", p.N, " rows exceed the CUDA grid limit");
  if (p.N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "margin_ce_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto a = make_args<scalar_t, acc_t>(in, p);
      a.row_loss = row_loss.data_ptr<acc_t>();
      a.grad = in.compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
      a.grad_row_shift = grad_shift.numel() ? grad_shift.data_ptr<acc_t>() : nullptr;
      cuda::launch_margin_ce<scalar_t, acc_t>(a, at::cuda::getCurrentCUDAStream());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {reduce_row_losses(row_loss, p, reduction, input.scalar_type()), grad, grad_shift};
}

}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CUDA, m) { m.impl("margin_ce", &ltk::margin_ce_cuda); }
