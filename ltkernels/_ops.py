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


@torch.library.register_fake("ltkernels::margin_ce")
def _margin_ce_fake(*args, **kwargs):
    a = margin_ce_arguments(args, kwargs)
    input = a["input"]
    torch._check(input.dim() == 2, lambda: f"margin_ce: input must be 2-D (N, C), got {tuple(input.shape)}")
    n, c = input.shape
    loss = input.new_empty((n,)) if a["reduction"] == REDUCTIONS["none"] else input.new_empty(())
    acc = _acc_dtype(input.dtype)
    grad = input.new_empty((n, c)) if a["compute_grad"] else input.new_empty((0,))
    gshift = input.new_empty((n,), dtype=acc) if (a["compute_grad"] and a["row_shift"] is not None) else \
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
