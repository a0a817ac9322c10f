"""Regularisers of the two remaining seed methods (docs/methods.md §6), RECONSTRUCTED FROM THE ABSTRACTS.

Neither paper's exact formulas could be verified; everything here is a configurable composite built from
what the abstracts state, and is labelled "reconstructed from the abstract" wherever it is exposed.

Gao et al., "Improving long-tail classification via decoupling and regularisation" (CAAI TIT 2025):

* :func:`uniformity` — hyperspherical uniformity of the normalised class weights ``w^_j = w_j / max(|w_j|,
  eps)`` over the ordered pairs ``j != k``, with ``d2 = |w^_j - w^_k|^2`` clamped below at ``dist_eps``
  (1e-12: coincident vectors give finite values; below the clamp the Riesz / log pair gradient is 0):

  - ``"gaussian"``: ``log mean exp(-t d2)`` (t = 2), the Gaussian potential;
  - ``"riesz"``: ``mean d2^(-s/2) = mean |w^_j - w^_k|^-s`` (s = 1, 2, ...), the Riesz / MHE energy;
  - ``"log"``: ``mean -log |w^_j - w^_k|``.

  Fused op ``torch.ops.ltkernels.uniformity`` (CPU and CUDA): tiled Gram blocks via GEMM with a fused
  epilogue, online log-sum-exp across tiles, the C x C matrix never materialised (extra memory O(C D)),
  gradient computed in the same pass. :func:`uniformity_reference` is the eager oracle.
* :func:`feature_norm_penalty` — ``(|f| - R)^2`` (ring) or ``max(0, R - |f|)`` (hinge).
* :class:`DecoupledRegularisedLoss` — ArcFace-margin CE on the cosine (global or per-class margin)
  ``+ lambda_u * uniformity(W) + lambda_n * feature-norm term``.

Liu et al., "Inducing Neural Collapse in Deep Long-tailed Learning" (AISTATS 2023):

* :class:`NC1Regulariser` — within-class variability ``mean_i |h_i - mu_{y_i}|^2`` to running class means;
* :class:`NC2Regulariser` — deviation of the centred, normalised class means from the simplex ETF
  (pairwise cosine ``-1/(C-1)``), ``mean_{c != c'} (cos_cc' + 1/(C-1))^2``, computed in O(C D^2) without
  a C x C matrix;
* running class means updated from per-class sums and counts, ``all_reduce``-d when ``torch.distributed``
  is initialised, so every DDP rank holds the same means (:class:`RunningClassMeans`);
* :func:`neural_collapse_metrics` — NC1 trace ratio ``Tr(S_W) / Tr(S_B)`` (and Papyan's
  ``Tr(S_W S_B^+) / C``), NC2 cosine spread, for evaluation reports.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .priors import ldam_margins

__all__ = [
    "UNIFORMITY_KERNELS", "uniformity", "uniformity_reference", "HypersphericalUniformity",
    "feature_norm_penalty", "FeatureNormRegulariser", "DecoupledRegularisedLoss", "per_class_margins",
    "RunningClassMeans", "NC1Regulariser", "NC2Regulariser", "neural_collapse_metrics", "nc_stats",
    "nc_metrics_from_stats", "nc_eval_metrics", "class_weight_rows",
]

RECONSTRUCTED = "reconstructed from the abstract (formulas not verified against the paper)"
UNIFORMITY_KERNELS = {"gaussian": 0, "riesz": 1, "log": 2}
LAYOUTS = ("out_in", "in_out")
EPS = 1e-12
DIST_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------
# Hyperspherical uniformity
# ---------------------------------------------------------------------------------------------------
def _uniformity_args(weight, kernel, t, s, layout, eps, dist_eps, fn):
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a tensor, got {type(weight).__name__}")
    if kernel not in UNIFORMITY_KERNELS:
        raise ValueError(f"{fn}: kernel must be one of {sorted(UNIFORMITY_KERNELS)}, got {kernel!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D ((C, D) for layout='out_in', (D, C) for 'in_out'), "
                         f"got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point tensor, got {weight.dtype}")
    param = float(t if kernel == "gaussian" else s if kernel == "riesz" else 0.0)
    if kernel != "log" and not (math.isfinite(param) and param > 0):
        name = "t" if kernel == "gaussian" else "s"
        raise ValueError(f"{fn}: {name} must be a positive finite number, got {param!r}")
    for name, v in (("eps", eps), ("dist_eps", dist_eps)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{fn}: {name} must be a positive finite number, got {v!r}")
    w = weight if layout == "out_in" else weight.t()
    if w.shape[0] < 2:
        raise ValueError(f"{fn}: needs at least 2 classes, got weight of shape {tuple(weight.shape)} "
                         f"(layout={layout!r})")
    if w.shape[1] < 1:
        raise ValueError(f"{fn}: weight has feature dimension 0 (shape {tuple(weight.shape)})")
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()
    return w, param


def uniformity(weight: Tensor, kernel: str = "gaussian", t: float = 2.0, s: float = 1.0, *,
               layout: str = "out_in", eps: float = EPS, dist_eps: float = DIST_EPS, block: int = 0) -> Tensor:
    """Hyperspherical uniformity of the normalised class weights (fused, tiled), reconstructed from the
    abstract of Gao et al. (CAAI TIT 2025).

    Args:
        weight: class weights, ``(C, D)`` rows (``layout="out_in"``, nn.Linear) or ``(D, C)`` columns
            (``layout="in_out"``, the official NormedLinear). float32/float64 (half types computed in float32).
        kernel: ``"gaussian"`` ``log mean_{j!=k} exp(-t d2)``, ``"riesz"`` ``mean d^-s``, ``"log"``
            ``mean -log d``, with ``d2 = |w^_j - w^_k|^2`` clamped at ``dist_eps``.
        t: Gaussian temperature (2). s: Riesz exponent (1, 2 or any positive value).
        eps: normalisation clamp (F.normalize semantics). block: Gram tile edge (0: automatic).

    Returns a 0-dim tensor, differentiable w.r.t. ``weight`` (gradient computed in the forward pass).
    """
    w, param = _uniformity_args(weight, kernel, t, s, layout, eps, dist_eps, "uniformity")
    if not (isinstance(block, int) and (block == 0 or block >= 2)):
        raise ValueError(f"uniformity: block must be 0 (automatic) or an int >= 2, got {block!r}")
    from . import _ops  # noqa: F401  (loads the extension and its registrations; this module imports without it)
    compute_grad = torch.is_grad_enabled() and w.requires_grad
    return torch.ops.ltkernels.uniformity(w, UNIFORMITY_KERNELS[kernel], param, float(eps), float(dist_eps),
                                          int(block), compute_grad)[0]


def uniformity_reference(weight: Tensor, kernel: str = "gaussian", t: float = 2.0, s: float = 1.0, *,
                         layout: str = "out_in", eps: float = EPS, dist_eps: float = DIST_EPS) -> Tensor:
    """Eager oracle of :func:`uniformity` (materialises the C x C distance matrix)."""
    w, param = _uniformity_args(weight, kernel, t, s, layout, eps, dist_eps, "uniformity_reference")
    C = w.shape[0]
    wh = F.normalize(w, dim=1, eps=eps)
    n = (wh * wh).sum(1)
    d2 = (n[:, None] + n[None, :] - 2.0 * (wh @ wh.t())).clamp_min(dist_eps)
    off = ~torch.eye(C, dtype=torch.bool, device=w.device)
    d2 = d2[off]
    if kernel == "gaussian":
        return torch.logsumexp(-param * d2, 0) - math.log(C * (C - 1))
    if kernel == "riesz":
        return d2.pow(-0.5 * param).mean()
    return (-0.5 * torch.log(d2)).mean()


def class_weight_rows(head: Union[nn.Module, Tensor]) -> Tensor:
    """The classifier's weights as (C, D) rows: ``NormedLinear`` (either layout), ``nn.Linear`` or a tensor
    (taken as (C, D))."""
    if isinstance(head, Tensor):
        return head
    if hasattr(head, "class_weight"):
        return head.class_weight()
    if isinstance(head, nn.Linear):
        return head.weight
    w = getattr(head, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2:
        return w
    raise TypeError(f"class_weight_rows: cannot find a 2-D class weight in {type(head).__name__}")


class HypersphericalUniformity(nn.Module):
    """``forward(weight) -> uniformity(weight, ...)`` (reconstructed from the abstract); ``impl="reference"``
    uses the eager oracle."""

    def __init__(self, kernel: str = "gaussian", t: float = 2.0, s: float = 1.0, layout: str = "out_in",
                 eps: float = EPS, dist_eps: float = DIST_EPS, block: int = 0, impl: str = "fused"):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        if kernel not in UNIFORMITY_KERNELS:
            raise ValueError(f"kernel must be one of {sorted(UNIFORMITY_KERNELS)}, got {kernel!r}")
        self.kernel, self.t, self.s, self.layout = kernel, float(t), float(s), layout
        self.eps, self.dist_eps, self.block, self.impl = float(eps), float(dist_eps), int(block), impl

    def forward(self, weight: Tensor) -> Tensor:
        if self.impl == "reference":
            return uniformity_reference(weight, self.kernel, self.t, self.s, layout=self.layout, eps=self.eps,
                                        dist_eps=self.dist_eps)
        return uniformity(weight, self.kernel, self.t, self.s, layout=self.layout, eps=self.eps,
                          dist_eps=self.dist_eps, block=self.block)

    def extra_repr(self) -> str:
        p = f"t={self.t}" if self.kernel == "gaussian" else f"s={self.s}" if self.kernel == "riesz" else ""
        return f"kernel={self.kernel!r}, {p}, layout={self.layout!r}, impl={self.impl!r}"


# ---------------------------------------------------------------------------------------------------
# Feature-norm regulariser
# ---------------------------------------------------------------------------------------------------
NORM_MODES = ("ring", "hinge")


def feature_norm_penalty(features: Tensor, R: float, mode: str = "ring", reduction: str = "mean") -> Tensor:
    """Feature-norm term (reconstructed from the abstract): ``(|f_i| - R)^2`` (``"ring"``) or
    ``max(0, R - |f_i|)`` (``"hinge"``); ``reduction`` ``"mean"``, ``"sum"`` or ``"none"``. The norm's
    subgradient at f = 0 is 0 (torch.linalg.vector_norm)."""
    if mode not in NORM_MODES:
        raise ValueError(f"feature_norm_penalty: mode must be one of {NORM_MODES}, got {mode!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"feature_norm_penalty: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError("feature_norm_penalty: features must be a 2-D (N, D) tensor")
    if not (isinstance(R, (int, float)) and math.isfinite(R) and R >= 0):
        raise ValueError(f"feature_norm_penalty: R must be a finite number >= 0, got {R!r}")
    norm = torch.linalg.vector_norm(features, dim=1)
    per = (norm - R).square() if mode == "ring" else (R - norm).clamp_min(0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


class FeatureNormRegulariser(nn.Module):
    """``forward(features) -> feature_norm_penalty(features, R, mode)`` (reconstructed from the abstract)."""

    def __init__(self, R: float = 1.0, mode: str = "ring"):
        super().__init__()
        if mode not in NORM_MODES:
            raise ValueError(f"mode must be one of {NORM_MODES}, got {mode!r}")
        self.R, self.mode = float(R), mode

    def forward(self, features: Tensor) -> Tensor:
        return feature_norm_penalty(features, self.R, self.mode)


# ---------------------------------------------------------------------------------------------------
# Composite loss (Gao et al.)
# ---------------------------------------------------------------------------------------------------
def per_class_margins(cls_num_list: Sequence[int], max_m: float) -> Tensor:
    """Per-class angular margins ``m_j ∝ n_j^{-1/4}`` scaled to max ``max_m`` (LDAM's rule; the paper's
    per-class rule is not known — reconstructed from the abstract): :func:`ltkernels.priors.ldam_margins`
    as float32. Empty, non-finite or non-positive counts raise ``ValueError`` naming the class."""
    return ldam_margins(cls_num_list, max_m).float()


class DecoupledRegularisedLoss(nn.Module):
    """Decoupled-and-regularised composite loss, RECONSTRUCTED FROM THE ABSTRACT of Gao et al. (CAAI TIT
    2025; formulas not verified against the paper).

    ``loss = ArcFaceCE_s,m(cosine, target) + lambda_u * U(W) + lambda_n * norm_term(features)``

    * ArcFace additive angular margin on the target (``ltkernels.losses.ArcFaceLoss`` when
      ``impl="fused"``, ``ltkernels.reference.ArcFaceLoss`` when ``"reference"``), global margin ``m``, or
      per-class margins (``per_class_margin=True``: ``m_j ∝ n_j^{-1/4}``, max ``m``; needs
      ``cls_num_list``), or ``m`` given as a ``(C,)`` tensor.
    * ``U``: :func:`uniformity` (fused, tiled) / :func:`uniformity_reference` of the class weights, kernel
      ``"gaussian"`` (t), ``"riesz"`` (riesz_s) or ``"log"``.
    * norm term: :func:`feature_norm_penalty`, ``"ring"`` ``(|f| - R)^2`` or ``"hinge"`` ``max(0, R - |f|)``.

    ``forward(cosine, target, weight=None, features=None)``: ``weight`` is the classifier weight in
    ``weight_layout`` (``"in_out"`` (D, C), the NormedLinear default, or ``"out_in"`` (C, D)); required when
    ``lambda_u > 0``; ``features`` (N, D) required when ``lambda_n > 0``. The last terms are kept in
    ``self.last_terms`` (detached 0-d tensors on the input's device; reading them is left to the caller's
    logging interval) for logging.
    """

    def __init__(self, cls_num_list: Optional[Sequence[int]] = None, s: float = 30.0, m=0.5,
                 per_class_margin: bool = False, easy_margin: bool = False, lambda_u: float = 0.1,
                 uniformity: str = "gaussian", t: float = 2.0, riesz_s: float = 1.0, lambda_n: float = 0.0,
                 norm_mode: str = "ring", R: float = 1.0, weight_layout: str = "in_out", impl: str = "fused"):
        super().__init__()
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        if per_class_margin:
            if cls_num_list is None:
                raise ValueError("per_class_margin=True needs cls_num_list")
            if isinstance(m, Tensor):
                raise ValueError("per_class_margin=True takes a scalar m (the largest margin)")
            m = per_class_margins(cls_num_list, float(m))
        if isinstance(m, Tensor):
            self.register_buffer("m_list", m.detach().float().clone())
            margin = self.m_list
        else:
            margin = float(m)
        if impl == "fused":
            from .losses import ArcFaceLoss
        else:
            from .reference import ArcFaceLoss
        self.ce = ArcFaceLoss(s=s, m=margin, easy_margin=easy_margin)
        self.uniform = HypersphericalUniformity(uniformity, t=t, s=riesz_s, layout=weight_layout, impl=impl)
        self.norm = FeatureNormRegulariser(R=R, mode=norm_mode)
        self.lambda_u, self.lambda_n = float(lambda_u), float(lambda_n)
        self.impl = impl
        self.last_terms: dict = {}

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "m_list"):
            self.ce.m = self.m_list
        return out

    def forward(self, cosine: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                features: Optional[Tensor] = None, skip_missing: bool = False) -> Tensor:
        """``skip_missing=True`` leaves out a term whose input (weight / features) is None instead of
        raising."""
        loss = self.ce(cosine, target)
        # detached tensors, not floats: float() would wait for the device on every training step
        terms = {"ce": loss.detach()}
        if self.lambda_u != 0.0 and not (skip_missing and weight is None):
            if weight is None:
                raise ValueError("DecoupledRegularisedLoss: lambda_u != 0 needs the classifier weight")
            u = self.uniform(weight)
            terms["uniformity"] = u.detach()
            loss = loss + self.lambda_u * u.to(loss.dtype)
        if self.lambda_n != 0.0 and not (skip_missing and features is None):
            if features is None:
                raise ValueError("DecoupledRegularisedLoss: lambda_n != 0 needs the features")
            nt = self.norm(features)
            terms["feature_norm"] = nt.detach()
            loss = loss + self.lambda_n * nt.to(loss.dtype)
        self.last_terms = terms
        return loss


# ---------------------------------------------------------------------------------------------------
# Neural-collapse regularisers (Liu et al.)
# ---------------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _class_sums(features: Tensor, target: Tensor, num_classes: int):
    sums = features.new_zeros((num_classes, features.shape[1])).index_add_(0, target, features)
    counts = torch.bincount(target, minlength=num_classes).to(features.dtype)
    return sums, counts


class RunningClassMeans(nn.Module):
    """Exponential running class means ``mu_c <- (1 - momentum) mu_c + momentum * batch_mean_c`` (first
    sighting: ``mu_c = batch_mean_c``), updated from per-class sums and counts of the batch. Under DDP
    (``torch.distributed`` initialised) the sums and counts are ``all_reduce``-d first, so the batch mean is
    the global batch's and every rank keeps identical means. Buffers ``means`` (C, D), ``seen`` (C,)."""

    def __init__(self, num_classes: int, feat_dim: int, momentum: float = 0.1):
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_classes, self.feat_dim, self.momentum = int(num_classes), int(feat_dim), float(momentum)
        self.register_buffer("means", torch.zeros(num_classes, feat_dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    def batch_stats(self, features: Tensor, target: Tensor):
        """Global (all-reduced under DDP) per-class sums (with gradient on this rank's part) and counts."""
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"features must be (N, {self.feat_dim}), got {tuple(features.shape)}")
        if target.dim() != 1 or target.shape[0] != features.shape[0]:
            raise ValueError(f"target must be (N,) with N={features.shape[0]}, got {tuple(target.shape)}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= self.num_classes):
            raise ValueError(f"target values must lie in [0, {self.num_classes})")
        sums, counts = _class_sums(features, target, self.num_classes)
        if _dist_on():
            other = sums.detach().clone()
            torch.distributed.all_reduce(other)
            torch.distributed.all_reduce(counts)
            sums = sums + (other - sums.detach())  # global value, gradient of the local part
        return sums, counts

    def blended(self, sums: Tensor, counts: Tensor) -> Tensor:
        """The means after this batch's update, differentiable through the batch part (not stored)."""
        present = counts > 0
        bmean = sums / counts.clamp_min(1).unsqueeze(1)
        old = self.means.to(bmean.dtype)
        mom = torch.where(self.seen, torch.full_like(counts, self.momentum), torch.ones_like(counts))
        new = old + mom.unsqueeze(1) * (bmean - old)
        return torch.where(present.unsqueeze(1), new, old)

    @torch.no_grad()
    def commit(self, new_means: Tensor, counts: Tensor) -> None:
        present = counts > 0
        self.means.copy_(new_means.detach().to(self.means.dtype))
        self.seen |= present


class NC1Regulariser(nn.Module):
    """NC1 term (reconstructed from the abstract of Liu et al., AISTATS 2023): within-class variability
    ``mean_i |h_i - mu_{y_i}|^2`` around the running class means (updated with this batch first, then used
    detached). ``normalize=True`` uses L2-normalised features (scale-free). ``forward(features, target)``;
    in ``eval()`` mode the means are not updated."""

    def __init__(self, num_classes: int, feat_dim: int, momentum: float = 0.1, normalize: bool = False):
        super().__init__()
        self.state = RunningClassMeans(num_classes, feat_dim, momentum)
        self.normalize = normalize

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        h = F.normalize(features, dim=1) if self.normalize else features
        if self.training:
            sums, counts = self.state.batch_stats(h.detach(), target)
            self.state.commit(self.state.blended(sums, counts), counts)
        mu = self.state.means.to(h.dtype)[target]
        if h.shape[0] == 0:
            return h.sum() * 0.0
        return (h - mu).square().sum(1).mean()


def _etf_deviation(means: Tensor) -> Tensor:
    """``mean_{c != c'} (cos_cc' + 1/(C-1))^2`` of the centred, normalised rows of ``means`` (C, D), via
    ``sum cos^2 = |M^T M|_F^2`` and ``sum cos = |sum_c m_c|^2`` (no C x C matrix)."""
    C = means.shape[0]
    if C < 2:
        return means.sum() * 0.0
    z = F.normalize(means - means.mean(0, keepdim=True), dim=1)
    sq = (z * z).sum(1)
    a = 1.0 / (C - 1)
    gram_d = z.t() @ z
    sum_cos2 = gram_d.square().sum() - sq.square().sum()
    sum_cos = z.sum(0).square().sum() - sq.sum()
    return (sum_cos2 + 2 * a * sum_cos) / (C * (C - 1)) + a * a


class NC2Regulariser(nn.Module):
    """NC2 term (reconstructed from the abstract of Liu et al., AISTATS 2023): deviation of the centred,
    normalised class means from a simplex equiangular tight frame, ``mean_{c != c'} (cos_cc' + 1/(C-1))^2``
    over the classes seen so far. The means are the running means after this batch's update,
    differentiable through the batch's contribution (classes absent from the batch enter as constants)."""

    def __init__(self, num_classes: int, feat_dim: int, momentum: float = 0.1):
        super().__init__()
        self.state = RunningClassMeans(num_classes, feat_dim, momentum)

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        if self.training:
            sums, counts = self.state.batch_stats(features, target)
            new = self.state.blended(sums, counts)
            self.state.commit(new, counts)
            seen = self.state.seen
        else:
            new, seen = self.state.means.to(features.dtype), self.state.seen
        return _etf_deviation(new[seen])


# ---------------------------------------------------------------------------------------------------
# Evaluation metrics
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def nc_stats(features: Tensor, labels: Tensor, num_classes: int) -> dict:
    """Sufficient statistics of :func:`nc_metrics_from_stats` (float64, summable over shards / DDP ranks):
    per-class sums (C, D), counts (C,), and the second moment ``sum_i h_i h_i^T`` (D, D)."""
    f = features.detach().double()
    y = labels.detach().long().to(f.device)
    if f.dim() != 2 or y.dim() != 1 or y.shape[0] != f.shape[0]:
        raise ValueError("nc_stats: features (N, D) and labels (N,) expected")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"nc_stats: labels must lie in [0, {num_classes})")
    sums, counts = _class_sums(f, y, int(num_classes))
    return {"sums": sums, "counts": counts, "second": f.t() @ f}


def _add_stats(a: Optional[dict], b: dict) -> dict:
    return dict(b) if a is None else {k: a[k] + b[k] for k in b}


@torch.no_grad()
def nc_metrics_from_stats(stats: dict, pinv: bool = True, chunk: int = 1024) -> dict:
    """Neural-collapse statistics (classes with no sample are skipped):

    * ``nc1_trace_ratio`` = ``Tr(S_W) / Tr(S_B)`` (within-class scatter per sample / between-class scatter
      of the class means around the global mean, per class);
    * ``nc1_pinv`` = ``Tr(S_W S_B^+) / K`` (Papyan et al.), when ``pinv``;
    * ``nc2_cos_mean`` / ``nc2_cos_std``: mean and std of the pairwise cosines of the centred class means
      (simplex ETF: ``-1/(K-1)`` and 0); ``nc2_etf_dev`` the mean squared deviation from ``-1/(K-1)``;
    * ``nc2_norm_cv``: coefficient of variation of the centred class-mean norms (equinorm: 0).
    """
    sums, counts, second = stats["sums"].double(), stats["counts"].double(), stats["second"].double()
    present = counts > 0
    K = int(present.sum())
    out = {"nc_classes": K}
    if K < 2:
        return out
    N = float(counts.sum())
    mu = sums[present] / counts[present].unsqueeze(1)
    mg = sums.sum(0) / N
    sw = (second - (mu * counts[present].unsqueeze(1)).t() @ mu) / N  # within-class scatter
    cm = mu - mg
    sb = cm.t() @ cm / K
    sw_tr, sb_tr = float(torch.trace(sw)), float(torch.trace(sb))
    out["nc1_trace_ratio"] = max(sw_tr, 0.0) / sb_tr if sb_tr > 0 else float("inf")
    if pinv:
        out["nc1_pinv"] = float(torch.trace(sw @ torch.linalg.pinv(sb, hermitian=True)) / K)
    z = F.normalize(cm, dim=1)
    s1 = s2 = 0.0
    for i in range(0, K, chunk):
        c = z[i:i + chunk] @ z.t()
        idx = torch.arange(i, min(i + chunk, K))
        c[idx - i, idx] = 0.0
        s1 += float(c.sum())
        s2 += float(c.square().sum())
    P = K * (K - 1)
    mean = s1 / P
    out["nc2_cos_mean"] = mean
    out["nc2_cos_std"] = math.sqrt(max(s2 / P - mean * mean, 0.0))
    a = 1.0 / (K - 1)
    out["nc2_etf_dev"] = s2 / P + 2 * a * mean + a * a
    nrm = cm.norm(dim=1)
    out["nc2_norm_cv"] = float(nrm.std() / nrm.mean()) if nrm.mean() > 0 else float("nan")
    return out


def neural_collapse_metrics(features: Tensor, labels: Tensor, num_classes: Optional[int] = None,
                            pinv: bool = True) -> dict:
    """:func:`nc_metrics_from_stats` of one feature set ``features`` (N, D), ``labels`` (N,)."""
    C = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if labels.numel() else 0)
    return nc_metrics_from_stats(nc_stats(features, labels, C), pinv=pinv)


@torch.no_grad()
def nc_eval_metrics(model: nn.Module, loader, device, num_classes: int, amp_dtype=None) -> dict:
    """Harness hook: NC metrics of ``model``'s features (``model(x, return_features=True)``) over
    ``loader``; under DDP the statistics of the ranks' shards are ``all_reduce``-d (every rank gets the
    metrics of the whole set). Keys prefixed ``nc1_`` / ``nc2_``."""
    was = model.training
    model.eval()
    acc = None
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, feats = model(x, return_features=True)
            acc = _add_stats(acc, nc_stats(feats.float(), torch.as_tensor(y).to(feats.device), num_classes))
    finally:
        model.train(was)
    if acc is None:
        return {}
    if _dist_on():
        for v in acc.values():
            torch.distributed.all_reduce(v)
    return nc_metrics_from_stats({k: v.cpu() for k, v in acc.items()})
