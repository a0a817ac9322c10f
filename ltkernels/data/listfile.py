"""ImageNet-LT / Places-LT / iNaturalist 2018 from list files of ``relative/path label`` lines (§7)."""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Known sizes of the standard releases (train / val / test lines), used only for a warning.
KNOWN_SIZES = {
    "imagenet_lt": {"train": 115846, "val": 20000, "test": 50000, "classes": 1000},
    "places_lt": {"train": 62500, "val": 7300, "test": 36500, "classes": 365},
    "inat2018": {"train": 437513, "test": 24426, "classes": 8142},
}


def read_list_file(list_file: str, key: str = "list file") -> List[Tuple[str, int]]:
    if not list_file:
        raise ValueError(f"{key} is not set: give the path of a 'relative/path label' list file")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"{key}: list file not found: {list_file!r}")
    items = []
    with open(list_file) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{ln}: expected 'relative/path label', got {line!r}")
            try:
                items.append((parts[0], int(parts[1])))
            except ValueError:
                raise ValueError(f"{list_file}:{ln}: label is not an integer in {line!r}") from None
    if not items:
        raise ValueError(f"{key}: list file {list_file!r} is empty")
    return items


class ListFileDataset(Dataset):
    """Images under ``root`` listed in ``list_file``. ``verify``: 'none', 'first' (check the first entry at
    construction) or 'all' (stat every file and list the missing ones). A file missing at load time raises
    FileNotFoundError naming the file, the root and the list file."""

    def __init__(self, root: str, list_file: str, transform=None, num_classes: int = None, verify: str = "first",
                 key: str = "list file"):
        if verify not in ("none", "first", "all"):
            raise ValueError(f"data.verify={verify!r}: allowed values are ['none', 'first', 'all']")
        if not root or not os.path.isdir(root):
            raise FileNotFoundError(f"data.root: image root is not a directory: {root!r}")
        self.root, self.list_file, self.transform = root, list_file, transform
        items = read_list_file(list_file, key)
        self.paths = [p for p, _ in items]
        self.targets = [t for _, t in items]
        self.num_classes = int(num_classes) if num_classes else max(self.targets) + 1
        bad = [t for t in self.targets if not 0 <= t < self.num_classes]
        if bad:
            raise ValueError(f"{list_file}: label {bad[0]} outside [0, {self.num_classes})")
        if verify != "none":
            check = self.paths if verify == "all" else self.paths[:1]
            missing = [p for p in check if not os.path.isfile(os.path.join(root, p))]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) listed in {list_file!r} are missing under root {root!r}, "
                    f"e.g. {os.path.join(root, missing[0])!r} (check data.root against the list file's "
                    f"path layout; releases differ, e.g. 'train/n01440764/x.JPEG' vs 'n01440764/x.JPEG')")
        self.cls_num_list = np.bincount(np.asarray(self.targets), minlength=self.num_classes).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        path = os.path.join(self.root, self.paths[i])
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image missing: {path!r} (line {i + 1} of {self.list_file!r}, "
                                    f"root {self.root!r})") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]
