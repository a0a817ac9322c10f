"""Python side of the compiled ops: loads ``ltkernels._C`` and registers what the op schemas need besides kernels.

Every fake (meta) kernel and every Python autograd registration of the ``ltkernels::`` ops lives here, in one
place, and is registered when this module is imported, i.e. whenever the extension is loaded: every Python path
to an op (``functional``, ``losses``, ``cosine``, ``regularisers``) imports this module first.

| op family | schemas | fake kernel | autograd |
|---|---|---|---|
| ``margin_ce`` | csrc/ops.cpp | here | C++, csrc/margin_ce_autograd.cpp |
| ``margin_ce_grad_scale_`` | csrc/ops.cpp | here | none: margin_ce's backward, in place |
| ``cross_entropy`` | csrc/ops.cpp | none: CompositeImplicitAutograd over margin_ce (csrc/cross_entropy_op.cpp) | |
| ``cosine_*`` | csrc/ops.cpp | here | C++, csrc/cosine_head_common.cpp (cosine_logits) |
| ``uniformity`` | csrc/ops.cpp | here | here (its gradient comes out of the forward) |

The autograd of ``margin_ce`` and ``cosine_logits`` is C++ on purpose: through the Python ``torch.library``
path a training step paid ~0.3 ms (margin_ce) and ~0.1 ms (cosine_logits) of overhead, more than the kernels
at small shapes. Their backwards are ATen / dispatcher calls, so ``torch.compile(fullgraph=True)`` traces
through them. ``uniformity`` runs once per step on the (C, D) class weights, so the Python registration's
overhead is small next to the op. CONTRIBUTING.md ("Adding or changing a kernel") says what a new op needs here.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the shared library, which registers torch.ops.ltkernels.*)

ops = torch.ops.ltkernels

# The mode codes of csrc/include/ltk/margin_ce.h, as the extension exports them.
REDUCTIONS = dict(_C.margin_ce_codes["reduction"])
FOCAL = dict(_C.margin_ce_codes["focal"])
ANGULAR = dict(_C.margin_ce_codes["angular"])
FOCAL_OFF, FOCAL_DETACHED, FOCAL_FULL = FOCAL["off"], FOCAL["detached"], FOCAL["full"]

# margin_ce's arguments (declared once, in csrc/include/ltk/margin_ce_args.h): the names in schema order, the
# defaults of those that have one, and the vector arguments with their length ("C" per class, "N" per row).
MARGIN_CE_SCHEMA = ops.margin_ce.default._schema
MARGIN_CE_ARGS = tuple(a.name for a in MARGIN_CE_SCHEMA.arguments)
MARGIN_CE_DEFAULTS = {a.name: a.default_value for a in MARGIN_CE_SCHEMA.arguments if a.has_default_value()}
MARGIN_CE_VECTORS = dict(_C.margin_ce_vectors)


def margin_ce_arguments(args=(), kwargs=None) -> dict:
    """The arguments of a margin_ce call by name: positional ``args`` in schema order, then ``kwargs``,
    then the schema's defaults."""
    a = dict(zip(MARGIN_CE_ARGS, args))
    a.update(kwargs or {})
    missing = [n for n in MARGIN_CE_ARGS if n not in a and n not in MARGIN_CE_DEFAULTS]
    if missing or len(args) > len(MARGIN_CE_ARGS) or set(a) - set(MARGIN_CE_ARGS):
        raise TypeError(f"margin_ce{MARGIN_CE_SCHEMA}: bad arguments {list(a)}")
    return {n: a[n] if n in a else MARGIN_CE_DEFAULTS[n] for n in MARGIN_CE_ARGS}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# margin_ce (autograd: csrc/margin_ce_autograd.cpp)
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("ltkernels::margin_ce")
def _margin_ce_fake(*args, **kwargs):
    a = margin_ce_arguments(args, kwargs)
    input = a["input"]
    torch._check(input.dim() == 2, lambda: f"margin_ce: input must be 2-D (N, C), got {tuple(input.shape)}")
    n, c = input.shape
    torch._check(a["angular"] == ANGULAR["linear"] or all(a[k] is None for k in ("col_scale", "col_bias", "row_shift")),
                 lambda: "margin_ce: col_scale, col_bias and row_shift / shift_coef apply to the linear transform only, "
                         f"not to angular={a['angular']}")
    loss = input.new_empty((n,)) if a["reduction"] == REDUCTIONS["none"] else input.new_empty(())
    acc = _acc_dtype(input.dtype)
    grad = input.new_empty((n, c)) if a["compute_grad"] else input.new_empty((0,))
    gshift = input.new_empty((n,), dtype=acc) if (a["compute_grad"] and a["row_shift"] is not None) else \
        input.new_empty((0,), dtype=acc)
    return loss, grad, gshift


@torch.library.register_fake("ltkernels::margin_ce_grad_scale_")
def _margin_ce_grad_scale_fake(grad, grad_output, per_row):
    # the checks of csrc/margin_ce_op.h's check_grad_scale_args, so that tracing fails where eager would
    torch._check(grad.dim() == 2 and grad.is_contiguous(),
                 lambda: f"margin_ce_grad_scale_: grad must be a contiguous (N, C) tensor, got {tuple(grad.shape)}")
    torch._check(grad.dtype.is_floating_point and grad_output.dtype.is_floating_point,
                 lambda: "margin_ce_grad_scale_: grad and grad_output must be floating-point")
    if per_row:
        torch._check(grad_output.dim() == 1 and grad_output.shape[0] == grad.shape[0],
                     lambda: f"margin_ce_grad_scale_: per-row grad_output must have shape ({grad.shape[0]},), got "
                             f"{tuple(grad_output.shape)}")
    else:
        torch._check(grad_output.numel() == 1,
                     lambda: f"margin_ce_grad_scale_: grad_output must be a scalar, got {tuple(grad_output.shape)}")
    return None


# ---------------------------------------------------------------------------------------------------------------
# cosine head (autograd of cosine_logits: csrc/cosine_head_common.cpp; its backward calls
# ltkernels::cosine_logits_backward through the dispatcher, so tracing sees both ops)
# ---------------------------------------------------------------------------------------------------------------
def _empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped like ``t`` in the layout the C++ op gives t's gradient: contiguous, or the
    transpose of a contiguous matrix when ``t`` is one (cosine_head_common.cpp: ``canonical``)."""
    if t.is_contiguous():
        return t.new_empty(t.shape)
    if t.t().is_contiguous():
        return t.new_empty((t.shape[1], t.shape[0])).t()
    return t.new_empty(t.shape)


def _cosine_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the norms and dot products the cosine ops return for data of ``dtype``: float32 for the
    16-bit types (their math runs in fp32; csrc/include/ltk/cosine_head.h ``cosine_acc_t``), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("ltkernels::cosine_logits")
def _cosine_logits_fake(features, weight, eps=1e-12):
    torch._check(features.dim() == 2, lambda: f"cosine_logits: features must be 2-D, got {tuple(features.shape)}")
    torch._check(weight.dim() == 2, lambda: f"cosine_logits: weight must be 2-D, got {tuple(weight.shape)}")
    torch._check(features.shape[1] == weight.shape[0], lambda: "cosine_logits: features and weight disagree on D")
    n, c = features.shape[0], weight.shape[1]
    acc = _cosine_acc_dtype(features.dtype)
    return features.new_empty((n, c)), features.new_empty((n,), dtype=acc), features.new_empty((c,), dtype=acc)


@torch.library.register_fake("ltkernels::cosine_logits_backward")
def _cosine_logits_backward_fake(grad, features, weight, feature_norm, weight_norm, eps, need_features,
                                 need_weight, path=0, logits=None):
    gx = _empty_like_layout(features) if need_features else features.new_empty((0,))
    gw = _empty_like_layout(weight) if need_weight else features.new_empty((0,))
    return gx, gw


@torch.library.register_fake("ltkernels::cosine_norms")
def _cosine_norms_fake(input, dim):
    torch._check(input.dim() == 2, lambda: f"cosine_norms: input must be 2-D, got {tuple(input.shape)}")
    return input.new_empty((input.shape[0] if dim in (1, -1) else input.shape[1],),
                           dtype=_cosine_acc_dtype(input.dtype))


@torch.library.register_fake("ltkernels::cosine_scale_")
def _cosine_scale_fake(self, row_norm, col_norm, eps=1e-12):
    return None


@torch.library.register_fake("ltkernels::cosine_grad_prep_")
def _cosine_grad_prep_fake(grad, logits, row_norm, col_norm, eps=1e-12):
    acc = _cosine_acc_dtype(grad.dtype)
    return grad.new_empty((grad.shape[0],), dtype=acc), grad.new_empty((grad.shape[1],), dtype=acc)


@torch.library.register_fake("ltkernels::cosine_tangent_")
def _cosine_tangent_fake(grad, vectors, norm, eps, dim, prescaled, scale=None, dots=None):
    return None


# ---------------------------------------------------------------------------------------------------------------
# uniformity: the forward returns (value, gradient); the backward scales the saved gradient
# ---------------------------------------------------------------------------------------------------------------
@torch.library.register_fake("ltkernels::uniformity")
def _uniformity_fake(weight, kernel, param, eps=1e-12, dist_eps=1e-12, block=0, compute_grad=False):
    torch._check(weight.dim() == 2, lambda: f"uniformity: weight must be 2-D (C, D), got {tuple(weight.shape)}")
    grad = weight.new_empty(weight.shape) if compute_grad else weight.new_empty((0,))
    return weight.new_empty(()), grad


def _uniformity_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _uniformity_backward(ctx, grad_value, _grad_grad):
    (grad,) = ctx.saved_tensors
    if grad.dim() != 2:
        raise RuntimeError("uniformity: backward needs compute_grad=True in the forward call (use "
                           "ltkernels.regularisers.uniformity, which sets it when weight requires grad)")
    return grad * grad_value.to(grad.dtype), None, None, None, None, None, None


torch.library.register_autograd("ltkernels::uniformity", _uniformity_backward, setup_context=_uniformity_setup)


# ---------------------------------------------------------------------------------------------------------------
def callable_of(op: "torch._ops.OpOverload"):
    """What to call for ``op`` from Python: OpOverload.__call__ only forwards to its C++ callable ``_op``
    (unless a Python-object dispatcher was enabled on it), and its Python frame costs ~5 us a call, as much
    as the whole of F.cross_entropy's forward at 128 x 100. torch.compile traces the OpOverload itself."""
    if torch.compiler.is_compiling() or getattr(op, "_pyobj_dispatcher", None) is not None:
        return op
    return getattr(op, "_op", op)


def cpu_isa() -> str:
    """Instruction set of the CPU kernels in use: ``"avx512"``, ``"avx2"`` or ``"default"``."""
    return ops.cpu_isa()
