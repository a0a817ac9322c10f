"""Python side of the compiled ops: loads ``ltkernels._C`` and registers fake kernels and autograd.

The op schemas live in ``csrc/ops.cpp``; this module adds what ``torch.compile`` and autograd need:
``register_fake`` (shapes/dtypes without computing) and ``register_autograd`` (backward in terms of
other ops, so it traces with ``fullgraph=True``).
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the shared library, which registers torch.ops.ltkernels.*)

ops = torch.ops.ltkernels

# Codes shared with csrc/include/ltk/margin_ce.h
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2, "batch_mean": 3}
FOCAL_OFF, FOCAL_DETACHED, FOCAL_FULL = 0, 1, 2
ANGULAR = {"linear": 0, "arcface": 1, "arcface_easy": 2, "gclang": 3, "gclang_easy": 4}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("ltkernels::margin_ce")
def _margin_ce_fake(input, target, col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef,
                    cloud, noise, seed, scale, noise_mul, angular_eps, offset, angular, reduction, focal, gamma,
                    ignore_index, label_smoothing, compute_grad):
    torch._check(input.dim() == 2, lambda: f"margin_ce: input must be 2-D (N, C), got {tuple(input.shape)}")
    n, c = input.shape
    loss = input.new_empty((n,)) if reduction == REDUCTIONS["none"] else input.new_empty(())
    acc = _acc_dtype(input.dtype)
    grad = input.new_empty((n, c)) if compute_grad else input.new_empty((0,))
    gshift = input.new_empty((n,), dtype=acc) if (compute_grad and row_shift is not None) else \
        input.new_empty((0,), dtype=acc)
    return loss, grad, gshift


def _margin_ce_setup(ctx, inputs, output):
    _, grad, gshift = output
    # The gradient buffers are outputs only to be saved; without these two calls autograd would build
    # N x C zeros for their (never used) incoming gradients on every backward.
    ctx.mark_non_differentiable(grad, gshift)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, gshift)
    ctx.reduction = inputs[17]
    ctx.has_shift = inputs[7] is not None


def _is_eager_cpu_one(t: torch.Tensor) -> bool:
    """True for a plain (not fake, not traced) CPU scalar tensor equal to 1: reading it costs nothing."""
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.numel() == 1
            and not torch.compiler.is_compiling() and bool(t.item() == 1.0))


def _margin_ce_backward(ctx, grad_loss, _grad_grad, _grad_gshift):
    grad, gshift = ctx.saved_tensors
    if grad_loss is None:  # only the (non-differentiable) gradient buffers were used downstream
        return (None,) * 23
    if grad.dim() != 2:
        raise RuntimeError("margin_ce: backward needs compute_grad=True in the forward call "
                           "(use ltkernels.functional, which sets it when an input requires grad)")
    if _is_eager_cpu_one(grad_loss):
        # loss.backward() on a CPU scalar: the forward's gradient already is the answer. Returning the
        # buffer itself (autograd releases the saved copy first) skips a full N x C multiply pass.
        g_in = grad
    else:
        go = grad_loss.unsqueeze(1) if ctx.reduction == REDUCTIONS["none"] else grad_loss
        g_in = grad * go.to(grad.dtype)
    g_shift = gshift * grad_loss.to(gshift.dtype) if ctx.has_shift else None
    return (g_in, None, None, None, None, None, None, g_shift) + (None,) * 15


torch.library.register_autograd("ltkernels::margin_ce", _margin_ce_backward, setup_context=_margin_ce_setup)


def cpu_isa() -> str:
    """Instruction set of the CPU kernels in use: ``"avx512"``, ``"avx2"`` or ``"default"``."""
    return ops.cpu_isa()
