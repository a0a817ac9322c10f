"""Samplers of docs/methods.md §1.4, each one global per-epoch draw sharded across DDP ranks.

Every sampler draws the epoch's whole index sequence from a generator seeded by (seed, epoch), the same
on every rank; rank r takes positions r, r+W, r+2W, ... so shards are disjoint slices of one draw and
the union over ranks equals the 1-process draw. ``set_start(k)`` skips the first k indices of this
rank's shard (exact mid-epoch resume)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..priors import SAMPLER_KINDS as _WEIGHT_KINDS
from ..priors import sampler_class_weights as _prior_sampler_class_weights

# The kinds with a per-class weight vector are ltkernels.priors.SAMPLER_KINDS; class-aware sampling (a cycle
# over the classes, :meth:`LTSampler._class_aware`) is the one kind that only a sampler has.
SAMPLER_KINDS = (*_WEIGHT_KINDS, "class_aware")


def _check_kind(kind: str) -> None:
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"data.sampler={kind!r}: allowed values are {list(SAMPLER_KINDS)}")


def sampler_class_weights(cls_num_list: Sequence[int], kind: str, beta: float = 0.9999,
                          cben_a: float = 0.9999, cben_b: float = 1e-5) -> np.ndarray:
    """Per-sample weight of a sample of class j (float64); the expected class frequency is ∝ n_j·w_j.

    The weights are :func:`ltkernels.priors.sampler_class_weights` of the classes that have samples
    (``"class_aware"`` takes the ``"class_balanced"`` weights 1/n_j, the class frequencies it draws);
    classes with n_j = 0 get weight 0, so that a label set missing a class still builds a sampler (priors
    rejects zero counts). cben's d̂ is therefore normalised over the present classes. The formulas are
    documented there (cben: β_j = a + b·d̂_j, code a=0.9999, b=1e-5; thesis range [0.999, 0.9999] is
    a=0.999, b=0.0009)."""
    _check_kind(kind)
    n = np.asarray(cls_num_list, dtype=np.float64)
    pos = n > 0
    w = np.zeros_like(n)
    if pos.any():
        weight_kind = "class_balanced" if kind == "class_aware" else kind
        w[pos] = _prior_sampler_class_weights(n[pos], weight_kind, beta, cben_a, cben_b).numpy()
    return w


class LTSampler(Sampler):
    def __init__(self, labels: Sequence[int], kind: str = "instance", num_samples: Optional[int] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, class_aware_k: int = 4,
                 beta: float = 0.9999, cben_a: float = 0.9999, cben_b: float = 1e-5):
        _check_kind(kind)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.kind, self.seed, self.rank, self.world_size = kind, int(seed), int(rank), int(world_size)
        self.class_aware_k = int(class_aware_k)
        self.num_samples = int(num_samples) if num_samples else len(self.labels)
        self.total_size = int(math.ceil(self.num_samples / self.world_size)) * self.world_size
        C = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.cls_num_list = torch.bincount(self.labels, minlength=C).tolist()
        self.class_weights = sampler_class_weights(self.cls_num_list, kind, beta, cben_a, cben_b)
        self.sample_weights = torch.as_tensor(self.class_weights[self.labels.numpy()], dtype=torch.float64)
        self.epoch, self.start = 0, 0

    # -- state -------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def set_start(self, start: int):
        self.start = int(start)

    def state_dict(self):
        return {"epoch": self.epoch, "start": self.start, "kind": self.kind, "seed": self.seed}

    def load_state_dict(self, sd):
        self.epoch, self.start = int(sd["epoch"]), int(sd["start"])

    # -- draws -------------------------------------------------------------------------------------
    def _generator(self, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return g

    def global_draw(self, epoch: Optional[int] = None) -> torch.Tensor:
        """The epoch's full index sequence (length total_size), identical on every rank."""
        g = self._generator(self.epoch if epoch is None else epoch)
        n = len(self.labels)
        if self.kind == "instance":
            reps = int(math.ceil(self.total_size / n))
            idx = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[: self.total_size]
        elif self.kind == "class_aware":
            idx = self._class_aware(g)
        else:
            idx = torch.multinomial(self.sample_weights, self.total_size, replacement=True, generator=g)
        return idx

    def _class_aware(self, g: torch.Generator) -> torch.Tensor:
        """Official ClassAwareSampler: cycle through classes in shuffled order (reshuffled every cycle),
        take k consecutive samples from that class's own shuffled cycle."""
        classes = [c for c, m in enumerate(self.cls_num_list) if m > 0]
        per_cls = {c: torch.nonzero(self.labels == c).flatten() for c in classes}
        queues = {c: [] for c in classes}
        order: list = []
        out = []
        while len(out) < self.total_size:
            if not order:
                order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
            c = order.pop(0)
            for _ in range(self.class_aware_k):
                if not queues[c]:
                    queues[c] = per_cls[c][torch.randperm(len(per_cls[c]), generator=g)].tolist()
                out.append(queues[c].pop(0))
        return torch.as_tensor(out[: self.total_size], dtype=torch.int64)

    def shard(self, epoch: Optional[int] = None) -> torch.Tensor:
        return self.global_draw(epoch)[self.rank:self.total_size:self.world_size]

    def __iter__(self):
        idx = self.shard()[self.start:].tolist()
        self.start = 0
        return iter(idx)

    def __len__(self):
        return self.total_size // self.world_size - self.start
