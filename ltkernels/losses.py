"""Fused loss modules: drop-in replacements for the official research code's losses.

Each class has the official constructor signature and the semantics documented on its eager twin in
:mod:`ltkernels.reference` (which it subclasses for the per-class vectors), but runs the fused
kernel ``torch.ops.ltkernels.margin_ce``: one pass per row for the loss, with the gradient produced
in the same pass. GCL's Gaussian cloud is drawn inside the kernel (counter-based Philox keyed by a
seed from torch's generator; ``noise=`` injects the official draw instead), GCLAng/ArcFace apply
their angular margins in-kernel, and FBL's feature-norm stimulus enters as a per-row shift whose
gradient flows back into the features.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference as _ref
from .functional import converted_vector, cross_entropy, margin_cross_entropy

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


def _fused_mce(input: Tensor, target: Tensor, **kw) -> Tensor:
    for k, v in kw.items():
        kw[k] = _on_device_of(v, input)
    return margin_cross_entropy(input, target, **kw)


class _Fused:
    _ce_kernel = staticmethod(_fused_mce)


def _fused_ce(input: Tensor, target: Tensor, *, weight=None, reduction: str = "mean", ignore_index: int = -100,
              label_smoothing: float = 0.0) -> Tensor:
    # plain CE takes the slim 7-argument op (functional.cross_entropy): at 128 x 100 margin_ce's 23-argument
    # call alone costs more than F.cross_entropy's lead
    return cross_entropy(input, target, _on_device_of(weight, input), ignore_index, reduction, label_smoothing)


class CrossEntropyLoss(_Fused, _ref.CrossEntropyLoss):
    __doc__ = _ref.CrossEntropyLoss.__doc__
    _ce_kernel = staticmethod(_fused_ce)


class LDAMLoss(_Fused, _ref.LDAMLoss):
    __doc__ = _ref.LDAMLoss.__doc__


class KPSLoss(_Fused, _ref.KPSLoss):
    __doc__ = _ref.KPSLoss.__doc__


class LogitAdjustLoss(_Fused, _ref.LogitAdjustLoss):
    __doc__ = _ref.LogitAdjustLoss.__doc__


class BalancedSoftmaxLoss(_Fused, _ref.BalancedSoftmaxLoss):
    __doc__ = _ref.BalancedSoftmaxLoss.__doc__


class CosFaceLoss(_Fused, _ref.CosFaceLoss):
    __doc__ = _ref.CosFaceLoss.__doc__


class FocalLoss(_Fused, _ref.FocalLoss):
    __doc__ = _ref.FocalLoss.__doc__


class ClassBalancedLoss(_Fused, _ref.ClassBalancedLoss):
    __doc__ = _ref.ClassBalancedLoss.__doc__


class GCLLoss(_Fused, _ref.GCLLoss):
    __doc__ = _ref.GCLLoss.__doc__ + """
    Fused: the cloud noise is generated inside the kernel from a Philox stream keyed by a seed drawn
    from ``generator`` (default: torch's global generator, so ``torch.manual_seed`` reproduces a run),
    regenerated on every call; pass ``noise=`` to inject the official draw instead.
    """

    def __init__(self, *args, generator: Optional[torch.Generator] = None, **kw):
        super().__init__(*args, **kw)
        self.generator = generator

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None,
                seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        return self._mce(cosine, target, scale=self.s, margin=self.m, weight=self.weight, cloud=self.m_list,
                         noise=noise, noise_mul=self.noise_mul, seed=seed, offset=offset,
                         generator=self.generator,
                         focal_gamma=self.gamma if self.train_cls else None, focal_detach=True)


class GCLAngLoss(_Fused, _ref.GCLAngLoss):
    __doc__ = _ref.GCLAngLoss.__doc__ + """
    Fused: the angle perturbation and the margin are applied inside the kernel; noise as in GCLLoss.
    """

    def __init__(self, *args, generator: Optional[torch.Generator] = None, **kw):
        super().__init__(*args, **kw)
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        self.generator = generator

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None,
                seed: Optional[Tensor] = None, offset: int = 0) -> Tensor:
        return self._mce(cosine, target, scale=self.s, margin=self.m, weight=self.weight, cloud=self.m_list,
                         noise=noise, seed=seed, offset=offset, generator=self.generator,
                         angular="gclang_easy" if self.easy_margin else "gclang", angular_eps=self.epsilon,
                         focal_gamma=self.gamma if self.train_cls else None, focal_detach=True)


class ArcFaceLoss(_Fused, _ref.ArcFaceLoss):
    __doc__ = _ref.ArcFaceLoss.__doc__

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        return self._mce(cosine, target, scale=self.s, margin=self.m,
                         angular="arcface_easy" if self.easy_margin else "arcface")


class FeaBalLoss(_Fused, _ref.FeaBalLoss):
    __doc__ = _ref.FeaBalLoss.__doc__ + """
    Fused: the stimulus enters the kernel as a per-row shift t_i = -curr A / (||f_i|| + 1e-12) times the
    per-class lambda_j; the kernel returns d loss / d t_i and autograd carries it into the features.
    """

    def forward(self, input, features, target=None, curr=0.0) -> Tensor:
        logits, feat, labels, curr = self._call_form(input, features, target, curr)
        norm = torch.linalg.vector_norm(feat, dim=1)
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        shift = (-float(self.lambda_) * curr) / (norm.to(acc) + 1e-12)
        return self._mce(logits, labels, weight=self.weight, row_shift=shift, shift_coef=self.lam_list)
