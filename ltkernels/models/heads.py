"""Classifier heads: linear, cosine (NormedLinear), LWS; τ-normalisation as a post-hoc transform."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS = ("linear", "cosine")


class NormedLinear(nn.Module):
    """Eager cosine head with the official layout: weight (in, out), uniform(-1, 1) then unit columns;
    ``forward(x) = normalize(x, dim=1) @ normalize(W, dim=0)`` (docs/methods.md §1.1)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x):
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))

    def class_weight(self) -> torch.Tensor:
        """Weights as (out, in) rows, for analysis (norms, τ-norm)."""
        return self.weight.t()


def make_head(kind: str, in_features: int, num_classes: int, cosine_impl: str = "eager") -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "cosine":
        if cosine_impl not in ("eager", "fused"):
            raise ValueError(f"model.cosine_impl={cosine_impl!r}: allowed values are ['eager', 'fused']")
        if cosine_impl == "fused":
            # imported here: ltkernels.cosine loads the compiled extension, which the eager heads do not need
            try:
                from ..cosine import NormedLinear as FusedNormedLinear
            except ImportError as e:
                raise RuntimeError("model.cosine_impl='fused' needs the compiled extension (build it with "
                                   f"tools/build.sh) — or use 'eager': {e}") from e
            return FusedNormedLinear(in_features, num_classes)
        return NormedLinear(in_features, num_classes)
    raise ValueError(f"model.head={kind!r}: allowed values are {list(HEADS)}")


class LWSHead(nn.Module):
    """Learnable weight scaling (Kang et al. 2020): frozen linear classifier, one learnable scale per class."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(base.out_features))

    def forward(self, x):
        return self.base(x) * self.scales


@torch.no_grad()
def tau_normalize_(head: nn.Module, tau: float = 1.0) -> None:
    """τ-normalisation (Kang et al. 2020): w_j ← w_j / ‖w_j‖^τ, bias dropped; in place on a linear head."""
    if not isinstance(head, nn.Linear):
        raise ValueError("tau-normalisation needs a linear head (model.head=linear)")
    norms = head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    head.weight.div_(norms.pow(tau))
    if head.bias is not None:
        head.bias.zero_()
