"""Mixup's two-target loss in one call: ``lam * L(y_a) + (1 - lam) * L(y_b)`` on shared logits.

The official GCL code calls its criterion twice, so the Gaussian cloud is drawn twice per step
(``draws="two"``); ``draws="one"`` perturbs both terms with the same draw. For the fused GCL/GCLAng
modules both modes cost no extra memory: the two terms use one Philox seed, with stream offsets 0 and 1
("two") or 0 and 0 ("one"). For the eager reference modules, "one" draws the dense noise once and
injects it into both calls.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import losses as _fused
from . import reference as _ref
from .functional import draw_seed

__all__ = ["mixup_loss"]


def mixup_loss(criterion: torch.nn.Module, input: Tensor, y_a: Tensor, y_b: Tensor, lam: float,
               draws: str = "two", **forward_kwargs: Any) -> Tensor:
    """``lam * criterion(input, y_a) + (1 - lam) * criterion(input, y_b)``.

    Args:
        criterion: any loss module of :mod:`ltkernels.losses` or :mod:`ltkernels.reference`.
        input: shared logits / cosines of the mixed batch.
        y_a, y_b: the two targets of the mixed samples; ``lam``: the mixing weight.
        draws: ``"two"`` (official: independent cloud noise per term) or ``"one"`` (shared draw);
            ignored by losses without a Gaussian cloud.
        forward_kwargs: passed to every criterion call (e.g. ``features=`` is not needed here; FBL users
            call ``criterion(logits, feats, y, curr)`` themselves).
    """
    if draws not in ("one", "two"):
        raise ValueError(f"draws must be 'one' or 'two', got {draws!r}")
    if not 0.0 <= float(lam) <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    fused = isinstance(criterion, (_fused.GCLLoss, _fused.GCLAngLoss))  # in-kernel noise: seed and offset
    cloud = fused or isinstance(criterion, (_ref.GCLLoss, _ref.GCLAngLoss))
    if cloud and "noise" not in forward_kwargs:
        if fused:
            seed = draw_seed(getattr(criterion, "generator", None))
            la = criterion(input, y_a, seed=seed, offset=0, **forward_kwargs)
            lb = criterion(input, y_b, seed=seed, offset=0 if draws == "one" else 1, **forward_kwargs)
            return lam * la + (1 - lam) * lb
        if draws == "one":
            forward_kwargs = dict(forward_kwargs, noise=_ref.draw_gcl_noise(input))
    return lam * criterion(input, y_a, **forward_kwargs) + (1 - lam) * criterion(input, y_b, **forward_kwargs)
