"""Learning-rate schedules as pure functions of (epoch, step) — the scheduler 'state' is the position."""
from __future__ import annotations

import math


def lr_at(optim_cfg: dict, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """Official LDAM/GCL/KPS form: linear warm-up ``lr·(e+1)/W`` for the first W epochs (per epoch),
    then multistep (``gamma`` per milestone, or explicit absolute ``milestone_factors``, e.g. LDAM-DRW's
    [0.01, 0.0001] at [160, 180]) or cosine ``lr_min + (lr − lr_min)·(1 + cos(π e/E))/2`` (per epoch;
    GCL stage 2) or constant."""
    lr = float(optim_cfg["lr"])
    W = int(optim_cfg.get("warmup_epochs") or 0)
    E = int(optim_cfg["epochs"])
    sched = optim_cfg.get("schedule", "multistep")
    if epoch < W:
        return lr * (epoch + 1) / W
    if sched == "multistep":
        ms = list(optim_cfg.get("milestones") or [])
        passed = sum(1 for m in ms if epoch >= m)
        factors = optim_cfg.get("milestone_factors")
        if factors:
            if len(factors) != len(ms):
                raise ValueError("optim.milestone_factors must have one entry per optim.milestones entry")
            return lr * (float(factors[passed - 1]) if passed else 1.0)
        return lr * float(optim_cfg.get("gamma", 0.1)) ** passed
    if sched == "cosine":
        lo = float(optim_cfg.get("lr_min") or 0.0)
        t = (epoch - W) / max(1, E - W)
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * t))
    if sched == "constant":
        return lr
    raise ValueError(f"optim.schedule={sched!r}: allowed values are ['multistep', 'cosine', 'constant']")
