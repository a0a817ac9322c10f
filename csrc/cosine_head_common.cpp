// Device-agnostic bodies of the cosine head ops (schemas in ops.cpp, math in ltk/cosine_head.h):
// argument checks, operand layouts, the GEMMs (at::mm: CPU BLAS or cuBLAS) and the order of the fused
// device primitives (CosineDeviceOps).
//
// Dtypes: float32 and float64 compute in their own precision; float16 and bfloat16 operands go into the GEMMs
// as they are (tensor cores on CUDA, the CPU's bf16 GEMM; both accumulate in fp32) and every norm, dot product
// and epilogue is fp32 (ltk/cosine_head.h: cosine_acc_t), so the norm and dot-product tensors of a 16-bit
// operand are float32. float16 has a 65504 range: a raw dot product |x||w| cos can overflow it, so for
// float16 the operands are normalised before the forward GEMM and the backward takes the normalised-operand
// path (no G / |x| / |w|, which can also leave its range); bfloat16 has float32's range and takes the raw
// paths of float32.
//
// Layouts: features (N, D) have their vectors along dim 1, the weight (D, C) along dim 0 (the official
// NormedLinear layout). Either operand may be contiguous or the transpose of a contiguous matrix (e.g. a
// (C, D) weight passed as weight.t()); both are used without a copy and each gradient comes back in its
// operand's layout. Other strides are copied once.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "cosine_head_op.h"

namespace ltk {
namespace {

// A 2-D operand as a contiguous physical matrix; `logical()` gives back the caller's view.
struct Operand {
  at::Tensor phys;
  bool vec_rows;    // the vectors are the rows of phys
  bool transposed;  // logical = phys.t()
  at::Tensor logical() const { return transposed ? phys.t() : phys; }
  at::Tensor to_logical(const at::Tensor& p) const { return transposed ? p.t() : p; }
};

// The operand with every vector divided by max(its norm, eps), in the caller's logical layout (a fresh
// contiguous physical matrix: the normalised-operand paths of the fp16 forward and of backward path 2).
at::Tensor normalised(const CosineDeviceOps& dev, const Operand& m, const at::Tensor& norm, double eps) {
  const at::Tensor none;
  at::Tensor out = at::empty_like(m.phys, at::MemoryFormat::Contiguous);
  dev.scale(m.phys, m.vec_rows ? norm : none, m.vec_rows ? none : norm, eps, out);
  return m.to_logical(out);
}

Operand canonical(const at::Tensor& t, bool vectors_are_rows) {
  if (t.is_contiguous()) return {t, vectors_are_rows, false};
  if (t.t().is_contiguous()) return {t.t(), !vectors_are_rows, true};
  return {t.contiguous(), vectors_are_rows, false};
}

void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_operands(const at::Tensor& x, const at::Tensor& w, double eps, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": features must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": weight must be 2-D (D, C), got shape ", w.sizes());
  check_float(x, op, "features");
  check_float(w, op, "weight");
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), op, ": features (", x.scalar_type(), ") and weight (",
                   w.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(x.device() == w.device(), op, ": features are on ", x.device(), " but weight is on ",
                    w.device());
  TORCH_CHECK_VALUE(x.size(1) == w.size(0), op, ": features (N, D) = ", x.sizes(), " and weight (D, C) = ",
                    w.sizes(), " disagree on D");
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

at::Tensor checked_vector(const at::Tensor& v, int64_t len, const at::Tensor& like, const char* op,
                          const char* name) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == len, op, ": ", name, " must have shape (", len, ",), got ",
                    v.sizes());
  TORCH_CHECK_VALUE(v.device() == like.device(), op, ": ", name, " is on ", v.device(), " but the data is on ",
                    like.device());
  const at::ScalarType want = acc_dtype(like.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == want, op, ": ", name, " must have dtype ", want, " (for data of dtype ",
                   like.scalar_type(), "), got ", v.scalar_type());
  return v.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_logits_impl(const CosineDeviceOps& dev,
                                                                  const at::Tensor& features,
                                                                  const at::Tensor& weight, double eps) {
  check_operands(features, weight, eps, "cosine_logits");
  const Operand x = canonical(features, /*vectors_are_rows=*/true);
  const Operand w = canonical(weight, /*vectors_are_rows=*/false);
  at::Tensor xn = at::empty({features.size(0)}, acc_options(features));
  at::Tensor wn = at::empty({weight.size(1)}, acc_options(weight));
  dev.norms_pair(x.phys, x.vec_rows, xn, w.phys, w.vec_rows, wn);
  if (features.scalar_type() == at::kHalf) {  // normalised operands: no raw dot product can overflow
    at::Tensor out = at::mm(normalised(dev, x, xn, eps), normalised(dev, w, wn, eps));
    return {out.is_contiguous() ? out : out.contiguous(), xn, wn};
  }
  // One GEMM on the raw operands, then the fused epilogue c_ij *= inv_x_i inv_w_j in place.
  at::Tensor out = at::mm(x.logical(), w.logical());
  if (!out.is_contiguous()) out = out.contiguous();
  dev.scale(out, xn, wn, eps, out);
  return {out, xn, wn};
}

std::tuple<at::Tensor, at::Tensor> cosine_logits_backward_impl(const CosineDeviceOps& dev, const at::Tensor& grad,
                                                               const at::Tensor& features, const at::Tensor& weight,
                                                               const at::Tensor& feature_norm,
                                                               const at::Tensor& weight_norm, double eps,
                                                               bool need_features, bool need_weight, int64_t path,
                                                               const std::optional<at::Tensor>& logits) {
  static const char* op = "cosine_logits_backward";
  check_operands(features, weight, eps, op);
  const int64_t N = features.size(0), D = features.size(1), C = weight.size(1);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == N && grad.size(1) == C, op, ": grad must have shape (", N,
                    ", ", C, "), got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == features.scalar_type(), op, ": grad must have dtype ",
                   features.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == features.device(), op, ": grad is on ", grad.device(), " but features are on ",
                    features.device());
  TORCH_CHECK_VALUE(path >= 0 && path <= 2, op, ": path must be 0 (auto), 1 or 2, got ", path);
  const at::Tensor xn = checked_vector(feature_norm, N, features, op, "feature_norm");
  const at::Tensor wn = checked_vector(weight_norm, C, features, op, "weight_norm");
  const Operand x = canonical(features, true);
  const Operand w = canonical(weight, false);
  at::Tensor gx = at::empty({0}, features.options()), gw = at::empty({0}, features.options());
  if (!need_features && !need_weight) return {gx, gw};

  // Path 1: one (N, C) temporary G2 = grad / |x_i| / |w_j| and both GEMMs on the raw operands.
  // Path 2: the normalised operands V = W / |w_j| (for dx) and U = x / |x_i| (for dW) as temporaries.
  // Path 0 picks the one that writes fewer elements; given the forward's logits it is path 1 with the
  // tangent dot products taken from sum_j grad_ij logits_ij (no dot-product pass over x or W).
  const int64_t cost_g2 = N * C;
  const int64_t cost_uv = (need_features ? D * C : 0) + (need_weight ? N * D : 0);
  const bool has_logits = logits.has_value() && logits->defined();
  const bool half = features.scalar_type() == at::kHalf;  // path 0 is path 2 (see the top of this file)
  const bool use_g2 = path == 1 || (path == 0 && !half && (has_logits || cost_g2 <= cost_uv));
  const at::Tensor none;
  if (has_logits && use_g2) {
    TORCH_CHECK_VALUE(logits->sizes() == grad.sizes(), op, ": logits must have grad's shape ", grad.sizes(),
                      ", got ", logits->sizes());
    TORCH_CHECK_VALUE(logits->device() == grad.device() && logits->scalar_type() == grad.scalar_type(), op,
                      ": logits must be on grad's device with grad's dtype");
    at::Tensor g2 = at::empty({N, C}, features.options());
    const auto [x_dots, w_dots] =
        dev.scale_dots(grad, logits->contiguous(), xn, wn, eps, g2, need_features, need_weight);
    if (need_features) {
      at::Tensor p = x.transposed ? at::mm(w.logical(), g2.t()) : at::mm(g2, w.logical().t());
      dev.tangent(p, x.phys, x.vec_rows, xn, eps, /*prescaled=*/true, none, x_dots);
      gx = x.to_logical(p);
    }
    if (need_weight) {
      at::Tensor p = w.transposed ? at::mm(g2.t(), x.logical()) : at::mm(x.logical().t(), g2);
      dev.tangent(p, w.phys, w.vec_rows, wn, eps, /*prescaled=*/true, none, w_dots);
      gw = w.to_logical(p);
    }
    return {gx, gw};
  }
  if (use_g2) {
    at::Tensor g2 = at::empty({N, C}, features.options());
    dev.scale(grad, xn, wn, eps, g2);
    if (need_features) {
      at::Tensor p = x.transposed ? at::mm(w.logical(), g2.t()) : at::mm(g2, w.logical().t());
      dev.tangent(p, x.phys, x.vec_rows, xn, eps, /*prescaled=*/true, none, none);
      gx = x.to_logical(p);
    }
    if (need_weight) {
      at::Tensor p = w.transposed ? at::mm(g2.t(), x.logical()) : at::mm(x.logical().t(), g2);
      dev.tangent(p, w.phys, w.vec_rows, wn, eps, /*prescaled=*/true, none, none);
      gw = w.to_logical(p);
    }
  } else {
    if (need_features) {
      const at::Tensor vl = normalised(dev, w, wn, eps);
      at::Tensor p = x.transposed ? at::mm(vl, grad.t()) : at::mm(grad, vl.t());
      dev.tangent(p, x.phys, x.vec_rows, xn, eps, /*prescaled=*/false, none, none);
      gx = x.to_logical(p);
    }
    if (need_weight) {
      const at::Tensor ul = normalised(dev, x, xn, eps);
      at::Tensor p = w.transposed ? at::mm(grad.t(), ul) : at::mm(ul.t(), grad);
      dev.tangent(p, w.phys, w.vec_rows, wn, eps, /*prescaled=*/false, none, none);
      gw = w.to_logical(p);
    }
  }
  return {gx, gw};
}

at::Tensor cosine_norms_impl(const CosineDeviceOps& dev, const at::Tensor& m, int64_t dim) {
  static const char* op = "cosine_norms";
  TORCH_CHECK_VALUE(m.dim() == 2, op, ": input must be 2-D, got shape ", m.sizes());
  check_float(m, op, "input");
  TORCH_CHECK_VALUE(dim >= -2 && dim <= 1, op, ": dim must be 0 or 1 (the dimension the vectors lie along), got ",
                    dim);
  const bool along_rows = (dim < 0 ? dim + 2 : dim) == 1;
  const Operand v = canonical(m, along_rows);
  at::Tensor out = at::empty({along_rows ? m.size(0) : m.size(1)}, acc_options(m));
  dev.norms(v.phys, v.vec_rows, out);
  return out;
}

void cosine_scale_impl(const CosineDeviceOps& dev, const at::Tensor& self, const std::optional<at::Tensor>& row_norm,
                       const std::optional<at::Tensor>& col_norm, double eps) {
  static const char* op = "cosine_scale_";
  TORCH_CHECK_VALUE(self.dim() == 2, op, ": self must be 2-D, got shape ", self.sizes());
  check_float(self, op, "self");
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  at::assert_no_internal_overlap(self);
  const bool has_r = row_norm.has_value() && row_norm->defined();
  const bool has_c = col_norm.has_value() && col_norm->defined();
  const at::Tensor rn = has_r ? checked_vector(*row_norm, self.size(0), self, op, "row_norm") : at::Tensor();
  const at::Tensor cn = has_c ? checked_vector(*col_norm, self.size(1), self, op, "col_norm") : at::Tensor();
  if (self.is_contiguous()) {
    at::Tensor s = self;
    dev.scale(s, rn, cn, eps, s);
  } else {
    at::Tensor tmp = at::empty(self.sizes(), self.options());
    dev.scale(self, rn, cn, eps, tmp);
    const_cast<at::Tensor&>(self).copy_(tmp);
  }
}

std::tuple<at::Tensor, at::Tensor> cosine_grad_prep_impl(const CosineDeviceOps& dev, const at::Tensor& grad,
                                                         const at::Tensor& logits, const at::Tensor& row_norm,
                                                         const at::Tensor& col_norm, double eps) {
  static const char* op = "cosine_grad_prep_";
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be 2-D, got shape ", grad.sizes());
  check_float(grad, op, "grad");
  TORCH_CHECK_VALUE(logits.sizes() == grad.sizes(), op, ": logits must have grad's shape ", grad.sizes(), ", got ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.device() == grad.device(), op, ": logits are on ", logits.device(), " but grad is on ",
                    grad.device());
  TORCH_CHECK_TYPE(logits.scalar_type() == grad.scalar_type(), op, ": logits must have dtype ", grad.scalar_type(),
                   ", got ", logits.scalar_type());
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  at::assert_no_internal_overlap(grad);
  at::assert_no_overlap(grad, logits);
  const at::Tensor rn = checked_vector(row_norm, grad.size(0), grad, op, "row_norm");
  const at::Tensor cn = checked_vector(col_norm, grad.size(1), grad, op, "col_norm");
  const at::Tensor c = logits.contiguous();
  std::pair<at::Tensor, at::Tensor> parts;
  if (grad.is_contiguous()) {
    at::Tensor g = grad;
    parts = dev.scale_dots(g, c, rn, cn, eps, g, true, true);
  } else {
    at::Tensor tmp = at::empty(grad.sizes(), grad.options());
    parts = dev.scale_dots(grad, c, rn, cn, eps, tmp, true, true);
    const_cast<at::Tensor&>(grad).copy_(tmp);
  }
  // the op returns whole dot products: add the back end's parts (one part: a view, no op)
  const auto whole = [](const at::Tensor& p) { return p.size(0) == 1 ? p.reshape({p.size(1)}) : p.sum(0); };
  return {whole(parts.first), whole(parts.second)};
}

void cosine_tangent_impl(const CosineDeviceOps& dev, const at::Tensor& grad, const at::Tensor& vectors,
                         const at::Tensor& norm, double eps, int64_t dim, bool prescaled,
                         const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& dots) {
  static const char* op = "cosine_tangent_";
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be 2-D, got shape ", grad.sizes());
  TORCH_CHECK_VALUE(vectors.sizes() == grad.sizes(), op, ": vectors must have grad's shape ", grad.sizes(),
                    ", got ", vectors.sizes());
  check_float(grad, op, "grad");
  TORCH_CHECK_TYPE(vectors.scalar_type() == grad.scalar_type(), op, ": vectors must have dtype ",
                   grad.scalar_type(), ", got ", vectors.scalar_type());
  TORCH_CHECK_VALUE(vectors.device() == grad.device(), op, ": vectors are on ", vectors.device(),
                    " but grad is on ", grad.device());
  TORCH_CHECK_VALUE(dim >= -2 && dim <= 1, op, ": dim must be 0 or 1 (the dimension the vectors lie along), got ",
                    dim);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  const bool along_rows = (dim < 0 ? dim + 2 : dim) == 1;  // vectors along dim 1: each row is one vector
  const int64_t n_vec = along_rows ? grad.size(0) : grad.size(1);
  const at::Tensor nrm = checked_vector(norm, n_vec, grad, op, "norm");
  at::Tensor s;
  if (scale.has_value() && scale->defined()) {
    TORCH_CHECK_VALUE(scale->numel() == 1, op, ": scale must have one element, got shape ", scale->sizes());
    TORCH_CHECK_VALUE(scale->device() == grad.device(), op, ": scale is on ", scale->device(), " but grad is on ",
                      grad.device());
    s = scale->to(acc_dtype(grad.scalar_type())).reshape({1}).contiguous();
  }
  const at::Tensor d = (dots.has_value() && dots->defined()) ? checked_vector(*dots, n_vec, grad, op, "dots")
                                                              : at::Tensor();
  at::assert_no_internal_overlap(grad);
  at::assert_no_overlap(grad, vectors);
  at::Tensor& g = const_cast<at::Tensor&>(grad);
  if (g.is_contiguous()) {
    at::Tensor p = g;
    dev.tangent(p, vectors.contiguous(), along_rows, nrm, eps, prescaled, s, d);
  } else if (g.t().is_contiguous()) {
    at::Tensor p = g.t();
    dev.tangent(p, vectors.t().contiguous(), !along_rows, nrm, eps, prescaled, s, d);
  } else {
    at::Tensor p = g.contiguous();
    dev.tangent(p, vectors.contiguous(), along_rows, nrm, eps, prescaled, s, d);
    g.copy_(p);
  }
}

namespace {

// Autograd of cosine_logits in C++ (a Python register_autograd costs ~100 us per step, which is more
// than the whole head at small shapes). Both directions go through the dispatcher, so FakeTensor /
// torch.compile tracing sees the ops (fake kernels in ltkernels/cosine.py). The norms are returned for
// convenience and are not differentiable. When N <= D (the logits are no larger than the weight) the
// logits are kept for the backward, whose tangent projections then need no dot-product pass over the
// (D, C) weight (cosine_logits_backward's `logits`); modifying them in place before backward is then an
// error, as for any op that saves its output.
class CosineLogitsFunction : public torch::autograd::Function<CosineLogitsFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& features,
                                                const at::Tensor& weight, double eps) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("ltkernels::cosine_logits", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, xn, wn] = op.call(features, weight, eps);
    const bool keep_logits = features.size(0) <= features.size(1);
    ctx->save_for_backward({features, weight, xn, wn, keep_logits ? out : at::Tensor()});
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({xn, wn});
    // the norms' gradients are never used: no zero tensors for them (two allocations and fills a step)
    ctx->set_materialize_grads(false);
    return {out, xn, wn};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ltkernels::cosine_logits_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, double, bool, bool, int64_t, const std::optional<at::Tensor>&)>();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    if (!grads[0].defined() || !(need_x || need_w)) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    // The backward op has no derivative of its own: under create_graph (grad mode on in here) a second
    // derivative through the head would silently lack this term, so refuse instead.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "cosine_logits: second derivatives (backward with create_graph=True through the cosine head) are "
                "not implemented; use F.normalize(x, dim=1) @ F.normalize(W, dim=0) where they are needed");
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // no graph is recorded: skip the autograd fallback
    const std::optional<at::Tensor> logits = saved[4].defined() ? std::optional<at::Tensor>(saved[4]) : std::nullopt;
    auto [gx, gw] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], ctx->saved_data["eps"].toDouble(),
                            need_x, need_w, 0, logits);
    return {need_x ? gx : at::Tensor(), need_w ? gw : at::Tensor(), at::Tensor()};
  }
};

}  // namespace
}  // namespace ltk

TORCH_LIBRARY_IMPL(ltkernels, Autograd, m) {
  m.impl("cosine_logits", [](const at::Tensor& features, const at::Tensor& weight, double eps) {
    auto r = ltk::CosineLogitsFunction::apply(features, weight, eps);
    return std::make_tuple(r[0], r[1], r[2]);
  });
}
