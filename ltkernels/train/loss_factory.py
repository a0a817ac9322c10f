"""Loss factory: config name → constructor of ``ltkernels.losses`` (fused) or ``ltkernels.reference``
(eager; same class names and signatures) plus the per-epoch hooks of each recipe (DRW, KPS GA switch,
FBL curriculum α(t))."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from .config import LOSS_NAMES, ConfigError

# name -> (class name, default constructor kwargs (official script values live in configs), head)
SPECS = {
    "ce": ("CrossEntropyLoss", {}, "linear"),
    "ldam": ("LDAMLoss", {"max_m": 0.5, "s": 30}, "cosine"),
    "ldam_drw": ("LDAMLoss", {"max_m": 0.5, "s": 30}, "cosine"),
    "kps": ("KPSLoss", {"max_m": 0.5, "s": 30}, "cosine"),
    "kps_ga": ("KPSLoss", {"max_m": 0.5, "s": 30}, "cosine"),
    "la": ("LogitAdjustLoss", {"tau": 1.0}, "linear"),
    "bs": ("BalancedSoftmaxLoss", {}, "linear"),
    "focal": ("FocalLoss", {"gamma": 1.0, "detach": False}, "linear"),
    "cb": ("ClassBalancedLoss", {"beta": 0.9999, "loss_type": "softmax"}, "linear"),
    "fbl": ("FeaBalLoss", {"lambda_": 60.0}, "linear"),
    "gcl": ("GCLLoss", {"m": 0.0, "s": 30, "noise_mul": 0.5}, "cosine"),
    "gcl_ang": ("GCLAngLoss", {"m": 0.0, "s": 30}, "cosine"),
    "arcface": ("ArcFaceLoss", {"s": 64.0, "m": 0.5}, "cosine"),
    "cosface": ("CosFaceLoss", {"s": 64.0, "m": 0.4}, "cosine"),
}
NEEDS_COUNTS = {"LDAMLoss", "KPSLoss", "LogitAdjustLoss", "BalancedSoftmaxLoss", "ClassBalancedLoss", "FeaBalLoss",
                "GCLLoss", "GCLAngLoss"}
TAKES_WEIGHT = {"CrossEntropyLoss", "LDAMLoss", "KPSLoss", "LogitAdjustLoss", "FocalLoss", "FeaBalLoss", "GCLLoss",
                "GCLAngLoss"}
TAKES_NOISE = {"GCLLoss", "GCLAngLoss"}


def loss_module(impl: str):
    """``ltkernels.losses`` for impl='fused', ``ltkernels.reference`` for impl='reference'."""
    if impl not in ("fused", "reference"):
        raise ConfigError(f"loss.impl={impl!r}: allowed values are ['reference', 'fused']")
    name = "ltkernels.losses" if impl == "fused" else "ltkernels.reference"
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"loss.impl={impl!r} needs {name}, which failed to import ({type(e).__name__}: {e}); "
                          f"build the extension with tools/build.sh or use loss.impl=reference") from e


def fused_available() -> bool:
    try:
        importlib.import_module("ltkernels.losses")
        return True
    except Exception:  # noqa: BLE001
        return False


def default_head(name: str) -> str:
    if name not in SPECS:
        raise ConfigError(f"loss.name={name!r}: allowed values are {list(LOSS_NAMES)}")
    return SPECS[name][2]


class LossDriver:
    """Holds the current criterion and rebuilds it when a recipe hook changes its arguments.

    ``drw``: per-class weights ``priors.drw_weights`` (ones before ``drw_epoch``, CB weights after);
    ``kps_ga``: ``weighted=True`` from ``ga_epoch``; ``fbl``: ``curr = priors.fbl_alpha(epoch, epochs)``.
    ``__call__(logits, features, target, noise=None)`` returns the scalar loss."""

    def __init__(self, loss_cfg: dict, cls_num_list, total_epochs: int, device=None, impl: Optional[str] = None):
        self.cfg = loss_cfg
        self.name = loss_cfg["name"]
        if self.name not in SPECS:
            raise ConfigError(f"loss.name={self.name!r}: allowed values are {list(LOSS_NAMES)}")
        self.impl = impl or loss_cfg["impl"]
        self.mod = loss_module(self.impl)
        self.cls_name, defaults, _ = SPECS[self.name]
        self.params = {**defaults, **(loss_cfg.get("params") or {})}
        self.cls_num_list = [int(c) for c in cls_num_list]
        self.total_epochs = int(total_epochs)
        self.device = device
        drw = loss_cfg.get("drw", "auto")
        self.drw = (self.name == "ldam_drw") if drw == "auto" else bool(drw)
        if self.drw and self.cls_name not in TAKES_WEIGHT:
            raise ConfigError(f"loss.drw=true is not available for loss.name={self.name!r} (no 'weight' argument); "
                              f"allowed with {sorted(k for k, v in SPECS.items() if v[0] in TAKES_WEIGHT)}")
        self.takes_noise = self.cls_name in TAKES_NOISE
        self.epoch = None
        self.curr = 0.0
        self._key = None
        self.criterion = None
        self.set_epoch(0)

    # ------------------------------------------------------------------
    def _kwargs(self, epoch: int) -> dict:
        from .. import priors
        kw = dict(self.params)
        if self.drw:
            w = priors.drw_weights(self.cls_num_list, epoch, int(self.cfg.get("drw_epoch", 160)),
                                   float(self.cfg.get("drw_beta", 0.9999)))
            kw["weight"] = w.to(dtype=torch.float32, device=self.device)
        if self.name == "kps_ga":
            kw["weighted"] = epoch >= int(self.cfg.get("ga_epoch", 120))
        return kw

    def _construct(self, kw):
        cls = regularised_class(self.cls_name) or getattr(self.mod, self.cls_name, None)
        if self.cls_name in REGULARISED:
            kw = {**kw, "impl": self.impl, "weight_layout": "out_in"}  # bound head's weight as (C, D) rows
        if cls is None:
            raise ConfigError(f"loss.name={self.name!r}: {self.mod.__name__} has no {self.cls_name}")
        args = (self.cls_num_list,) if self.cls_name in NEEDS_COUNTS else ()
        try:
            crit = cls(*args, **kw)
        except TypeError as e:
            raise ConfigError(f"loss.params for loss.name={self.name!r} ({self.cls_name}): {e}") from e
        return crit.to(self.device) if self.device is not None and hasattr(crit, "to") else crit

    def set_epoch(self, epoch: int) -> None:
        from .. import priors
        self.epoch = int(epoch)
        kw = self._kwargs(self.epoch)
        key = tuple(sorted((k, v.tolist() if torch.is_tensor(v) else v) for k, v in kw.items()))
        if key != self._key:
            self.criterion, self._key = self._construct(kw), key
        if self.name == "fbl":
            self.curr = priors.fbl_alpha(self.epoch, self.total_epochs)

    def state_dict(self):
        return {"epoch": self.epoch}

    # ------------------------------------------------------------------
    @property
    def logit_scale(self) -> float:
        """Scale applied to the head's output inside the loss (s for cosine-logit losses; 1 otherwise)."""
        return float(self.params.get("s", 1.0)) if SPECS[self.name][2] == "cosine" else 1.0

    def last_terms(self) -> dict:
        """The regulariser terms of the last call as detached device tensors (empty for plain losses)."""
        if self.cls_name in REGULARISED:
            return dict(getattr(self.criterion, "last_terms", {}) or {})
        return {}

    def __call__(self, logits, features, target, noise=None):
        if self.cls_name in REGULARISED:
            w = self.head_weight()
            return self.criterion(logits, target, weight=w, features=features, skip_missing=w is None)
        if self.name == "fbl":
            return self.criterion(logits, features, target, self.curr)
        if self.takes_noise and noise is not None:
            return self.criterion(logits, target, noise=noise)
        return self.criterion(logits, target)


# ---------------------------------------------------------------------------------------------------
# Extension (issue 7): regularised composites from ltkernels.regularisers (reconstructed from the abstract).
# They also need the classifier weight: the engine binds the model's head with LossDriver.bind_head.
# ---------------------------------------------------------------------------------------------------
REGULARISED = {"DecoupledRegularisedLoss"}
SPECS["decoupled"] = ("DecoupledRegularisedLoss", {"s": 30.0, "m": 0.5, "lambda_u": 0.1, "uniformity": "gaussian",
                                                   "t": 2.0, "lambda_n": 0.0}, "cosine")
NEEDS_COUNTS.add("DecoupledRegularisedLoss")


def regularised_class(cls_name: str):
    if cls_name not in REGULARISED:
        return None
    from .. import regularisers
    return getattr(regularisers, cls_name)


def _bind_head(self, head) -> None:
    """Gives the driver the classifier whose weight the regulariser acts on (``head.class_weight()`` or
    ``nn.Linear.weight``, as (C, D) rows)."""
    self._head = head


def _head_weight(self):
    from ..regularisers import class_weight_rows
    head = getattr(self, "_head", None)
    if head is None:  # standalone driver (no model): the weight term is left out, with a warning
        if not getattr(self, "_warned_head", False):
            import warnings
            warnings.warn(f"loss.name={self.name!r}: no classifier bound (LossDriver.bind_head(model.head)); "
                          f"the uniformity term is left out")
            self._warned_head = True
        return None
    return class_weight_rows(head)


LossDriver.bind_head = _bind_head
LossDriver.head_weight = _head_weight
