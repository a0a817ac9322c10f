// Autograd of margin_ce, in C++ so that a training step pays no Python autograd overhead (about
// 0.3 ms per call through torch.library's Python autograd, more than the whole kernel at 128 x 100).
// The forward kernel already produced d loss / d input for a unit grad_output; backward scales it.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "ltk/margin_ce.h"
#include "margin_ce_op.h"

namespace ltk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

MarginCeResult call_below_autograd(LTK_MARGIN_CE_PARAMS) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ltkernels::margin_ce", "").typed<MarginCeSignature>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(LTK_MARGIN_CE_NAMES);
}

// A plain CPU scalar equal to 1 (loss.backward()): reading it is free and the saved gradient is the
// answer. Fake/functional tensors and active dispatch modes (torch.compile tracing) take the general path.
bool is_plain_cpu_one(const at::Tensor& g) {
  if (!g.defined() || !g.device().is_cpu() || g.numel() != 1) return false;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  const auto ks = g.key_set();
  if (ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::Functionalize) ||
      ks.has(c10::DispatchKey::PythonTLSSnapshot) || g.is_meta())
    return false;
  // raw memory is the value only for a plain strided tensor (no negation bit, not an efficient zero tensor)
  if (g.layout() != at::kStrided || !g.has_storage() || g.is_neg() || g._is_zerotensor()) return false;
  // read in place: item() is a dispatched op (~3 us, as much as 10% of a 128 x 100 training step)
  switch (g.scalar_type()) {
    case at::kFloat: return *g.const_data_ptr<float>() == 1.0f;
    case at::kDouble: return *g.const_data_ptr<double>() == 1.0;
    case at::kHalf: return static_cast<float>(*g.const_data_ptr<at::Half>()) == 1.0f;
    case at::kBFloat16: return static_cast<float>(*g.const_data_ptr<at::BFloat16>()) == 1.0f;
    default: return false;
  }
}

// Whether the backward may scale the saved gradient in place (margin_ce_grad_scale_) instead of allocating
// a second N x C: not while tracing (fake / functional tensors, dispatch modes), not when the graph is kept
// for another backward (retain_graph), and not when anyone but autograd holds the storage: the forward
// returns the caller an alias of the saved tensor, so a second user of the storage is the caller keeping the
// op's grad output (or a view of it).
bool may_scale_in_place(const at::Tensor& grad, const at::Tensor& go) {
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) return false;
  for (const at::Tensor* t : {&grad, &go}) {
    const auto ks = t->key_set();
    if (ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::Functionalize) ||
        ks.has(c10::DispatchKey::PythonTLSSnapshot) || t->is_meta() || t->layout() != at::kStrided)
      return false;
  }
  if (go.device() != grad.device() || !grad.is_contiguous() || !grad.has_storage()) return false;
  if (torch::autograd::get_current_graph_task_keep_graph()) return false;
  return grad.storage().use_count() == 1;
}

void scale_in_place(at::Tensor& grad, const at::Tensor& go, bool per_row) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ltkernels::margin_ce_grad_scale_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, bool)>();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(grad, go, per_row);
  }
  torch::autograd::impl::bump_version(grad);
}

class MarginCeFunction : public torch::autograd::Function<MarginCeFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, LTK_MARGIN_CE_PARAMS) {
    auto [loss, grad, gshift] = call_below_autograd(LTK_MARGIN_CE_NAMES);
    // The caller gets another tensor object on the saved gradient's storage: while the caller holds it the
    // storage has two users, and the backward then leaves it alone (may_scale_in_place).
    at::Tensor grad_out = grad.alias();
    ctx->mark_non_differentiable({grad_out, gshift});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, gshift});
    ctx->saved_data["none"] = reduction == kReduceNone;
    ctx->saved_data["shift"] = row_shift.has_value() && row_shift->defined();
    return {loss, grad_out, gshift};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(kMarginCeNumArgs);
    const at::Tensor& go = grad_outputs[0];
    if (!go.defined()) return out;
    // The saved gradient is a constant here: under create_graph (grad mode on in here) its derivative with
    // respect to the input would silently be missing from any second derivative, so refuse instead.
    TORCH_CHECK(!at::GradMode::is_enabled() ||
                    !(ctx->needs_input_grad(kMarginCeArg_input) || ctx->needs_input_grad(kMarginCeArg_row_shift)),
                "margin_ce: second derivatives (backward with create_graph=True through the fused loss) are not "
                "implemented; the eager losses of ltkernels.reference support them");
    auto saved = ctx->get_saved_variables();
    at::Tensor& grad = saved[0];
    const at::Tensor& gshift = saved[1];
    TORCH_CHECK(grad.dim() == 2,
                "margin_ce: backward needs compute_grad=True in the forward call (ltkernels.functional sets it "
                "when an input requires grad)");
    const bool none = ctx->saved_data["none"].toBool();
    if (!none && is_plain_cpu_one(go)) {
      out[kMarginCeArg_input] = grad;
    } else if (may_scale_in_place(grad, go)) {
      scale_in_place(grad, go, none);
      out[kMarginCeArg_input] = grad;
    } else {
      out[kMarginCeArg_input] = grad * (none ? go.unsqueeze(1) : go).to(grad.scalar_type());
    }
    if (ctx->saved_data["shift"].toBool()) out[kMarginCeArg_row_shift] = gshift * go.to(gshift.scalar_type());
    return out;
  }
};

MarginCeResult margin_ce_autograd(LTK_MARGIN_CE_PARAMS) {
  auto r = MarginCeFunction::apply(LTK_MARGIN_CE_NAMES);
  return {r[0], r[1], r[2]};
}

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, Autograd, m) { m.impl("margin_ce", &ltk::margin_ce_autograd); }
