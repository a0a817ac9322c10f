"""Long-tailed datasets and samplers for the training harness.

``build_datasets(data_cfg, seed)`` returns a dict with ``train``, ``val`` (may be None), ``test``,
``num_classes`` and ``cls_num_list`` (training counts)."""
from __future__ import annotations

import os

from .cifar import CIFAR_MEAN, CIFAR_STD, CIFARLT, load_cifar_pickles
from .digits import DigitsLT
from .listfile import IMAGENET_MEAN, IMAGENET_STD, KNOWN_SIZES, ListFileDataset, read_list_file
from .longtail import class_counts, img_num_per_cls, select_longtail, shot_groups
from .samplers import SAMPLER_KINDS, LTSampler, sampler_class_weights

DATASETS = ("digits_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt", "places_lt", "inat2018")

__all__ = ["DATASETS", "SAMPLER_KINDS", "CIFARLT", "DigitsLT", "ListFileDataset", "LTSampler",
           "build_datasets", "img_num_per_cls", "select_longtail", "shot_groups", "sampler_class_weights",
           "class_counts", "load_cifar_pickles", "read_list_file"]


def cifar_transforms(train: bool):
    import torchvision.transforms as T
    norm = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if train:
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + norm)
    return T.Compose(norm)


def imagenet_transforms(train: bool, image_size: int = 224, resize: int = None, color_jitter: float = 0.4):
    """Standard ImageNet-style augmentation (decoupling / official LT repos)."""
    import torchvision.transforms as T
    resize = resize or int(round(image_size * 256 / 224))
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        aug = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
        if color_jitter:
            aug.append(T.ColorJitter(color_jitter, color_jitter, color_jitter, 0))
        return T.Compose(aug + norm)
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size)] + norm)


def _list_path(d, key):
    p = d.get(key)
    if p and not os.path.isabs(p) and d.get("list_root"):
        p = os.path.join(d["list_root"], p)
    return p


def build_datasets(d: dict, seed: int = 0) -> dict:
    """``d`` is the ``data`` section of a config (see ltkernels/train/config.py for keys and defaults)."""
    name = d["dataset"]
    if name == "digits_lt":
        kw = dict(imb_factor=d["imb_factor"], imb_type=d["imb_type"], n_max=d.get("n_max") or 100,
                  test_per_class=d.get("test_per_class", 50), val_per_class=d.get("val_per_class", 10),
                  seed=d.get("split_seed", 0))
        train = DigitsLT("train", **kw, augment=d.get("augment", True))
        val = DigitsLT("val", **kw) if kw["val_per_class"] else None
        test = DigitsLT("test", **kw)
        C = 10
    elif name in ("cifar10_lt", "cifar100_lt"):
        C = 10 if name == "cifar10_lt" else 100
        if not d.get("root"):
            raise ValueError(f"data.root is required for dataset {name!r} (folder with the CIFAR python pickles)")
        kw = dict(root=d["root"], num_classes=C, imb_factor=d["imb_factor"], imb_type=d["imb_type"],
                  seed=d.get("split_seed", 0), val_per_class=d.get("val_per_class", 0))
        train = CIFARLT(split="train", transform=cifar_transforms(d.get("augment", True)), **kw)
        val = CIFARLT(split="val", transform=cifar_transforms(False), **kw) if kw["val_per_class"] else None
        test = CIFARLT(split="test", transform=cifar_transforms(False), **kw)
    elif name in ("imagenet_lt", "places_lt", "inat2018"):
        C = d.get("num_classes") or KNOWN_SIZES[name]["classes"]
        root = d.get("root")
        size = d.get("image_size", 224)
        verify = d.get("verify", "first")
        mk = lambda key, train_: ListFileDataset(  # noqa: E731
            root, _list_path(d, key), imagenet_transforms(train_ and d.get("augment", True), size,
                                                          color_jitter=d.get("color_jitter", 0.4)),
            num_classes=C, verify=verify, key=f"data.{key}")
        train = mk("train_list", True)
        val = mk("val_list", False) if d.get("val_list") else None
        test = mk("test_list", False)
    else:
        raise ValueError(f"data.dataset={name!r}: allowed values are {list(DATASETS)}")
    return {"train": train, "val": val, "test": test, "num_classes": C, "cls_num_list": list(train.cls_num_list)}
