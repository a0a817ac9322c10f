"""Embedded default: scikit-learn's bundled digits (1,797 real 8x8 images), made long-tailed.

Per class (seeded): the first ``test_per_class`` images form a balanced test set, the next
``val_per_class`` a balanced validation set; the training set keeps ``n_i = int(n_max * (1/IF)^(i/9))``
of the remaining images (class 0 the head), as the CIFAR-LT formula does."""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

from .longtail import img_num_per_cls


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


class DigitsLT(Dataset):
    num_classes = 10

    def __init__(self, split: str = "train", imb_factor: float = 20, imb_type: str = "exp", n_max: int = 100,
                 test_per_class: int = 50, val_per_class: int = 10, seed: int = 0, augment: bool = None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: allowed values are ['train', 'val', 'test']")
        x, y = _load_digits()
        rng = np.random.RandomState(seed)
        counts = img_num_per_cls(n_max, 10, imb_factor, imb_type)
        sel = []
        for c in range(10):
            idx = np.where(y == c)[0]
            rng.shuffle(idx)
            if split == "test":
                sel.append(idx[:test_per_class])
            elif split == "val":
                sel.append(idx[test_per_class:test_per_class + val_per_class])
            else:
                pool = idx[test_per_class + val_per_class:]
                if counts[c] > len(pool):
                    raise ValueError(f"digits class {c}: n={counts[c]} exceeds the {len(pool)} available "
                                     f"(lower data.n_max, data.test_per_class or data.val_per_class)")
                sel.append(pool[:counts[c]])
        sel = np.concatenate(sel)
        # mean/std of the digits images (fixed constants, so every split is normalised alike)
        self.data = torch.from_numpy((x[sel] - 0.3) / 0.38).unsqueeze(1).contiguous()
        self.targets = y[sel].tolist()
        self.augment = (split == "train") if augment is None else augment
        self.cls_num_list = np.bincount(y[sel], minlength=10).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.data[i]
        if self.augment:
            # random shift by up to one pixel (pad 1 with background, random 8x8 crop); global torch RNG
            p = torch.nn.functional.pad(img, (1, 1, 1, 1), value=float(-0.3 / 0.38))
            dx, dy = torch.randint(0, 3, (2,)).tolist()
            img = p[:, dy:dy + 8, dx:dx + 8]
        return img, self.targets[i]
