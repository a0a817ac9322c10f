"""Tiny synthetic stand-ins for the real datasets (used by the tests and for smoke-testing configs):
CIFAR python-version pickles and an image tree with ImageNet-LT-style list files."""
from __future__ import annotations

import os
import pickle

import numpy as np


def write_cifar_pickles(root: str, num_classes: int = 10, train_per_class: int = 20, test_per_class: int = 4,
                        seed: int = 0) -> str:
    """Writes ``root/cifar-10-batches-py`` (5 train batches + test_batch + batches.meta) or
    ``root/cifar-100-python`` (train, test, meta) with random uint8 images; labels interleaved as in
    the real files (not sorted by class). Returns the directory written."""
    rng = np.random.RandomState(seed)

    def make(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(y)
        x = rng.randint(0, 256, size=(len(y), 3072), dtype=np.uint8)
        return x, y.tolist()

    xtr, ytr = make(train_per_class)
    xte, yte = make(test_per_class)
    if num_classes == 10:
        d = os.path.join(root, "cifar-10-batches-py")
        os.makedirs(d, exist_ok=True)
        parts = np.array_split(np.arange(len(ytr)), 5)
        for i, p in enumerate(parts, 1):
            with open(os.path.join(d, f"data_batch_{i}"), "wb") as f:
                pickle.dump({b"batch_label": f"training batch {i} of 5".encode(), b"labels": [ytr[j] for j in p],
                             b"data": xtr[p], b"filenames": [f"{j}.png".encode() for j in p]}, f)
        with open(os.path.join(d, "test_batch"), "wb") as f:
            pickle.dump({b"labels": yte, b"data": xte}, f)
        with open(os.path.join(d, "batches.meta"), "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    elif num_classes == 100:
        d = os.path.join(root, "cifar-100-python")
        os.makedirs(d, exist_ok=True)
        for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump({b"fine_labels": y, b"coarse_labels": [v // 5 for v in y], b"data": x}, f)
        with open(os.path.join(d, "meta"), "wb") as f:
            pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    else:
        raise ValueError("num_classes must be 10 or 100")
    return d


def write_image_tree(root: str, counts, splits=("train", "val", "test"), eval_per_class: int = 1, size: int = 12,
                     prefix: str = "", seed: int = 0) -> dict:
    """Writes PNGs ``root/<split>/c<k>/<i>.png`` and list files ``root/<prefix><split>.txt`` with
    ``<split>/c<k>/<i>.png <k>`` lines (``counts[k]`` images of class k for train, ``eval_per_class`` for
    the others). Returns {split: list file path}."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    lists = {}
    for split in splits:
        lines = []
        for k, n in enumerate(counts):
            m = n if split == "train" else eval_per_class
            os.makedirs(os.path.join(root, split, f"c{k}"), exist_ok=True)
            for i in range(m):
                rel = f"{split}/c{k}/{i}.png"
                Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(root, rel))
                lines.append(f"{rel} {k}")
        lists[split] = os.path.join(root, f"{prefix}{split}.txt")
        with open(lists[split], "w") as f:
            f.write("\n".join(lines) + "\n")
    return lists
