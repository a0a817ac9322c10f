"""CIFAR-10/100-LT from the standard CIFAR "python version" pickle files (docs/methods.md §7)."""
from __future__ import annotations

import os
import pickle

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .longtail import holdout_per_class, img_num_per_cls, select_longtail

_LAYOUT = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def _find_dir(root: str, num_classes: int) -> str:
    sub, train_files, _, _ = _LAYOUT[num_classes]
    for cand in (os.path.join(root, sub), root):
        if os.path.exists(os.path.join(cand, train_files[0])):
            return cand
    raise FileNotFoundError(
        f"CIFAR-{num_classes} python-version pickles not found: looked for "
        f"{os.path.join(root, sub, train_files[0])!r} and {os.path.join(root, train_files[0])!r} "
        f"(set data.root to the folder that contains '{sub}/'; download 'CIFAR-{num_classes} python version' "
        f"from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there)")


def load_cifar_pickles(root: str, num_classes: int, train: bool):
    """Returns (uint8 images N×32×32×3, list of labels)."""
    if num_classes not in _LAYOUT:
        raise ValueError(f"num_classes={num_classes}: allowed values are [10, 100]")
    d = _find_dir(root, num_classes)
    _, train_files, test_files, key = _LAYOUT[num_classes]
    xs, ys = [], []
    for f in (train_files if train else test_files):
        path = os.path.join(d, f)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CIFAR-{num_classes} file missing: {path!r}")
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        data = entry.get(b"data", entry.get("data"))
        labels = entry.get(key, entry.get(key.decode()))
        if data is None or labels is None:
            raise ValueError(f"{path!r} is not a CIFAR-{num_classes} python-version batch (keys: "
                             f"{sorted(k if isinstance(k, str) else k.decode() for k in entry)})")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(int(v) for v in labels)
    x = np.concatenate(xs).transpose(0, 2, 3, 1).copy()
    return x, ys


class CIFARLT(Dataset):
    """split: train (long-tailed), val (balanced hold-out of ``val_per_class`` training images per class,
    removed before the LT draw; empty when val_per_class == 0), test (the unchanged test set).
    With val_per_class == 0 the training subset is exactly the official one (seed 0)."""

    def __init__(self, root: str, num_classes: int = 10, split: str = "train", imb_factor: float = 100,
                 imb_type: str = "exp", seed: int = 0, val_per_class: int = 0, transform=None):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: allowed values are ['train', 'val', 'test']")
        self.num_classes = num_classes
        self.transform = transform
        x, y = load_cifar_pickles(root, num_classes, train=(split != "test"))
        if split == "test":
            self.data, self.targets = x, y
        else:
            held = holdout_per_class(y, val_per_class, num_classes, seed)
            if split == "val":
                self.data, self.targets = x[held], [y[i] for i in held]
            else:
                n_max = (len(y) // num_classes) - val_per_class
                counts = img_num_per_cls(n_max, num_classes, imb_factor, imb_type)
                keep = select_longtail(y, counts, seed=seed, exclude=held)
                self.data, self.targets = x[keep], [y[i] for i in keep]
        self.cls_num_list = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=num_classes).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]
