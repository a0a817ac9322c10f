"""ltkernels: fused CPU/CUDA kernels for long-tailed recognition losses.

The loss modules (``ltkernels.LDAMLoss``, ``ltkernels.GCLLoss``, ...) and the functional API are loaded
on first use, so the pure-Python parts (``ltkernels.priors``, ``ltkernels.reference``, the harness)
import without touching the compiled extension ``ltkernels._C``.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "CrossEntropyLoss": "losses",
    "LDAMLoss": "losses",
    "KPSLoss": "losses",
    "LogitAdjustLoss": "losses",
    "BalancedSoftmaxLoss": "losses",
    "CosFaceLoss": "losses",
    "FocalLoss": "losses",
    "ClassBalancedLoss": "losses",
    "GCLLoss": "losses",
    "GCLAngLoss": "losses",
    "ArcFaceLoss": "losses",
    "FeaBalLoss": "losses",
    "drw_weights": "priors",
    "margin_cross_entropy": "functional",
    "cross_entropy": "functional",
    "mixup_loss": "mixup",
    "cosine_logits": "cosine",
    "NormedLinear": "cosine",
    "cosine_head_loss": "cosine",
}

__all__ = sorted(_LAZY) + ["functional", "losses", "priors", "reference"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    if name in ("functional", "losses", "priors", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'ltkernels' has no attribute {name!r}")
