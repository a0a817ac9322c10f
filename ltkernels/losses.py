"""Fused loss modules: drop-in replacements for the official research code's losses.

Each class has the official constructor signature and the semantics documented on its eager twin in
:mod:`ltkernels.reference`, but runs the fused kernel ``torch.ops.ltkernels.margin_ce``: one pass per row
for the loss, with the gradient produced in the same pass. The twins are separate classes: both build their
per-class vectors (buffers of the same names) from the constructor arguments with the same functions of
:mod:`ltkernels.priors` (``ldam_vectors``, ``kps_vectors``, ...), and a fused module's ``forward`` calls
:func:`ltkernels.functional.margin_cross_entropy` (plain CE: :func:`~ltkernels.functional.cross_entropy`)
with the arguments that :meth:`kernel_kwargs` spells out. GCL's Gaussian cloud is drawn inside the kernel
(counter-based Philox keyed by a seed from torch's generator; ``noise=`` injects the official draw instead),
GCLAng/ArcFace apply their angular margins in-kernel, and FBL's feature-norm stimulus enters as a per-row
shift whose gradient flows back into the features.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import reference as _ref
from .functional import converted_vector, cross_entropy, margin_cross_entropy
from .priors import (
    CountsLike,
    balanced_softmax_vectors,
    check_gamma,
    check_scale,
    class_balanced_vectors,
    fbl_vectors,
    gcl_vectors,
    kps_vectors,
    ldam_vectors,
    logit_adjust_vectors,
)
from .reference import CrossEntropyCall, fbl_call_form

__all__ = [
    "CrossEntropyLoss", "LDAMLoss", "KPSLoss", "LogitAdjustLoss", "BalancedSoftmaxLoss", "CosFaceLoss",
    "FocalLoss", "ClassBalancedLoss", "GCLLoss", "GCLAngLoss", "ArcFaceLoss", "FeaBalLoss",
]


def _on_device_of(v, input: Tensor):
    # Modules keep their per-class vectors as CPU float64 buffers until moved with .to(); users may also
    # pass a `weight` that lives elsewhere. The functional API is strict about devices, modules follow
    # the input like the official code does.
    # Converted to the kernel's accumulation dtype too, once per buffer version (functional.converted_vector):
    # not a copy per call.
    if isinstance(v, Tensor) and v.is_floating_point():
        return converted_vector(v, input.device, torch.float64 if input.dtype == torch.float64 else torch.float32)
    if isinstance(v, Tensor) and v.device != input.device:
        return converted_vector(v, input.device, v.dtype)
    return v


def _for_input(input: Tensor, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with every tensor on the input's device (floating ones in the kernel's accumulation dtype)."""
    for k, v in kw.items():
        if isinstance(v, Tensor):
            kw[k] = _on_device_of(v, input)
    return kw


class _FusedLoss(nn.Module):
    """Base of the fused modules: per-class vectors (from :mod:`ltkernels.priors`) as non-persistent buffers
    (``state_dict`` stays empty like the official modules'), and ``forward`` as one call of ``kernel`` with
    the arguments of :meth:`kernel_kwargs`."""

    # the function of ltkernels.functional that forward calls
    kernel = staticmethod(margin_cross_entropy)

    def _register_vectors(self, vectors: dict[str, Tensor]) -> None:
        for name, value in vectors.items():
            self.register_buffer(name, value, persistent=False)

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        """The keyword arguments of ``kernel`` (``ltkernels.functional.margin_cross_entropy``, or
        ``cross_entropy`` for :class:`CrossEntropyLoss`) that ``forward(input, target)`` passes: scale,
        per-class vectors (on ``input``'s device, in the kernel's accumulation dtype), reduction, focal and
        cloud arguments. A fresh dict per call, built from the module's current attributes; the module is
        not changed."""
        raise NotImplementedError

    def cross_entropy_call(self, input: Tensor, target: Tensor, **call_kwargs) -> CrossEntropyCall:
        """``forward``'s call spelled out (see :class:`ltkernels.reference.CrossEntropyCall`):
        ``(kernel, input, target, kernel_kwargs(input, **call_kwargs))``."""
        return CrossEntropyCall(self.kernel, input, target, self.kernel_kwargs(input, **call_kwargs))


class CrossEntropyLoss(_FusedLoss):
    __doc__ = _ref.CrossEntropyLoss.__doc__
    # plain CE takes the slim 7-argument op (functional.cross_entropy): at 128 x 100 margin_ce's 23-argument
    # call alone costs more than F.cross_entropy's lead
    kernel = staticmethod(cross_entropy)

    def __init__(self, weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return {"weight": _on_device_of(self.weight, input), "ignore_index": self.ignore_index,
                "reduction": self.reduction, "label_smoothing": self.label_smoothing}

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(input, target, **self.kernel_kwargs(input))


class LDAMLoss(_FusedLoss):
    __doc__ = _ref.LDAMLoss.__doc__

    def __init__(self, cls_num_list: CountsLike, max_m: float = 0.5, weight=None, s: float = 30):
        super().__init__()
        check_scale(s)
        self._register_vectors(ldam_vectors(cls_num_list, max_m))
        self.s = s
        self.weight = weight

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return _for_input(input, {"scale": self.s, "margin": self.m_list, "weight": self.weight})

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(x, target, **self.kernel_kwargs(x))


class KPSLoss(_FusedLoss):
    __doc__ = _ref.KPSLoss.__doc__

    def __init__(self, cls_num_list: CountsLike, max_m: float = 0.5, weighted: bool = False,
                 weight=None, s: float = 30, flip_compat: bool = False):
        super().__init__()
        check_scale(s)
        self._register_vectors(kps_vectors(cls_num_list, max_m, s, flip_compat=flip_compat))
        self.s = s
        self.weighted = weighted
        self.weight = weight
        self.flip_compat = flip_compat

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        if self.weighted is True:
            kw = {"col_scale": self.s_list, "margin": self.m_list, "target_scale": self.s_target,
                  "weight": self.weight}
        else:
            kw = {"scale": self.s, "col_scale": self.s_list, "margin": self.m_list, "weight": self.weight}
        return _for_input(input, kw)

    def forward(self, input: Tensor, label: Tensor) -> Tensor:
        return margin_cross_entropy(input, label, **self.kernel_kwargs(input))


class LogitAdjustLoss(_FusedLoss):
    __doc__ = _ref.LogitAdjustLoss.__doc__

    def __init__(self, cls_num_list: CountsLike, tau: float = 1.0, weight=None):
        super().__init__()
        self._register_vectors(logit_adjust_vectors(cls_num_list, tau))
        self.tau = tau
        self.weight = weight

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return _for_input(input, {"col_bias": self.logit_adjustments, "weight": self.weight})

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(input, target, **self.kernel_kwargs(input))


class BalancedSoftmaxLoss(_FusedLoss):
    __doc__ = _ref.BalancedSoftmaxLoss.__doc__

    def __init__(self, cls_num_list: CountsLike):
        super().__init__()
        self._register_vectors(balanced_softmax_vectors(cls_num_list))

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return _for_input(input, {"col_bias": self.log_counts})

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(input, target, **self.kernel_kwargs(input))


class CosFaceLoss(_FusedLoss):
    __doc__ = _ref.CosFaceLoss.__doc__

    def __init__(self, s: float = 64.0, m=0.4):
        super().__init__()
        self.s = s
        self.m = m

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return _for_input(input, {"scale": self.s, "margin": self.m})

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(cosine, target, **self.kernel_kwargs(cosine))


class FocalLoss(_FusedLoss):
    __doc__ = _ref.FocalLoss.__doc__

    def __init__(self, weight=None, gamma: float = 0.0, detach: bool = True):
        super().__init__()
        check_gamma(gamma)
        self.weight = weight
        self.gamma = gamma
        self.detach = detach

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        return _for_input(input, {"weight": self.weight, "focal_gamma": self.gamma, "focal_detach": self.detach})

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(input, target, **self.kernel_kwargs(input))


class ClassBalancedLoss(_FusedLoss):
    __doc__ = _ref.ClassBalancedLoss.__doc__

    def __init__(self, cls_num_list: CountsLike, beta: float = 0.9999, loss_type: str = "softmax",
                 gamma: float = 0.0):
        super().__init__()
        if loss_type not in ("softmax", "focal"):
            raise ValueError(f"loss_type must be 'softmax' or 'focal', got {loss_type!r}")
        check_gamma(gamma)
        self._register_vectors(class_balanced_vectors(cls_num_list, beta))
        self.beta = beta
        self.loss_type = loss_type
        self.gamma = gamma

    def kernel_kwargs(self, input: Tensor) -> dict[str, Any]:
        kw = {"weight": self.weights, "reduction": "batch_mean"}
        if self.loss_type == "focal":
            kw.update(focal_gamma=self.gamma, focal_detach=False)
        return _for_input(input, kw)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(input, target, **self.kernel_kwargs(input))


class GCLLoss(_FusedLoss):
    __doc__ = _ref.GCLLoss.__doc__ + """
    Fused: the cloud noise is generated inside the kernel from a Philox stream keyed by a seed drawn
    from ``generator`` (default: torch's global generator, so ``torch.manual_seed`` reproduces a run),
    regenerated on every call; pass ``noise=`` to inject the official draw instead.
    """

    def __init__(self, cls_num_list: CountsLike, m: float = 0.5, weight=None, s: float = 30,
                 train_cls: bool = False, noise_mul: float = 1.0, gamma: float = 0.0, *,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        check_scale(s)
        self._register_vectors(gcl_vectors(cls_num_list))  # m_list: normalised delta_hat
        self.m = m
        self.s = s
        self.weight = weight
        self.train_cls = train_cls
        self.noise_mul = noise_mul
        self.gamma = gamma
        self.generator = generator

    def kernel_kwargs(self, cosine: Tensor, noise: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                      offset: int = 0) -> dict[str, Any]:
        return _for_input(cosine, {
            "scale": self.s, "margin": self.m, "weight": self.weight, "cloud": self.m_list, "noise": noise,
            "noise_mul": self.noise_mul, "seed": seed, "offset": offset, "generator": self.generator,
            "focal_gamma": self.gamma if self.train_cls else None, "focal_detach": True})

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None,
                seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        return margin_cross_entropy(cosine, target, **self.kernel_kwargs(cosine, noise, seed, offset))


class GCLAngLoss(_FusedLoss):
    __doc__ = _ref.GCLAngLoss.__doc__ + """
    Fused: the angle perturbation and the margin are applied inside the kernel; noise as in GCLLoss.
    """

    def __init__(self, cls_num_list: CountsLike, m: float = 0.5, epsilon: float = 0.1,
                 weight=None, s: float = 30, easy_margin: bool = False, train_cls: bool = False,
                 gamma: float = 0.0, *, generator: Optional[torch.Generator] = None):
        super().__init__()
        check_scale(s)
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self._register_vectors(gcl_vectors(cls_num_list))
        self.m = m
        self.epsilon = epsilon
        self.s = s
        self.weight = weight
        self.easy_margin = easy_margin
        self.train_cls = train_cls
        self.gamma = gamma
        self.generator = generator

    def kernel_kwargs(self, cosine: Tensor, noise: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                      offset: int = 0) -> dict[str, Any]:
        return _for_input(cosine, {
            "scale": self.s, "margin": self.m, "weight": self.weight, "cloud": self.m_list, "noise": noise,
            "seed": seed, "offset": offset, "generator": self.generator,
            "angular": "gclang_easy" if self.easy_margin else "gclang", "angular_eps": self.epsilon,
            "focal_gamma": self.gamma if self.train_cls else None, "focal_detach": True})

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None,
                seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        return margin_cross_entropy(cosine, target, **self.kernel_kwargs(cosine, noise, seed, offset))


class ArcFaceLoss(_FusedLoss):
    __doc__ = _ref.ArcFaceLoss.__doc__

    def __init__(self, s: float = 64.0, m=0.5, easy_margin: bool = False):
        super().__init__()
        self.s = s
        self.m = m
        self.easy_margin = easy_margin

    def kernel_kwargs(self, cosine: Tensor) -> dict[str, Any]:
        return _for_input(cosine, {"scale": self.s, "margin": self.m,
                                   "angular": "arcface_easy" if self.easy_margin else "arcface"})

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        return margin_cross_entropy(cosine, target, **self.kernel_kwargs(cosine))


class FeaBalLoss(_FusedLoss):
    __doc__ = _ref.FeaBalLoss.__doc__ + """
    Fused: the stimulus enters the kernel as a per-row shift t_i = -curr A / (||f_i|| + 1e-12) times the
    per-class lambda_j; the kernel returns d loss / d t_i and autograd carries it into the features.
    """

    def __init__(self, cls_num_list: CountsLike, weight=None, lambda_: float = 60.0):
        super().__init__()
        self._register_vectors(fbl_vectors(cls_num_list))
        self.weight = weight
        self.lambda_ = lambda_

    _call_form = staticmethod(fbl_call_form)

    def kernel_kwargs(self, logits: Tensor, features: Tensor, curr=0.0) -> dict[str, Any]:
        """As for the other modules, for the explicit form's ``(logits, features, curr)``: the per-row shift
        ``row_shift`` (differentiable w.r.t. ``features``) with ``shift_coef = lambda``."""
        norm = torch.linalg.vector_norm(features, dim=1)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        shift = (-float(self.lambda_) * curr) / (norm.to(acc) + 1e-12)
        return _for_input(logits, {"weight": self.weight, "row_shift": shift, "shift_coef": self.lam_list})

    def cross_entropy_call(self, input, features, target=None, curr=0.0) -> CrossEntropyCall:
        logits, feat, labels, curr = fbl_call_form(input, features, target, curr)
        return CrossEntropyCall(margin_cross_entropy, logits, labels, self.kernel_kwargs(logits, feat, curr))

    def forward(self, input, features, target=None, curr=0.0) -> Tensor:
        logits, feat, labels, curr = fbl_call_form(input, features, target, curr)
        return margin_cross_entropy(logits, labels, **self.kernel_kwargs(logits, feat, curr))
