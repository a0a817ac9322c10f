"""Functional API over the fused ops (``torch.ops.ltkernels.*``).

``margin_cross_entropy`` is the one fused row kernel behind every loss of this package: per row i
with target y,

    z_ij = S_i * (r_j * c_ij + b_j + t_i * beta_j - noise_mul * |clamp(eps_ij, -1, 1)| * delta_j
                  - m_y * [j == y])

followed by softmax cross-entropy with the reductions of docs/methods.md §1.2. Every loss module in
``ltkernels.losses`` only chooses these vectors (see ``ltkernels.priors``).
"""
from __future__ import annotations

import weakref

from typing import Optional

import torch
from torch import Tensor

from . import _ops

__all__ = ["margin_cross_entropy", "cross_entropy", "draw_seed"]


_MARGIN_CE = _ops.ops.margin_ce.default
_CROSS_ENTROPY = _ops.ops.cross_entropy.default


_INDEX_DTYPES = frozenset(d for d in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
                                      getattr(torch, "uint16", None), getattr(torch, "uint32", None),
                                      getattr(torch, "uint64", None)) if d is not None)


# torch.nn.functional.cross_entropy reports some of the bad arguments checked here as RuntimeError,
# NotImplementedError or IndexError, where this package raises ValueError / TypeError. These classes are
# both, so that code written against either catches them.
class _ValueRuntimeError(ValueError, RuntimeError):
    pass


class _TypeNotImplementedError(TypeError, NotImplementedError):
    pass


class _ValueIndexError(ValueError, IndexError):
    pass


def draw_seed(generator: Optional[torch.Generator] = None) -> Tensor:
    """A one-element int64 CPU tensor for the in-kernel Philox noise, drawn from ``generator``
    (default: torch's global CPU generator, so ``torch.manual_seed`` reproduces a run). Under
    ``torch.distributed`` the rank is mixed in so that ranks draw independent noise."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, generator=generator)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        seed = seed + torch.distributed.get_rank() * 0x9E3779B97F4A7C15 % 2**61
    return seed


# Per-class vectors converted for the kernel (device and accumulation dtype), kept while the source tensor lives
# and is unmodified (its _version): a module's float64 CPU buffers cost one conversion, not one per call (on
# CUDA each conversion is a copy kernel, and under graph capture it would be a host copy on every replay).
_CONVERTED: dict[tuple, tuple] = {}
_CONSTANT: dict[tuple, Tensor] = {}


def _acc_dtype(ref: Tensor) -> torch.dtype:
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def converted_vector(v: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``v.to(device, dtype)``, cached per (tensor, version, device, dtype) for tensors that need no gradient."""
    if v.device == device and v.dtype == dtype:
        return v
    if v.requires_grad or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(v):
        return v.to(device=device, dtype=dtype)
    key = (id(v), device, dtype)
    hit = _CONVERTED.get(key)
    if hit is not None and hit[0]() is v and hit[1] == v._version:
        return hit[2]
    out = v.detach().to(device=device, dtype=dtype)
    _CONVERTED[key] = (weakref.ref(v, lambda _, k=key: _CONVERTED.pop(k, None)), v._version, out)
    return out


def _class_vector(v, name: str, n: int, ref: Tensor) -> Optional[Tensor]:
    if v is None:
        return None
    if isinstance(v, (int, float)):  # a scalar applies to every class (one tensor per value, shape and device)
        key = (float(v), n, ref.device, _acc_dtype(ref))
        out = _CONSTANT.get(key)
        if out is None:
            if len(_CONSTANT) > 256:
                _CONSTANT.clear()
            out = _CONSTANT[key] = torch.full((n,), float(v), dtype=key[3], device=ref.device)
        return out
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v, dtype=torch.float64)
    if v.dim() != 1 or v.shape[0] != n:
        raise _ValueRuntimeError(f"{name} must be a 1-D tensor of length {n}, got shape {tuple(v.shape)}")
    if v.device != ref.device:
        raise ValueError(f"{name} is on {v.device} but the input is on {ref.device}")
    if not v.is_floating_point():
        v = v.to(torch.float32)
    # the kernel reads acc-typed vectors: convert here, once per source tensor (the op would on every call)
    return converted_vector(v, ref.device, _acc_dtype(ref))


def _checked_target(input: Tensor, target: Tensor, reduction: str, label_smoothing: float) -> Tensor:
    """The checks shared by both functionals (each with a clear exception); returns the target as int64."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError("input and target must be tensors")
    if input.dim() != 2:
        hint = ""
        if input.dim() == 1:
            hint = "; unbatched input is not supported: pass input.unsqueeze(0) and target.unsqueeze(0)"
        elif input.dim() > 2:
            hint = ("; K-dimensional input (N, C, d1, ...) is not supported: pass "
                    "input.movedim(1, -1).reshape(-1, C) and target.reshape(-1)")
        raise ValueError(f"input must be 2-D (N, C), got shape {tuple(input.shape)}{hint}")
    if not input.is_floating_point():
        raise _TypeNotImplementedError(f"input must be a floating-point tensor, got {input.dtype}")
    if target.dtype not in _INDEX_DTYPES:
        hint = (": class-probability targets are not supported (torch.nn.functional.cross_entropy takes them)"
                if target.is_floating_point() else "")
        raise _TypeNotImplementedError(f"target must hold integer class indices, got dtype {target.dtype}{hint}")
    n, c = input.shape
    if target.dim() != 1:
        raise _ValueRuntimeError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if target.shape[0] != n:
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    # (is_cpu first: comparing devices builds two torch.device objects, ~0.5 us of a 128 x 100 call)
    if not (target.is_cpu and input.is_cpu) and target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if reduction not in _ops.REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(_ops.REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise _ValueRuntimeError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if c == 0 and n > 0:
        raise _ValueIndexError("input has 0 classes (C = 0)")
    return target if target.dtype == torch.int64 else target.to(torch.int64)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Fused softmax cross-entropy of (N, C) logits: ``torch.nn.functional.cross_entropy``'s arguments and
    semantics (class ``weight``, ``ignore_index``, ``label_smoothing``; ``reduction`` also accepts
    ``'batch_mean'``), the gradient produced in the forward kernel.

    The same kernel as :func:`margin_cross_entropy` without per-class transforms, through the 7-argument op
    ``torch.ops.ltkernels.cross_entropy``: at small shapes a call's cost is mostly its arguments' conversion.
    """
    target = _checked_target(input, target, reduction, label_smoothing)
    if weight is not None:
        weight = _class_vector(weight, "weight", input.shape[1], input)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    return _ops.callable_of(_CROSS_ENTROPY)(input, target, weight, _ops.REDUCTIONS[reduction], int(ignore_index),
                                            float(label_smoothing), compute_grad)


def margin_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    scale: float = 1.0,
    col_scale: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    margin: Optional[Tensor] = None,
    target_scale: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    focal_gamma: Optional[float] = None,
    focal_detach: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    row_shift: Optional[Tensor] = None,
    shift_coef: Optional[Tensor] = None,
    cloud: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    noise_mul: float = 1.0,
    seed: Optional[Tensor] = None,
    offset: int = 0,
    generator: Optional[torch.Generator] = None,
    angular: str = "linear",
    angular_eps: float = 0.0,
) -> Tensor:
    """Fused per-class-transformed softmax cross-entropy (forward and backward in one kernel).

    Args:
        input: (N, C) logits or cosines, float32/float64/float16/bfloat16 (half types accumulate in fp32).
        target: (N,) integer class indices; ``ignore_index`` rows contribute nothing.
        scale: global scale s (used when ``target_scale`` is None).
        col_scale, col_bias: per-class r_j and b_j (None: 1 and 0).
        margin: per-class m_j subtracted from the target logit of rows with target j.
        target_scale: per-class s_j; row i is scaled by s_{y_i} (KPS gradient-adjustment stage).
        weight: per-class weights w_j (PyTorch semantics for ``reduction='mean'``).
        reduction: ``'none'`` | ``'sum'`` | ``'mean'`` (PyTorch's, weighted mean when ``weight`` is
            given) | ``'batch_mean'`` (sum of weighted losses / N, as the class-balanced official code).
        focal_gamma: if not None, the focal loss (1 - p)^gamma * w_y * CE with p = exp(-w_y * CE);
            its 'mean' is sum / N (official code). ``focal_detach`` treats p as a constant (GCL, KPS);
            False differentiates through it (LDAM-DRW's FocalLoss).
        ignore_index, label_smoothing: as ``torch.nn.functional.cross_entropy``.
        row_shift, shift_coef: t_i (N,) and beta_j (C,) adding t_i * beta_j to row i (FBL's stimulus);
            the gradient flows into ``row_shift``.
        cloud: per-class cloud size delta_j; enables the Gaussian cloud (GCL). ``noise`` injects the raw
            N(0, 1/3) draw (before clamp and abs) instead of the in-kernel Philox generator, keyed by
            ``seed`` and ``offset``. Without ``seed``: on the CPU the seed is drawn from ``generator`` (a CPU
            generator; default torch's global one), on CUDA the kernel takes the Philox state of ``generator``
            (a CUDA generator; default the device's), advancing it as dropout does, so that
            ``torch.manual_seed`` reproduces a run and every replay of a captured CUDA graph draws fresh noise.
        angular: ``'linear'`` or an angular-margin mode (``'arcface'``, ``'arcface_easy'``,
            ``'gclang'``, ``'gclang_easy'``); ``angular_eps`` is GCLAng's epsilon.

    Returns:
        The reduced loss (a scalar, or (N,) for ``reduction='none'``) in the input's dtype.
    """
    target = _checked_target(input, target, reduction, label_smoothing)
    if angular not in _ops.ANGULAR:
        raise ValueError(f"angular must be one of {sorted(_ops.ANGULAR)}, got {angular!r}")
    if focal_gamma is not None and label_smoothing != 0.0:
        raise ValueError("focal loss and label smoothing cannot be combined")
    if focal_gamma is not None and focal_gamma < 0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    if (row_shift is None) != (shift_coef is None):
        raise ValueError("row_shift and shift_coef must be given together")
    n, c = input.shape
    if noise is not None and tuple(noise.shape) != (n, c):
        raise ValueError(f"noise must have the input's shape {(n, c)}, got {tuple(noise.shape)}")
    cuda_generator = None  # None also when passed: the op then takes the input device's default CUDA generator
    if cloud is not None and noise is None and seed is None:
        if input.is_cuda and (generator is None or generator.device.type == "cuda"):
            # the kernel takes the CUDA generator's Philox state (graph-safe: fresh noise per replay);
            # ranks draw from distinct streams, as draw_seed mixes the rank into a CPU-drawn seed
            cuda_generator = generator
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                offset = int(offset) + (torch.distributed.get_rank() << 40)
        else:
            seed = draw_seed(generator)

    red = _ops.REDUCTIONS[reduction]
    focal = _ops.FOCAL_OFF
    gamma = 0.0
    if focal_gamma is not None:
        focal = _ops.FOCAL_DETACHED if focal_detach else _ops.FOCAL_FULL
        gamma = float(focal_gamma)
        if red == _ops.REDUCTIONS["mean"]:
            red = _ops.REDUCTIONS["batch_mean"]  # the official focal loss averages over the batch
    if (col_scale is not None or col_bias is not None or margin is not None or target_scale is not None
            or weight is not None or row_shift is not None or shift_coef is not None
            or cloud is not None):  # (plain CE skips the conversion loop)
        col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud = [
            v if v is None else _class_vector(v, name, n if _ops.MARGIN_CE_VECTORS[name] == "N" else c, input)
            for v, name in zip((col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud),
                               _ops.MARGIN_CE_VECTORS)]
    compute_grad = torch.is_grad_enabled() and (
        input.requires_grad or (row_shift is not None and row_shift.requires_grad))
    # Positional, in the order of the op's schema (csrc/include/ltk/margin_ce_args.h): a call with 24 keywords
    # costs ~1 us more, against ~30 us for a whole 128 x 100 training step. test_margin_ce's
    # test_functional_packs_every_argument_in_schema_order holds this list to the schema.
    loss, _, _ = _ops.callable_of(_MARGIN_CE)(
        input, target, col_scale, col_bias, margin, target_scale, weight, row_shift, shift_coef, cloud, noise, seed,
        float(scale), float(noise_mul), float(angular_eps), int(offset), _ops.ANGULAR[angular], red, focal, gamma,
        int(ignore_index), float(label_smoothing), bool(compute_grad), cuda_generator)
    return loss
