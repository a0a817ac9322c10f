// The margin_ce op's C++ side, generated from its one argument declaration (ltk/margin_ce_args.h): the
// schema, the parameter list of the entry points (ops.cpp's CPU one, cuda/margin_ce_cuda.cu, autograd),
// MarginCeInputs (the arguments held by name) and the argument indices.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "ltk/margin_ce_args.h"

namespace ltk {

// Per kind: the C++ parameter type, the stored type, the stored default, the schema type and default.
#define LTK_MCE_PARAM_TYPE_TENSOR const at::Tensor&
#define LTK_MCE_PARAM_TYPE_VEC const std::optional<at::Tensor>&
#define LTK_MCE_PARAM_TYPE_OPT const std::optional<at::Tensor>&
#define LTK_MCE_PARAM_TYPE_FLOAT double
#define LTK_MCE_PARAM_TYPE_INT int64_t
#define LTK_MCE_PARAM_TYPE_BOOL bool
#define LTK_MCE_PARAM_TYPE_GEN const std::optional<at::Generator>&
#define LTK_MCE_STORED_TYPE_TENSOR at::Tensor
#define LTK_MCE_STORED_TYPE_VEC std::optional<at::Tensor>
#define LTK_MCE_STORED_TYPE_OPT std::optional<at::Tensor>
#define LTK_MCE_STORED_TYPE_FLOAT double
#define LTK_MCE_STORED_TYPE_INT int64_t
#define LTK_MCE_STORED_TYPE_BOOL bool
#define LTK_MCE_STORED_TYPE_GEN std::optional<at::Generator>
#define LTK_MCE_STORED_INIT_TENSOR(d)
#define LTK_MCE_STORED_INIT_VEC(d)
#define LTK_MCE_STORED_INIT_OPT(d)
#define LTK_MCE_STORED_INIT_FLOAT(d) = d
#define LTK_MCE_STORED_INIT_INT(d) = d
#define LTK_MCE_STORED_INIT_BOOL(d) = d
#define LTK_MCE_STORED_INIT_GEN(d)
#define LTK_MCE_SCHEMA_TYPE_TENSOR "Tensor "
#define LTK_MCE_SCHEMA_TYPE_VEC "Tensor? "
#define LTK_MCE_SCHEMA_TYPE_OPT "Tensor? "
#define LTK_MCE_SCHEMA_TYPE_FLOAT "float "
#define LTK_MCE_SCHEMA_TYPE_INT "int "
#define LTK_MCE_SCHEMA_TYPE_BOOL "bool "
#define LTK_MCE_SCHEMA_TYPE_GEN "Generator? "
#define LTK_MCE_SCHEMA_DEFAULT_TENSOR(d)
#define LTK_MCE_SCHEMA_DEFAULT_VEC(d) "=None"
#define LTK_MCE_SCHEMA_DEFAULT_OPT(d) "=None"
#define LTK_MCE_SCHEMA_DEFAULT_FLOAT(d) "=" #d
#define LTK_MCE_SCHEMA_DEFAULT_INT(d) "=" #d
#define LTK_MCE_SCHEMA_DEFAULT_BOOL(d) "=" LTK_MCE_SCHEMA_BOOL_##d
#define LTK_MCE_SCHEMA_DEFAULT_GEN(d) "=None"
#define LTK_MCE_SCHEMA_BOOL_false "False"
#define LTK_MCE_SCHEMA_BOOL_true "True"

#define LTK_MCE_PARAM(kind, name, extra) LTK_MCE_PARAM_TYPE_##kind name
#define LTK_MCE_MEMBER(kind, name, extra) LTK_MCE_STORED_TYPE_##kind name LTK_MCE_STORED_INIT_##kind(extra);
#define LTK_MCE_SCHEMA_ARG(kind, name, extra) LTK_MCE_SCHEMA_TYPE_##kind #name LTK_MCE_SCHEMA_DEFAULT_##kind(extra)
#define LTK_MCE_SCHEMA_SEP() ", "
#define LTK_MCE_FIELD_OF_IN(kind, name, extra) in.name

// "margin_ce(Tensor input, Tensor target, Tensor? col_scale=None, ...) -> (Tensor, Tensor, Tensor)"
#define LTK_MARGIN_CE_SCHEMA \
  "margin_ce(" LTK_MARGIN_CE_ARGS(LTK_MCE_SCHEMA_ARG, LTK_MCE_SCHEMA_SEP) ") -> (Tensor, Tensor, Tensor)"

// The parameter list of every margin_ce entry point: const at::Tensor& input, ..., bool compute_grad.
#define LTK_MARGIN_CE_PARAMS LTK_MARGIN_CE_ARGS(LTK_MCE_PARAM, LTK_MCE_COMMA)

// The arguments of a call held by name (defaults as in the schema).
struct MarginCeInputs {
  LTK_MARGIN_CE_ARGS(LTK_MCE_MEMBER, LTK_MCE_NOSEP)
};

// A MarginCeInputs from the parameters of an entry point.
#define LTK_MARGIN_CE_INPUTS (MarginCeInputs{LTK_MARGIN_CE_NAMES})
// The fields of a MarginCeInputs `in` as the arguments of a call.
#define LTK_MARGIN_CE_FIELDS_OF_IN LTK_MARGIN_CE_ARGS(LTK_MCE_FIELD_OF_IN, LTK_MCE_COMMA)

LTK_MARGIN_CE_ARG_INDEX_ENUM

using MarginCeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using MarginCeSignature = MarginCeResult(LTK_MARGIN_CE_PARAMS);

MarginCeResult margin_ce_cpu(LTK_MARGIN_CE_PARAMS);

// The argument checks of margin_ce_grad_scale_ (csrc/ops.cpp), shared by its CPU and CUDA kernels.
inline void check_grad_scale_args(const at::Tensor& grad, const at::Tensor& grad_output, bool per_row) {
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.is_contiguous(), "margin_ce_grad_scale_: grad must be a contiguous (N, C) tensor");
  TORCH_CHECK_VALUE(at::isFloatingType(grad.scalar_type()) && at::isFloatingType(grad_output.scalar_type()),
                    "margin_ce_grad_scale_: grad and grad_output must be floating-point, got ", grad.scalar_type(),
                    " and ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == grad.device(), "margin_ce_grad_scale_: grad_output is on ",
                    grad_output.device(), " but grad is on ", grad.device());
  if (per_row) {
    TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == grad.size(0),
                      "margin_ce_grad_scale_: per-row grad_output must have shape (N,) = (", grad.size(0), ",), got ",
                      grad_output.sizes());
  } else {
    TORCH_CHECK_VALUE(grad_output.numel() == 1, "margin_ce_grad_scale_: grad_output must be a scalar, got shape ",
                      grad_output.sizes());
  }
}

}  // namespace ltk
