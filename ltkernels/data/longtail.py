"""Long-tailed subsampling shared by every dataset (docs/methods.md §7)."""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

IMB_TYPES = ("exp", "step", "none")


def _ratio(imb_factor: float) -> float:
    """Return n_min / n_max. ``imb_factor`` is accepted as IF = n_max / n_min (>= 1, e.g. 100) or, as in
    the official LDAM code, as the ratio itself (< 1, e.g. 0.01)."""
    f = float(imb_factor)
    if f <= 0:
        raise ValueError(f"imb_factor must be > 0, got {imb_factor}")
    return 1.0 / f if f >= 1 else f


def img_num_per_cls(n_max: int, num_classes: int, imb_factor: float, imb_type: str = "exp") -> List[int]:
    """Official formula: exp: ``int(n_max * r**(i/(C-1)))``; step: first half ``n_max``, second half
    ``int(n_max * r)``; none: ``n_max`` for every class. ``r = 1/IF``; class 0 is the head."""
    if imb_type not in IMB_TYPES:
        raise ValueError(f"data.imb_type={imb_type!r}: allowed values are {list(IMB_TYPES)}")
    r = _ratio(imb_factor)
    C = int(num_classes)
    if imb_type == "exp":
        return [int(n_max * (r ** (i / (C - 1.0)))) if C > 1 else int(n_max) for i in range(C)]
    if imb_type == "step":
        half = C // 2
        return [int(n_max) for _ in range(half)] + [int(n_max * r) for _ in range(C - half)]
    return [int(n_max)] * C


def select_longtail(targets: Sequence[int], counts: Sequence[int], seed: int = 0,
                    exclude: Sequence[int] = ()) -> np.ndarray:
    """Per class (in class order) shuffle that class's indices with one RandomState(seed) and keep the first
    ``counts[c]`` — the official ``gen_imbalanced_data`` (np.random.seed(0); np.random.shuffle per class).
    Returns the kept indices in class order. ``exclude``: indices removed beforehand (held-out val)."""
    t = np.asarray(targets, dtype=np.int64)
    rng = np.random.RandomState(seed)
    excl = np.zeros(len(t), dtype=bool)
    if len(exclude):
        excl[np.asarray(exclude, dtype=np.int64)] = True
    keep = []
    for c, n in enumerate(counts):
        idx = np.where((t == c) & ~excl)[0]
        rng.shuffle(idx)
        if n > len(idx):
            raise ValueError(f"class {c}: asked for {n} samples but only {len(idx)} available")
        keep.append(idx[:n])
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def holdout_per_class(targets: Sequence[int], per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """A balanced held-out split: ``per_class`` indices of every class (seeded, independent of the LT draw)."""
    if per_class <= 0:
        return np.zeros(0, dtype=np.int64)
    t = np.asarray(targets, dtype=np.int64)
    rng = np.random.RandomState(seed + 7919)
    out = []
    for c in range(num_classes):
        idx = np.where(t == c)[0]
        rng.shuffle(idx)
        out.append(np.sort(idx[-per_class:]))
    return np.concatenate(out)


def class_counts(targets: Sequence[int], num_classes: int) -> List[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()


def shot_groups(cls_num_list: Sequence[int], many: int = 100, few: int = 20):
    """Masks of many (> many), medium (few..many) and few (< few) classes by training count."""
    n = np.asarray(cls_num_list)
    return n > many, (n <= many) & (n >= few), n < few


def imbalance_ratio(cls_num_list: Sequence[int]) -> float:
    n = [c for c in cls_num_list if c > 0]
    return max(n) / min(n) if n else math.nan
