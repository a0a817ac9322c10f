"""Python side of the compiled ops: loads ``ltkernels._C`` and registers fake kernels and autograd.

The op schemas live in ``csrc/ops.cpp``; this module adds what ``torch.compile`` and autograd need:
``register_fake`` (shapes/dtypes without computing). Autograd of margin_ce is registered in C++
(csrc/margin_ce_autograd.cpp); its backward is plain ATen ops, so ``torch.compile(fullgraph=True)``
traces through it.
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


# margin_ce's autograd is registered in C++ (csrc/margin_ce_autograd.cpp): through the Python
# torch.library autograd a training step paid ~0.3 ms of overhead, more than the kernel at small shapes.


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
