"""Per-class parameter vectors computed from per-class training counts.

Every loss in ltkernels is a small set of per-class vectors (column scale, column bias, target
margin, cloud size, class weight, per-target scale) fed to one fused kernel family; this module
computes those vectors from ``cls_num_list`` (the training count of each class), following the
official research code of each method (``docs/methods.md``).

Conventions
-----------
* Every function accepts a sequence, a NumPy array or a torch tensor of counts (any device or
  dtype) and returns a **float64 CPU** tensor; the caller casts and moves it.
* Counts must be 1-D, non-empty, finite and strictly positive (non-integer counts are accepted,
  e.g. fractional "effective" counts); violations raise :class:`ValueError` with the offending
  class index.
* Where a formula normalises by a spread that is zero (all classes equally frequent), the result
  is 0 instead of the NaN the official code would produce.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "counts_tensor",
    "ldam_margins",
    "kps_radius",
    "kps_margins",
    "kps_target_scale",
    "log_prior",
    "class_balanced_weights",
    "drw_weights",
    "cloud_sizes",
    "fbl_lambda",
    "fbl_alpha",
    "sampler_class_weights",
    "SAMPLER_KINDS",
]

CountsLike = Union[Sequence[float], np.ndarray, Tensor]

# The kinds with a per-class weight vector; ltkernels.data.SAMPLER_KINDS is these plus "class_aware".
SAMPLER_KINDS = ("instance", "class_balanced", "sqrt", "effective_number", "cben")


def _check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not (0.0 <= beta < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {beta}")
    return beta


def counts_tensor(cls_num_list: CountsLike) -> Tensor:
    """Validate ``cls_num_list`` and return it as a 1-D float64 CPU tensor.

    Raises:
        TypeError: the input is not numeric.
        ValueError: empty, not 1-D, non-finite entries, or any count <= 0
            (message names the first offending class, e.g.
            ``"class count must be positive, got 0 for class 3"``).
    """
    if isinstance(cls_num_list, Tensor):
        if cls_num_list.is_complex():
            raise TypeError("cls_num_list must be real-valued, got a complex tensor")
        t = cls_num_list.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            arr = np.asarray(cls_num_list)
        except Exception as exc:  # ragged nested lists etc.
            raise ValueError(f"cls_num_list could not be converted to an array: {exc}") from exc
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
        ):
            raise TypeError(f"cls_num_list must be numeric, got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise TypeError("cls_num_list must be real-valued, got complex numbers")
        t = torch.as_tensor(arr.astype(np.float64, copy=True), dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"cls_num_list must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError("cls_num_list must not be empty")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        j = int((~finite).nonzero()[0, 0])
        raise ValueError(f"class count must be finite, got {t[j].item()} for class {j}")
    positive = t > 0
    if not bool(positive.all()):
        j = int((~positive).nonzero()[0, 0])
        v = t[j].item()
        v_str = str(int(v)) if float(v).is_integer() else str(v)
        raise ValueError(f"class count must be positive, got {v_str} for class {j}")
    return t.contiguous()


def ldam_margins(cls_num_list: CountsLike, max_m: float = 0.5) -> Tensor:
    """LDAM label-distribution-aware margins (Cao et al., NeurIPS 2019; kaidic/LDAM-DRW losses.py).

    ``m_j = n_j^{-1/4}``, rescaled so that ``max_j m_j = max_m`` (the rarest class gets ``max_m``)::

        m = 1 / sqrt(sqrt(n));  m = m * (max_m / max(m))

    (the same operation order as the official NumPy code, here in float64).
    """
    n = counts_tensor(cls_num_list)
    m = 1.0 / torch.sqrt(torch.sqrt(n))
    return m * (float(max_m) / m.max())


def kps_radius(cls_num_list: CountsLike) -> Tensor:
    """KPS per-class radius (Li et al., TPAMI 2023; Keke921/KPSLoss losses.py ``s_list``).

    ``r_j = log(50 n_j / n_min) / log 50`` in ``[1, 1 + log(IF)/log 50]`` (IF = n_max / n_min).
    Computed as the official code does: ``t = log(n * (50 / n_min)); r = t * (1 / min t)``
    (``min t = log 50``), in float64.
    """
    n = counts_tensor(cls_num_list)
    t = torch.log(n * (50.0 / n.min()))
    return t * (1.0 / t.min())


def kps_margins(
    cls_num_list: CountsLike, max_m: float = 0.5, flip_compat: bool = False
) -> tuple[Tensor, Tensor]:
    """KPS target margins. Returns ``(m, m_prime)``.

    * Thesis (default, ``flip_compat=False``): ``m'_j = r_max + 1 - r_j`` (rarest class largest).
    * Official code (``flip_compat=True``; Keke921/KPSLoss losses.py ``torch.flip(s_list)``):
      ``m'_j = r_{C-1-j}``, a flip of the class *index*. It equals the thesis formula only when the
      classes are sorted by descending, log-linearly spaced counts (CIFAR-LT before the ``int``
      truncation); for any other order it assigns margins by position, not by frequency.
    * ``m_j = m'_j * max_m / max(m')``.

    ``m_prime`` (unnormalised, in ``[1, r_max]``) is what the GA stage uses for its per-target scale,
    see :func:`kps_target_scale`.
    """
    r = kps_radius(cls_num_list)
    if flip_compat:
        m_prime = torch.flip(r, dims=[0])
    else:
        m_prime = r.max() + 1.0 - r
    m = m_prime * (float(max_m) / m_prime.max())
    return m, m_prime


def kps_target_scale(
    cls_num_list: CountsLike, s: float = 30.0, flip_compat: bool = False
) -> Tensor:
    """Per-class softmax scale of the KPS gradient-adjustment (GA) stage.

    ``S_j = clamp(s * m'_j, s, 50)`` with ``m'`` from :func:`kps_margins` (unnormalised), applied
    per *sample* through its target: row i is scaled by ``S_{y_i}``.

    Found in Keke921/KPSLoss ``losses.py`` (``KPSLoss.forward``, ``weighted=True`` branch)::

        batch_s = clamp(flip(s_list) * s, s, 50)   # flip(s_list) = m' (code flip), not m
        output *= batch_s[target]                  # whole row, margin already applied

    and ``cifar_train.py`` (train_rule 'GA') sets ``weighted = epoch >= 120`` with ``s=15``,
    ``max_m=0.2``. The upper bound 50 is hard-coded there. ``torch.clamp`` semantics are kept: if
    ``s > 50`` every entry is 50.
    """
    _, m_prime = kps_margins(cls_num_list, 1.0, flip_compat=flip_compat)
    s = float(s)
    return torch.clamp(m_prime * s, min=s, max=50.0)


def log_prior(cls_num_list: CountsLike, eps: float = 1e-12) -> Tensor:
    """Log class prior used by logit adjustment (Menon et al., ICLR 2021).

    ``log(n_j / sum(n) + eps)``; the official code adds ``1e-12`` inside the log.
    """
    n = counts_tensor(cls_num_list)
    return torch.log(n / n.sum() + float(eps))


def class_balanced_weights(cls_num_list: CountsLike, beta: float = 0.9999) -> Tensor:
    """Class-balanced (effective number) weights (Cui et al., CVPR 2019), float64.

    ``w_j = (1 - beta) / (1 - beta^{n_j})`` normalised so that ``sum_j w_j = C``, as in
    kaidic/LDAM-DRW ``cifar_train.py`` (train_rule Reweight/DRW). ``beta = 0`` gives all ones.
    """
    n = counts_tensor(cls_num_list)
    beta = _check_beta(beta)
    effective_num = 1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)
    w = (1.0 - beta) / effective_num
    return w / w.sum() * n.numel()


def drw_weights(
    cls_num_list: CountsLike, epoch: int, drw_epoch: int = 160, beta: float = 0.9999
) -> Tensor:
    """Deferred re-weighting weights (LDAM-DRW, kaidic/LDAM-DRW ``cifar_train.py``).

    Official: ``idx = epoch // 160; betas = [0, 0.9999]`` then class-balanced weights with
    ``betas[idx]``: all ones (``beta = 0``) before ``drw_epoch``, :func:`class_balanced_weights`
    from ``drw_epoch`` on. The official list indexing fails at ``epoch >= 2 * drw_epoch``; here
    the CB weights simply continue.
    """
    epoch = int(epoch)
    drw_epoch = int(drw_epoch)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if drw_epoch <= 0:
        raise ValueError(f"drw_epoch must be positive, got {drw_epoch}")
    n = counts_tensor(cls_num_list)
    _check_beta(beta)
    if epoch // drw_epoch == 0:
        return torch.ones_like(n)
    return class_balanced_weights(n, beta)


def _log_spread(n: Tensor) -> Tensor:
    """(log n_max - log n_j) / max_j(log n_max - log n_j), 0 where the spread is 0."""
    d = torch.log(n)
    d = d.max() - d
    dmax = d.max()
    if dmax.item() == 0.0:
        return torch.zeros_like(d)
    return d / dmax


def cloud_sizes(cls_num_list: CountsLike) -> Tensor:
    """GCL normalised cloud sizes (Li et al., CVPR 2022; Keke921/GCLLoss losses.py ``m_list``).

    ``delta_j = log n_max - log n_j``, ``delta_hat_j = delta_j / max delta`` in ``[0, 1]``
    (0 for the most frequent class, 1 for the rarest). All-equal counts give zeros (the official
    code divides 0 by 0 there).
    """
    return _log_spread(counts_tensor(cls_num_list))


def fbl_lambda(cls_num_list: CountsLike) -> Tensor:
    """FBL per-class stimulus strength (Li et al., ICME 2022; juyongjiang/FBL loss.py ``lam_list``).

    ``lambda_j = (log n_max - log n_j) / (log n_max - log n_min)`` in ``[0, 1]``; zeros when all
    counts are equal (the official code gives NaN). Numerically the same vector as
    :func:`cloud_sizes`.
    """
    return _log_spread(counts_tensor(cls_num_list))


def fbl_alpha(epoch: float, total_epochs: int) -> float:
    """FBL curriculum factor ``alpha(t) = (t / (T - 10))^2`` (juyongjiang/FBL train.py ``curr``).

    ``t`` is the 0-based epoch; the value exceeds 1 in the last 9 epochs, as in the official code.
    Requires ``T > 10`` and ``t >= 0``.
    """
    total_epochs_f = float(total_epochs)
    if not total_epochs_f > 10:
        raise ValueError(f"total_epochs must be > 10, got {total_epochs}")
    t = float(epoch)
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"epoch must be a finite number >= 0, got {epoch}")
    return (t / (total_epochs_f - 10.0)) ** 2


def sampler_class_weights(
    cls_num_list: CountsLike,
    kind: str,
    beta: float = 0.9999,
    cben_a: float = 0.9999,
    cben_b: float = 1e-5,
) -> Tensor:
    """Per-class sampling weight (a sample of class j is drawn with probability proportional to w_j).

    Kinds (docs/methods.md §1.4; Keke921/GCLLoss ``sampler.py``), unnormalised like the
    official samplers (``torch.multinomial`` normalises):

    * ``"instance"``: ``1`` (plain instance sampling).
    * ``"class_balanced"``: ``1 / n_j`` (``BalancedDatasetSampler``).
    * ``"sqrt"``: ``1 / sqrt(n_j)`` (square-root sampling).
    * ``"effective_number"``: ``(1 - beta) / (1 - beta^{n_j})`` (``EffectNumSampler``, beta=0.9999).
    * ``"cben"``: GCL's ``CBEffectNumSampler``: ``d_j = log n_max - log n_j``,
      ``d_hat = (d - min d) / (max d - min d)`` (0 when all equal), ``beta_j = a + b * d_hat_j``,
      ``w_j = (1 - beta_j) / (1 - beta_j^{n_j})`` with the code's ``a = 0.9999, b = 1e-5``
      (the thesis range [0.999, 0.9999] is ``cben_a=0.999, cben_b=0.0009``). The official line
      ``(delta - delta.min())/delta.max() - delta.min()`` has a precedence slip that is harmless
      because ``min d = 0``.

    Class-aware sampling has no per-class weight vector and is not a kind here.
    """
    if kind not in SAMPLER_KINDS:
        raise ValueError(
            f"unknown sampler kind {kind!r}; allowed kinds: {', '.join(SAMPLER_KINDS)}"
        )
    n = counts_tensor(cls_num_list)
    if kind == "instance":
        return torch.ones_like(n)
    if kind == "class_balanced":
        return 1.0 / n
    if kind == "sqrt":
        return 1.0 / torch.sqrt(n)
    if kind == "effective_number":
        beta = _check_beta(beta)
        return (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    # cben
    d = torch.log(n)
    d = d.max() - d
    spread = (d.max() - d.min()).item()
    d_hat = torch.zeros_like(d) if spread == 0.0 else (d - d.min()) / spread
    betas = float(cben_a) + float(cben_b) * d_hat
    if not bool(((betas >= 0) & (betas < 1)).all()):
        raise ValueError(
            f"cben betas a + b * d_hat must lie in [0, 1), got range "
            f"[{betas.min().item()}, {betas.max().item()}] for cben_a={cben_a}, cben_b={cben_b}"
        )
    return (1.0 - betas) / (1.0 - torch.pow(betas, n))


# --------------------------------------------------------------------------------------------------
# Constructor arguments -> the per-class vectors of each loss module
# --------------------------------------------------------------------------------------------------
# The eager references (ltkernels.reference) and the fused modules (ltkernels.losses) are separate classes;
# what they share is this mapping: each function below takes the constructor arguments a module's vectors
# depend on and returns them keyed by the module's buffer name (float64 CPU, as everything here), so that
# both classes register the same buffers from the same formulas, and a test can compare the two.


def check_scale(s: float, name: str = "s") -> float:
    """A loss's logit scale: a number ``> 0`` (NaN rejected). Returns it unchanged."""
    if not s > 0:
        raise ValueError(f"{name} must be > 0, got {s}")
    return s


def check_gamma(gamma: float, name: str = "gamma") -> float:
    """A focal exponent: a number ``>= 0`` (NaN rejected). Returns it unchanged."""
    if not gamma >= 0:
        raise ValueError(f"{name} must be >= 0, got {gamma}")
    return gamma


def logit_adjustments(cls_num_list: CountsLike, tau: float = 1.0) -> Tensor:
    """Logit-adjustment column bias ``tau * log(pi_j + 1e-12)`` (Menon et al., ICLR 2021), with
    :func:`log_prior`."""
    return float(tau) * log_prior(cls_num_list)


def log_counts(cls_num_list: CountsLike) -> Tensor:
    """Balanced-softmax column bias ``log n_j`` (Ren et al., NeurIPS 2020)."""
    return torch.log(counts_tensor(cls_num_list))


def ldam_vectors(cls_num_list: CountsLike, max_m: float = 0.5) -> dict[str, Tensor]:
    """``LDAMLoss(cls_num_list, max_m, ...)``: ``{"m_list": ldam_margins(cls_num_list, max_m)}``."""
    return {"m_list": ldam_margins(cls_num_list, max_m)}


def kps_vectors(cls_num_list: CountsLike, max_m: float = 0.5, s: float = 30.0,
                flip_compat: bool = False) -> dict[str, Tensor]:
    """``KPSLoss(cls_num_list, max_m, s=s, flip_compat=...)``: column radius ``s_list``
    (:func:`kps_radius`), target margins ``m_list`` (:func:`kps_margins`) and the GA stage's per-target
    scale ``s_target`` (:func:`kps_target_scale`)."""
    m, _ = kps_margins(cls_num_list, max_m, flip_compat=flip_compat)
    return {"s_list": kps_radius(cls_num_list), "m_list": m,
            "s_target": kps_target_scale(cls_num_list, s, flip_compat=flip_compat)}


def logit_adjust_vectors(cls_num_list: CountsLike, tau: float = 1.0) -> dict[str, Tensor]:
    """``LogitAdjustLoss(cls_num_list, tau)``: ``{"logit_adjustments": logit_adjustments(...)}``."""
    return {"logit_adjustments": logit_adjustments(cls_num_list, tau)}


def balanced_softmax_vectors(cls_num_list: CountsLike) -> dict[str, Tensor]:
    """``BalancedSoftmaxLoss(cls_num_list)``: ``{"log_counts": log_counts(cls_num_list)}``."""
    return {"log_counts": log_counts(cls_num_list)}


def class_balanced_vectors(cls_num_list: CountsLike, beta: float = 0.9999) -> dict[str, Tensor]:
    """``ClassBalancedLoss(cls_num_list, beta)``: ``{"weights": class_balanced_weights(...)}``."""
    return {"weights": class_balanced_weights(cls_num_list, beta)}


def gcl_vectors(cls_num_list: CountsLike) -> dict[str, Tensor]:
    """``GCLLoss`` / ``GCLAngLoss(cls_num_list, ...)``: the normalised cloud sizes,
    ``{"m_list": cloud_sizes(cls_num_list)}`` (the official code's name)."""
    return {"m_list": cloud_sizes(cls_num_list)}


def fbl_vectors(cls_num_list: CountsLike) -> dict[str, Tensor]:
    """``FeaBalLoss(cls_num_list, ...)``: ``{"lam_list": fbl_lambda(cls_num_list)}``."""
    return {"lam_list": fbl_lambda(cls_num_list)}


__all__ += [
    "check_scale", "check_gamma", "logit_adjustments", "log_counts", "ldam_vectors", "kps_vectors",
    "logit_adjust_vectors", "balanced_softmax_vectors", "class_balanced_vectors", "gcl_vectors", "fbl_vectors",
]
