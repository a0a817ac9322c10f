// ltkernels::cross_entropy: plain (optionally class-weighted, label-smoothed) softmax cross-entropy as a
// 7-argument op over margin_ce. It exists for per-call cost only: from Python, an op call pays for the
// conversion of every argument (~0.25 us each), and at 128 x 100 margin_ce's 23 arguments cost more than
// F.cross_entropy's whole lead. CompositeImplicitAutograd: autograd, devices and torch.compile come from
// margin_ce, which this calls through the dispatcher (an unboxed C++ call).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ltk/margin_ce.h"
#include "margin_ce_op.h"

namespace ltk {
namespace {

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing, bool compute_grad) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ltkernels::margin_ce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(LTK_MARGIN_CE_PARAMS)>();
  const std::optional<at::Tensor> none;
  return std::get<0>(op.call(input, target, none, none, none, none, weight, none, none, none, none, none,
                             /*scale=*/1.0, /*noise_mul=*/1.0, /*angular_eps=*/0.0, /*offset=*/0, kLinear,
                             reduction, kFocalOff, /*gamma=*/0.0, ignore_index, label_smoothing, compute_grad));
}

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CompositeImplicitAutograd, m) { m.impl("cross_entropy", &ltk::cross_entropy); }
