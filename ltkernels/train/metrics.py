"""Evaluation metrics: top-1/top-5, many/medium/few-shot, per-class accuracy, ECE, per-class feature norm."""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
import torch


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|."""
    conf, pred = probs.max(dim=1)
    return ece_from(conf, pred.eq(targets), bins)


def ece_from(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    correct = correct.double()
    conf = conf.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    N = len(conf)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            ece += m.sum().item() / N * abs(correct[m].mean().item() - conf[m].mean().item())
    return float(ece)


def group_masks(cls_num_list: Sequence[int], many: int = 100, few: int = 20):
    n = np.asarray(cls_num_list)
    return {"many": n > many, "medium": (n <= many) & (n >= few), "few": n < few}


def summarize(logits: torch.Tensor, targets: torch.Tensor, feat_norms: torch.Tensor = None,
              logit_scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """Per-sample summaries (small; gathered across DDP ranks instead of the N×C logits)."""
    logits = logits.float()
    targets = targets.long()
    k = min(5, logits.shape[1])
    z = logits * logit_scale
    probs = torch.softmax(z, dim=1)
    return {"target": targets, "pred": logits.argmax(dim=1),
            "top5": logits.topk(k, dim=1).indices.eq(targets[:, None]).any(dim=1),
            "conf": probs.max(dim=1).values.double(),
            "nll": torch.nn.functional.cross_entropy(z, targets, reduction="none").double(),
            "feat_norm": feat_norms.double() if feat_norms is not None else torch.full_like(targets, -1.0,
                                                                                        dtype=torch.float64)}


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, cls_num_list: Sequence[int],
                    feat_norms: torch.Tensor = None, many: int = 100, few: int = 20, ece_bins: int = 15,
                    logit_scale: float = 1.0) -> Dict:
    """Group accuracies are means of per-class accuracies (decoupling code's ``shot_acc``); classes absent
    from the evaluation set are skipped; an empty group is NaN. ECE and NLL use softmax(logit_scale·z)."""
    return metrics_from_summary(summarize(logits, targets, feat_norms, logit_scale), logits.shape[1],
                                cls_num_list, many, few, ece_bins)


def metrics_from_summary(S: Dict[str, torch.Tensor], C: int, cls_num_list: Sequence[int], many: int = 100,
                         few: int = 20, ece_bins: int = 15) -> Dict:
    targets, pred, top5 = S["target"].long(), S["pred"].long(), S["top5"].bool()
    correct = pred.eq(targets)
    cnt = torch.bincount(targets, minlength=C).double()
    hit = torch.bincount(targets, weights=correct.double(), minlength=C)
    present = (cnt > 0).numpy()
    per_class = torch.where(cnt > 0, hit / cnt.clamp_min(1), torch.full_like(cnt, float("nan"))).numpy()
    out = {"top1": correct.double().mean().item() * 100, "top5": top5.double().mean().item() * 100}
    for g, m in group_masks(cls_num_list, many, few).items():
        sel = m & present
        out[g] = float(np.mean(per_class[sel]) * 100) if sel.any() else math.nan
    out["ece"] = ece_from(S["conf"], correct, ece_bins) * 100
    out["nll"] = S["nll"].mean().item()
    out["per_class_acc"] = [float(v * 100) for v in per_class]
    feat_norms = S["feat_norm"]
    if len(feat_norms) and feat_norms.min() >= 0:
        s = torch.bincount(targets, weights=feat_norms.double(), minlength=C)
        out["feat_norm_per_class"] = torch.where(cnt > 0, s / cnt.clamp_min(1),
                                                 torch.full_like(cnt, float("nan"))).tolist()
        out["feat_norm"] = feat_norms.double().mean().item()
    return out


@torch.no_grad()
def collect_outputs(model, loader, device, amp_dtype=None, posthoc=None, memory_format=None):
    """Runs the model over a loader; returns (logits float32 CPU, targets, feature norms). The outputs stay on
    the device until the end (one transfer, not one wait per batch); ``memory_format``: that of 4-d inputs."""
    model.eval()
    L, T, F = [], [], []
    for x, y in loader:
        fmt = memory_format if memory_format is not None and x.dim() == 4 else torch.preserve_format
        x = x.to(device, non_blocking=True, memory_format=fmt)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, feats = model(x, return_features=True)
        logits, feats = logits.float(), feats.float()
        if posthoc is not None:
            logits = posthoc(logits, feats)
        L.append(logits)
        T.append(torch.as_tensor(y))
        F.append(feats.norm(dim=1))
    return torch.cat(L).cpu(), torch.cat(T).cpu(), torch.cat(F).cpu()


def format_table(rows: Dict[str, Dict], cols=("many", "medium", "few", "top1", "top5", "ece"),
                 extra_header: str = "") -> str:
    """Plain-text table; rows = {method: metrics}; values may be 'mean ± std' strings or floats."""
    head = ["method"] + list(cols)
    lines = []
    for name, m in rows.items():
        cells = [name]
        for c in cols:
            v = m.get(c, math.nan)
            cells.append(v if isinstance(v, str) else (f"{v:.2f}" if not math.isnan(v) else "-"))
        lines.append(cells)
    w = [max(len(str(r[i])) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w[i]) for i, x in enumerate(r)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (wi + 2) for wi in w) + "|"
    return "\n".join(([extra_header] if extra_header else []) + [fmt(head), sep] + [fmt(r) for r in lines])
