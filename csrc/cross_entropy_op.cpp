// ltkernels::cross_entropy: plain (optionally class-weighted, label-smoothed) softmax cross-entropy as a
// 7-argument op over margin_ce. It exists for per-call cost only: from Python, an op call pays for the
// conversion of every argument (~0.25 us each), and at 128 x 100 margin_ce's two dozen arguments cost more than
// F.cross_entropy's whole lead. CompositeImplicitAutograd: autograd, devices and torch.compile come from
// margin_ce, which this calls through the dispatcher (an unboxed C++ call).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "margin_ce_op.h"

namespace ltk {
namespace {

at::Tensor cross_entropy(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing, bool compute_grad) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ltkernels::margin_ce", "").typed<MarginCeSignature>();
  MarginCeInputs in{input, target};  // the schema's defaults for the rest
  in.weight = weight;
  in.reduction = reduction;
  in.ignore_index = ignore_index;
  in.label_smoothing = label_smoothing;
  in.compute_grad = compute_grad;
  return std::get<0>(op.call(LTK_MARGIN_CE_FIELDS_OF_IN));
}

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, CompositeImplicitAutograd, m) { m.impl("cross_entropy", &ltk::cross_entropy); }
