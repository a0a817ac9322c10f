"""Eager PyTorch reference losses: the test oracle for the fused kernels.

Plain differentiable torch ops (no custom autograd), usable in float64. Each module follows the
official research code of its method (docs/methods.md); where the paper and the official code
differ, the docstring says which one is implemented. Per-class vectors come from
:mod:`ltkernels.priors` (float64), are held as non-persistent buffers (so ``state_dict`` stays
empty like the official modules) and are cast to the input's dtype and device at call time; the
loss is computed in the input's dtype.

The single workhorse is :func:`margin_cross_entropy`; every module reduces to it (GCLAng, ArcFace
and FBL first build their logits, then call it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

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

__all__ = [
    "margin_cross_entropy",
    "CrossEntropyLoss",
    "LDAMLoss",
    "KPSLoss",
    "LogitAdjustLoss",
    "BalancedSoftmaxLoss",
    "CosFaceLoss",
    "FocalLoss",
    "ClassBalancedLoss",
    "GCLLoss",
    "GCLAngLoss",
    "ArcFaceLoss",
    "FeaBalLoss",
    "draw_gcl_noise",
    "CrossEntropyCall",
]

_REDUCTIONS = ("none", "sum", "mean", "batch_mean")

VecLike = Union[Tensor, float, int, None]


def _vec(v, C: int, like: Tensor, name: str) -> Optional[Tensor]:
    """Cast an optional per-class vector (or a scalar, broadcast to C) to like's dtype/device."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        t = v
    else:  # python / numpy scalars and sequences: straight to like's dtype (no float32 detour)
        t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.is_complex():
        raise ValueError(f"{name} must be real")
    t = t.to(device=like.device, dtype=like.dtype)
    if t.dim() == 0:
        return t.expand(C)
    if t.dim() != 1 or t.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    return t


def _check_target(input: Tensor, target: Tensor, ignore_index: int):
    if input.dim() != 2:
        raise ValueError(f"input must be 2-D (N, C), got shape {tuple(input.shape)}")
    if not input.is_floating_point():
        raise ValueError(f"input must be floating point, got {input.dtype}")
    if target.dim() != 1 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"target must be 1-D of length N={input.shape[0]}, got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices, got {target.dtype}")
    C = input.shape[1]
    target = target.to(device=input.device, dtype=torch.long)
    ignored = target == ignore_index
    bad = (~ignored) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target {int(target[i])} at row {i} is out of range for C={C} "
            f"(ignore_index={ignore_index})"
        )
    safe_t = torch.where(ignored, torch.zeros_like(target), target)
    return target, safe_t, ignored


def margin_cross_entropy(
    input: Tensor,
    target: Tensor,
    *,
    scale: float = 1.0,
    col_scale: VecLike = None,
    col_bias: VecLike = None,
    margin: VecLike = None,
    target_scale: VecLike = None,
    weight: VecLike = None,
    reduction: str = "mean",
    focal_gamma: Optional[float] = None,
    focal_detach: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy over transformed logits, with every reduction the methods use.

    Logits: ``z_ij = S_i * (r_j * c_ij + b_j - m_{y_i} [j = y_i])`` where ``c = input``,
    ``S_i = target_scale[y_i]`` if ``target_scale`` is given else ``scale``, and ``r``
    (``col_scale``), ``b`` (``col_bias``), ``m`` (``margin``) are optional ``(C,)`` vectors
    (absent: 1, 0, 0; a scalar is broadcast to all classes).

    Per-row loss ``l_i = logsumexp_j z_ij - z_{i,y_i}`` (log_softmax, max-shifted), class weight
    ``w`` (``weight``, absent = 1), ``ignore_index`` rows contribute 0.

    Plain reductions (PyTorch ``F.cross_entropy`` semantics, including ``label_smoothing`` eps,
    where the row loss is ``(1-eps) w_{y_i} l_i + eps/C * sum_j w_j (-log p_ij)``):

    * ``"none"``: per-row loss (weighted), 0 for ignored rows.
    * ``"sum"``: sum of rows.
    * ``"mean"``: sum / sum_i w_{y_i} over non-ignored rows if ``weight`` is given, else sum / number
      of non-ignored rows (NaN when that is 0, as PyTorch).
    * ``"batch_mean"``: sum / N with N the batch size including ignored rows (class-balanced loss,
      official TF code).

    Focal (``focal_gamma`` not None): ``lt_i = w_{y_i} l_i``, ``p_i = exp(-lt_i)``, row loss
    ``(1 - p_i)^gamma * lt_i`` with ``p`` detached if ``focal_detach`` (GCL / KPS repos'
    ``focal_loss``) or not (kaidic/LDAM-DRW ``FocalLoss``). Reductions: ``"none"`` per row,
    ``"sum"``, and ``"mean"`` / ``"batch_mean"`` both sum / N (official ``loss.mean()``).
    Focal with label smoothing raises ``ValueError``.

    Returns a tensor of the input's dtype (0-d, or (N,) for ``"none"``).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    label_smoothing = float(label_smoothing)
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if focal_gamma is not None:
        if label_smoothing != 0.0:
            raise ValueError("focal loss and label_smoothing cannot be combined")
        if not float(focal_gamma) >= 0.0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    target, safe_t, ignored = _check_target(input, target, ignore_index)
    N, C = input.shape

    r = _vec(col_scale, C, input, "col_scale")
    b = _vec(col_bias, C, input, "col_bias")
    m = _vec(margin, C, input, "margin")
    ts = _vec(target_scale, C, input, "target_scale")
    w = _vec(weight, C, input, "weight")

    z = input
    if r is not None:
        z = z * r
    if b is not None:
        z = z + b
    if m is not None:
        onehot = F.one_hot(safe_t, C).to(dtype=input.dtype) if N > 0 else input.new_zeros(0, C)
        z = z - onehot * m[safe_t].unsqueeze(1)
    if ts is not None:
        z = z * ts[safe_t].unsqueeze(1)
    else:
        z = z * float(scale)

    logp = F.log_softmax(z, dim=1)
    nll = -logp.gather(1, safe_t.unsqueeze(1)).squeeze(1)
    zero = input.new_zeros(())
    if w is not None:
        w_row = torch.where(ignored, zero, w[safe_t])
        row = torch.where(ignored, zero, w_row * nll)
    else:
        w_row = (~ignored).to(input.dtype)
        row = torch.where(ignored, zero, nll)

    if focal_gamma is not None:
        p = torch.exp(-row)
        if focal_detach:
            p = p.detach()
        q = 1.0 - p
        # (1 - p)^gamma l -> 0 with a zero derivative as l -> 0, but autograd through q ** gamma at
        # q = 0 (0 < gamma < 1) makes inf * 0 = NaN: take q = 1 in the unused branch of a double where.
        pos = q > 0
        mod = torch.where(pos, torch.where(pos, q, torch.ones_like(q)) ** float(focal_gamma),
                          torch.zeros_like(q) if float(focal_gamma) > 0 else torch.ones_like(q))
        row = mod * row
        if reduction == "none":
            return row
        total = row.sum()
        if reduction == "sum":
            return total
        return total / N  # "mean" and "batch_mean": official focal_loss(...).mean()

    if label_smoothing > 0.0:
        smooth = -(logp * w).sum(1) if w is not None else -logp.sum(1)
        smooth = torch.where(ignored, zero, smooth)
        row = (1.0 - label_smoothing) * row + (label_smoothing / C) * smooth
    if reduction == "none":
        return row
    total = row.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / w_row.sum()
    return total / N


def _safe_sqrt(u: Tensor) -> Tensor:
    """sqrt for u >= 0 with the official value everywhere and a finite derivative at u = 0.

    Value: exactly ``sqrt(u)``. Derivative: ``1 / (2 sqrt(u))`` for u > 0 and 0 at u = 0 (instead
    of inf, which turns into inf/NaN gradients at |cos| = 1). The double ``where`` keeps the unused
    branch away from sqrt(0). Kernels should use the same convention: ``d sin/d cos = -c / sin``
    where ``sin > 0`` and 0 where ``sin == 0``.
    """
    pos = u > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, u, torch.ones_like(u))), torch.zeros_like(u))


def _sine(cosine: Tensor) -> Tensor:
    """``sqrt(clamp(1 - c^2, 0, 1))`` as the official code, with the guarded derivative.

    Where ``|c| >= 1`` the value is 0 with derivative 0 (the clamp's), computed without squaring ``c``
    there: for an infinite cosine the official expression's backward would multiply the clamp's 0 by
    ``2c = inf`` and put a NaN into a column that the kernels (and a -inf logit in PyTorch's
    log_softmax) treat as masked, with gradient 0. A NaN cosine gives a NaN logit through ``c cos M``."""
    inside = cosine.abs() < 1.0
    c = torch.where(inside, cosine, torch.zeros_like(cosine))
    return torch.where(inside, _safe_sqrt((1.0 - c * c).clamp(0.0, 1.0)), torch.zeros_like(cosine))


def _clamp_cosine(cosine: Tensor) -> Tensor:
    """ArcFace's ``clamp(c, -1, 1)`` (no gradient at or beyond the bounds) that lets a NaN cosine carry its
    gradient: torch.clamp's backward would give the NaN column 0 while the rest of its row is NaN, and the
    package's rule is PyTorch's log_softmax one, a NaN logit makes its whole row NaN, loss and gradient."""
    return torch.where(torch.isnan(cosine), cosine, cosine.clamp(-1.0, 1.0))


def draw_gcl_noise(cosine: Tensor) -> Tensor:
    """Raw GCL noise as the official code draws it (before clamp and abs).

    Keke921/GCLLoss: ``normal.Normal(0, 1/3).sample(cosine.shape)`` on the default **CPU**
    generator in the default dtype, then ``.to(cosine.device)``. We do the same (so a seeded
    official run and this reference see the same draw) and cast to the cosine's dtype.
    """
    sampler = torch.distributions.Normal(
        torch.tensor(0.0, dtype=torch.get_default_dtype()),
        torch.tensor(1.0 / 3.0, dtype=torch.get_default_dtype()),
    )
    return sampler.sample(cosine.shape).to(device=cosine.device, dtype=cosine.dtype)


def _noise_like(cosine: Tensor, noise: Optional[Tensor]) -> Tensor:
    if noise is None:
        return draw_gcl_noise(cosine)
    noise = torch.as_tensor(noise).to(device=cosine.device, dtype=cosine.dtype)
    if noise.shape != cosine.shape:
        raise ValueError(
            f"noise must have the cosine's shape {tuple(cosine.shape)}, got {tuple(noise.shape)}"
        )
    return noise


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class CrossEntropyCall(NamedTuple):
    """One loss call spelled out: ``function(input, target, **kwargs)``.

    Every loss module of :mod:`ltkernels.reference` and :mod:`ltkernels.losses` builds its forward from one
    cross-entropy call and returns it from ``cross_entropy_call(...)`` (same arguments as ``forward``); its
    ``forward`` is ``cross_entropy_call(...).run()``. ``input`` is what the cross-entropy sees (the reference
    GCL, GCLAng, ArcFace and FBL first build their logits from the module's input; the fused modules pass it
    through), ``kwargs`` the module's arguments of ``function`` (``margin_cross_entropy`` of this module, or
    ``ltkernels.functional.margin_cross_entropy`` / ``cross_entropy``), ``reduction`` included.

    :func:`ltkernels.cosine_head_loss` reads the reduction and the class weights from it and runs it per
    chunk with ``run(reduction="sum")``: nothing on the module changes, so one module can serve several
    threads at once.
    """

    function: Callable[..., Tensor]
    input: Tensor
    target: Tensor
    kwargs: dict

    def run(self, **overrides) -> Tensor:
        """``function(input, target, **kwargs)``, with ``overrides`` replacing entries of ``kwargs``."""
        kw = {**self.kwargs, **overrides} if overrides else self.kwargs
        return self.function(self.input, self.target, **kw)


class _Loss(nn.Module):
    """Base of the reference modules: per-class vectors (from :mod:`ltkernels.priors`, the same functions
    the fused modules of :mod:`ltkernels.losses` use) held as non-persistent buffers, and ``forward`` as
    one :class:`CrossEntropyCall` of :func:`margin_cross_entropy` (``cross_entropy_call``)."""

    def _buf(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=False)

    def _bufs(self, vectors: Mapping[str, Tensor]) -> None:
        for name, value in vectors.items():
            self._buf(name, value)

    def _call(self, input: Tensor, target: Tensor, **kwargs) -> CrossEntropyCall:
        return CrossEntropyCall(margin_cross_entropy, input, target, kwargs)


class CrossEntropyLoss(_Loss):
    """Plain softmax cross-entropy with ``torch.nn.CrossEntropyLoss`` semantics."""

    def __init__(self, weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__()
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def cross_entropy_call(self, input: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(
            input, target, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
        )

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(input, target).run()


class LDAMLoss(_Loss):
    """LDAM loss (Cao et al., NeurIPS 2019; kaidic/LDAM-DRW ``losses.py``).

    ``z = s * (c - m_{y} Y)`` with ``m_j ∝ n_j^{-1/4}`` scaled to max ``max_m``
    (:func:`ltkernels.priors.ldam_margins`); torch weighted mean when ``weight`` (e.g. DRW
    weights) is given. Paper and code agree.
    """

    def __init__(self, cls_num_list: CountsLike, max_m: float = 0.5, weight=None, s: float = 30):
        super().__init__()
        check_scale(s)
        self._bufs(ldam_vectors(cls_num_list, max_m))
        self.s = s
        self.weight = weight

    def cross_entropy_call(self, x: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(x, target, scale=self.s, margin=self.m_list, weight=self.weight)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(x, target).run()


class KPSLoss(_Loss):
    """KPS loss with gradient adjustment (Li et al., TPAMI 2023; Keke921/KPSLoss ``losses.py``).

    ``z_ij = S_i (r_j c_ij - m_{y_i} Y_ij)`` with radius ``r`` (:func:`~ltkernels.priors.kps_radius`),
    margins ``m`` (:func:`~ltkernels.priors.kps_margins`); ``S_i = s`` when ``weighted`` is False
    and ``S_i = clamp(s m'_{y_i}, s, 50)`` (the GA stage; the official CIFAR script sets
    ``weighted = epoch >= 120``) when True. Torch weighted mean when ``weight`` is given.

    Paper vs code: the code builds ``m'`` by flipping the class index (``m'_j = r_{C-1-j}``), which
    matches the thesis ``m'_j = r_max + 1 - r_j`` only for classes sorted by descending
    log-linear counts. Default: thesis; ``flip_compat=True`` reproduces the code exactly.
    ``weighted`` may be toggled on the module between epochs.
    """

    def __init__(self, cls_num_list: CountsLike, max_m: float = 0.5, weighted: bool = False,
                 weight=None, s: float = 30, flip_compat: bool = False):
        super().__init__()
        check_scale(s)
        self._bufs(kps_vectors(cls_num_list, max_m, s, flip_compat=flip_compat))
        self.s = s
        self.weighted = weighted
        self.weight = weight
        self.flip_compat = flip_compat

    def cross_entropy_call(self, input: Tensor, label: Tensor) -> CrossEntropyCall:
        if self.weighted is True:
            return self._call(input, label, col_scale=self.s_list, margin=self.m_list,
                              target_scale=self.s_target, weight=self.weight)
        return self._call(input, label, scale=self.s, col_scale=self.s_list, margin=self.m_list,
                          weight=self.weight)

    def forward(self, input: Tensor, label: Tensor) -> Tensor:
        return self.cross_entropy_call(input, label).run()


class LogitAdjustLoss(_Loss):
    """Logit-adjusted loss (Menon et al., ICLR 2021): ``z_ij = l_ij + tau log(pi_j + 1e-12)``.

    The official code adds 1e-12 inside the log (:func:`~ltkernels.priors.log_prior`). Torch
    weighted mean when ``weight`` is given. (The post-hoc variant is an inference-time shift and
    not a loss.)
    """

    def __init__(self, cls_num_list: CountsLike, tau: float = 1.0, weight=None):
        super().__init__()
        self._bufs(logit_adjust_vectors(cls_num_list, tau))
        self.tau = tau
        self.weight = weight

    def cross_entropy_call(self, input: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(input, target, col_bias=self.logit_adjustments, weight=self.weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(input, target).run()


class BalancedSoftmaxLoss(_Loss):
    """Balanced softmax (Ren et al., NeurIPS 2020): ``z_ij = l_ij + log n_j``, mean CE."""

    def __init__(self, cls_num_list: CountsLike):
        super().__init__()
        self._bufs(balanced_softmax_vectors(cls_num_list))

    def cross_entropy_call(self, input: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(input, target, col_bias=self.log_counts)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(input, target).run()


class CosFaceLoss(_Loss):
    """CosFace / AM-softmax: ``z = s (c - m Y)`` (``m`` a scalar or a per-class ``(C,)`` tensor)."""

    def __init__(self, s: float = 64.0, m=0.4):
        super().__init__()
        self.s = s
        self.m = m

    def cross_entropy_call(self, cosine: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(cosine, target, scale=self.s, margin=self.m)

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(cosine, target).run()


class FocalLoss(_Loss):
    """Softmax focal loss on ``w``-weighted CE, mean over N (GCL / KPS / LDAM-DRW repos).

    ``lt = w_y l``, ``(1 - exp(-lt))^gamma lt`` averaged over the batch. ``detach=True`` (default)
    detaches the modulating probability as the GCL and KPS repos do; ``detach=False`` is
    kaidic/LDAM-DRW's ``FocalLoss`` (gradient also through the modulator).
    """

    def __init__(self, weight=None, gamma: float = 0.0, detach: bool = True):
        super().__init__()
        check_gamma(gamma)
        self.weight = weight
        self.gamma = gamma
        self.detach = detach

    def cross_entropy_call(self, input: Tensor, target: Tensor) -> CrossEntropyCall:
        return self._call(input, target, weight=self.weight, focal_gamma=self.gamma,
                          focal_detach=self.detach)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(input, target).run()


class ClassBalancedLoss(_Loss):
    """Class-balanced loss (Cui et al., CVPR 2019) with softmax CE or softmax focal.

    Weights ``w_j = (1-beta)/(1-beta^{n_j})`` normalised to sum to C
    (:func:`~ltkernels.priors.class_balanced_weights`), reduction ``sum_i w_{y_i} l_i / N``
    ("batch_mean", the official TF code's weighted sum over the batch size, not PyTorch's weighted
    mean). ``loss_type="focal"``: ``(1 - exp(-w_y l))^gamma w_y l`` summed over N (not detached,
    as LDAM-DRW's CB-Focal baseline ``FocalLoss(weight=CB, gamma)``); the official CB repo's
    focal is sigmoid-based, which is not implemented here.
    """

    def __init__(self, cls_num_list: CountsLike, beta: float = 0.9999, loss_type: str = "softmax",
                 gamma: float = 0.0):
        super().__init__()
        if loss_type not in ("softmax", "focal"):
            raise ValueError(f"loss_type must be 'softmax' or 'focal', got {loss_type!r}")
        check_gamma(gamma)
        self._bufs(class_balanced_vectors(cls_num_list, beta))
        self.beta = beta
        self.loss_type = loss_type
        self.gamma = gamma

    def cross_entropy_call(self, input: Tensor, target: Tensor) -> CrossEntropyCall:
        if self.loss_type == "focal":
            return self._call(input, target, weight=self.weights, reduction="batch_mean",
                              focal_gamma=self.gamma, focal_detach=False)
        return self._call(input, target, weight=self.weights, reduction="batch_mean")

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(input, target).run()


class GCLLoss(_Loss):
    """Gaussian clouded logit loss (Li et al., CVPR 2022; Keke921/GCLLoss ``losses.py``).

    ``eps ~ N(0, 1/3)`` per (sample, class), clamped to [-1, 1];
    ``c' = c - noise_mul |eps| delta_hat_j`` (every class, target included), ``z = s (c' - m Y)``;
    torch weighted mean CE, or detached focal mean over N when ``train_cls`` (stage 2).

    ``noise``: the raw draw (before clamp and abs), shape of ``cosine``; when None it is drawn as
    the official code does (``Normal(0, 1/3).sample`` on the CPU generator, see
    :func:`draw_gcl_noise`), so every call draws afresh. Differs from the official code only where
    it is undefined: all-equal counts give ``delta_hat = 0`` (no noise) instead of NaN.
    """

    def __init__(self, cls_num_list: CountsLike, m: float = 0.5, weight=None, s: float = 30,
                 train_cls: bool = False, noise_mul: float = 1.0, gamma: float = 0.0):
        super().__init__()
        check_scale(s)
        self._bufs(gcl_vectors(cls_num_list))  # m_list: normalised delta_hat
        self.m = m
        self.s = s
        self.weight = weight
        self.train_cls = train_cls
        self.noise_mul = noise_mul
        self.gamma = gamma

    def cross_entropy_call(self, cosine: Tensor, target: Tensor,
                           noise: Optional[Tensor] = None) -> CrossEntropyCall:
        eps = _noise_like(cosine, noise).clamp(-1.0, 1.0).abs()
        d = self.m_list.to(device=cosine.device, dtype=cosine.dtype)
        c = cosine - float(self.noise_mul) * eps * d
        return self._call(
            c, target, scale=self.s, margin=self.m, weight=self.weight,
            focal_gamma=self.gamma if self.train_cls else None, focal_detach=True,
        )

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        return self.cross_entropy_call(cosine, target, noise).run()


class GCLAngLoss(_Loss):
    """Angular GCL (TAI 2024; Keke921/GCLLoss ``losses.py`` ``GCLAngLoss``, also
    ``Places-LT/losses.py`` ``NoiAngLoss``).

    What the official code computes (and this reference implements)::

        eps   = clamp(N(0, 1/3), -1, 1)                       # per (sample, class)
        eta   = (pi/2) * epsilon * delta_hat_j * eps          # signed
        M     = |eta| + m * Y                                 # non-targets get |eta| too
        sine  = sqrt(clamp(1 - c^2, 0, 1))
        phi   = c cos M - sine sin M                          # cos(theta + M), every column
        out   = easy_margin ? (c > 0 ? phi : c)
                            : (c > cos(pi - M) ? phi : c - sin(pi - M))
        loss  = CE(s * out)  (torch weighted mean), or detached focal mean when train_cls

    Note the fallback ``c - sin(pi - M)`` (not ArcFace's ``c - sin(pi - m) m``) and that the
    cosine is *not* clamped (unlike ArcFace). The sqrt derivative is guarded at |c| = 1 (see
    :func:`_safe_sqrt`). ``noise`` is the raw draw as in :class:`GCLLoss`.
    """

    def __init__(self, cls_num_list: CountsLike, m: float = 0.5, epsilon: float = 0.1,
                 weight=None, s: float = 30, easy_margin: bool = False, train_cls: bool = False,
                 gamma: float = 0.0):
        super().__init__()
        check_scale(s)
        self._bufs(gcl_vectors(cls_num_list))
        self.m = m
        self.epsilon = epsilon
        self.s = s
        self.weight = weight
        self.easy_margin = easy_margin
        self.train_cls = train_cls
        self.gamma = gamma

    def cross_entropy_call(self, cosine: Tensor, target: Tensor,
                           noise: Optional[Tensor] = None) -> CrossEntropyCall:
        target, safe_t, _ = _check_target(cosine, target, -100)
        eps = _noise_like(cosine, noise).clamp(-1.0, 1.0)
        d = self.m_list.to(device=cosine.device, dtype=cosine.dtype)
        eta = (math.pi / 2.0 * float(self.epsilon)) * d * eps
        onehot = F.one_hot(safe_t, cosine.shape[1]).to(torch.bool)
        M = torch.where(onehot, eta.abs() + float(self.m), eta.abs())
        sine = _sine(cosine)
        phi = cosine * torch.cos(M) - sine * torch.sin(M)
        if self.easy_margin:
            out = torch.where(cosine > 0, phi, cosine)
        else:
            out = torch.where(cosine > torch.cos(math.pi - M), phi, cosine - torch.sin(math.pi - M))
        return self._call(
            out, target, scale=self.s, weight=self.weight,
            focal_gamma=self.gamma if self.train_cls else None, focal_detach=True,
        )

    def forward(self, cosine: Tensor, target: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        return self.cross_entropy_call(cosine, target, noise).run()


class ArcFaceLoss(_Loss):
    """ArcFace additive angular margin (Deng et al., CVPR 2019), on the target column only.

    ``c = clamp(cosine, -1, 1)``; target: ``phi = c cos m - sin(theta) sin m``,
    ``out = c > cos(pi - m) ? phi : c - sin(pi - m) m`` (``easy_margin``: ``c > 0 ? phi : c``);
    non-targets keep ``c``; mean CE of ``s * out``. ``m`` may be a scalar or a per-class ``(C,)``
    tensor (indexed by the target). ``sin(theta) = sqrt(clamp(1 - c^2, 0, 1))`` has the official
    value everywhere and derivative 0 where ``1 - c^2 == 0`` (|c| = 1), so gradients stay finite
    there (see :func:`_safe_sqrt`).
    """

    def __init__(self, s: float = 64.0, m=0.5, easy_margin: bool = False):
        super().__init__()
        self.s = s
        self.m = m
        self.easy_margin = easy_margin

    def cross_entropy_call(self, cosine: Tensor, target: Tensor) -> CrossEntropyCall:
        target, safe_t, _ = _check_target(cosine, target, -100)
        N, C = cosine.shape
        c = _clamp_cosine(cosine)
        m_vec = _vec(self.m, C, c, "m")
        m_t = m_vec[safe_t]
        c_t = c.gather(1, safe_t.unsqueeze(1)).squeeze(1)
        phi = c_t * torch.cos(m_t) - _sine(c_t) * torch.sin(m_t)
        if self.easy_margin:
            out_t = torch.where(c_t > 0, phi, c_t)
        else:
            out_t = torch.where(c_t > torch.cos(math.pi - m_t), phi,
                                c_t - torch.sin(math.pi - m_t) * m_t)
        onehot = F.one_hot(safe_t, C).to(torch.bool) if N > 0 else torch.zeros_like(c, dtype=torch.bool)
        out = torch.where(onehot, out_t.unsqueeze(1), c)
        return self._call(out, target, scale=self.s)

    def forward(self, cosine: Tensor, target: Tensor) -> Tensor:
        return self.cross_entropy_call(cosine, target).run()


def fbl_call_form(input, features, target, curr):
    """FeaBalLoss's two call forms -> ``(logits, features, labels, curr)``, with shape checks:
    ``(logits, features, target, curr)`` or the official ``({'feature': f, 'score': l}, labels, curr)``."""
    if isinstance(input, Mapping):
        feat, logits, labels = input["feature"], input["score"], features
        if target is not None:  # official positional form: (out, labels, curr)
            curr = target
    else:
        if target is None:
            raise ValueError("FeaBalLoss.forward(logits, features, target, curr): target missing")
        logits, feat, labels = input, features, target
    if feat.dim() != 2 or feat.shape[0] != logits.shape[0]:
        raise ValueError(
            f"features must be (N, D) with N={logits.shape[0]}, got {tuple(feat.shape)}"
        )
    return logits, feat, labels, curr


class FeaBalLoss(_Loss):
    """Feature-balanced loss (Li et al., ICME 2022; juyongjiang/FBL ``loss.py``).

    ``z_ij = l_ij - curr * A * lambda_j / (||f_i|| + 1e-12)`` for every class, then CE (torch
    weighted mean with ``weight``). ``lambda`` from :func:`~ltkernels.priors.fbl_lambda`,
    ``A = lambda_`` (60 for CIFAR, 150 for the large datasets; the official constructor default is
    1 and the scripts pass 60), ``curr = alpha(t)`` (:func:`~ltkernels.priors.fbl_alpha`).
    ``||f||`` is **not** detached (as in the official code); its subgradient at ``f = 0`` is 0.

    Call forms: ``forward(logits, features, target, curr=0.)`` or the official
    ``forward({'feature': f, 'score': l}, labels, curr=0.)``. Zero-count-safe: all-equal counts
    give ``lambda = 0`` (plain CE) instead of NaN.
    """

    def __init__(self, cls_num_list: CountsLike, weight=None, lambda_: float = 60.0):
        super().__init__()
        self._bufs(fbl_vectors(cls_num_list))
        self.weight = weight
        self.lambda_ = lambda_

    _call_form = staticmethod(fbl_call_form)

    def cross_entropy_call(self, input, features, target=None, curr=0.0) -> CrossEntropyCall:
        logits, feat, labels, curr = fbl_call_form(input, features, target, curr)
        lam = self.lam_list.to(device=logits.device, dtype=logits.dtype)
        norm = torch.linalg.vector_norm(feat, dim=1).to(logits.dtype).unsqueeze(1)
        if isinstance(curr, Tensor):
            curr = curr.to(device=logits.device, dtype=logits.dtype)
        z = logits - curr * float(self.lambda_) * lam / (norm + 1e-12)
        return self._call(z, labels, weight=self.weight)

    def forward(self, input, features, target=None, curr=0.0) -> Tensor:
        return self.cross_entropy_call(input, features, target, curr).run()
