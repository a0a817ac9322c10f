"""Datasets of the harness: CIFAR-LT split counts, list-file datasets, digits-LT (CPU, tiny generated data)."""
import os
import pickle

import numpy as np
import pytest
import torch

from ltkernels.data import (CIFARLT, DigitsLT, ListFileDataset, build_datasets, img_num_per_cls,
                            read_list_file)
from ltkernels.data.synthetic import write_cifar_pickles, write_image_tree


# ---------------------------------------------------------------- long-tail formula
def test_cifar_lt_published_sizes():
    # Published training-set sizes of CIFAR-10/100-LT (Cao et al. 2019, Cui et al. 2019).
    assert sum(img_num_per_cls(5000, 10, 100)) == 12406
    assert sum(img_num_per_cls(5000, 10, 50)) == 13996
    assert sum(img_num_per_cls(5000, 10, 10)) == 20431
    assert sum(img_num_per_cls(500, 100, 100)) == 10847
    assert sum(img_num_per_cls(500, 100, 10)) == 19573
    n = img_num_per_cls(5000, 10, 100)
    assert n[0] == 5000 and n[-1] == 50
    # official form of the argument (ratio 0.01) gives the same counts
    assert img_num_per_cls(5000, 10, 0.01) == n


def test_step_profile():
    assert img_num_per_cls(500, 10, 10, "step") == [500] * 5 + [50] * 5
    with pytest.raises(ValueError, match="imb_type"):
        img_num_per_cls(500, 10, 10, "linear")


# ---------------------------------------------------------------- CIFAR pickles
def _official_selection(targets, counts, seed=0):
    """LDAM-DRW ``gen_imbalanced_data`` written out independently."""
    np.random.seed(seed)
    t = np.array(targets)
    keep = []
    for c, n in zip(np.unique(t), counts):
        idx = np.where(t == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[:n].tolist())
    return keep


@pytest.mark.parametrize("C", [10, 100])
def test_cifar_lt_counts_and_official_selection(tmp_path, C):
    per = 30 if C == 10 else 6
    write_cifar_pickles(str(tmp_path), C, train_per_class=per, test_per_class=2)
    IF = 10 if C == 10 else 3
    ds = CIFARLT(str(tmp_path), C, "train", imb_factor=IF)
    expect = [int(per * (1 / IF) ** (i / (C - 1))) for i in range(C)]
    assert ds.cls_num_list == expect
    assert len(ds) == sum(expect)
    # exactly the official subset (same images, same order)
    d = os.path.join(tmp_path, "cifar-10-batches-py" if C == 10 else "cifar-100-python")
    xs, ys = [], []
    for f in ([f"data_batch_{i}" for i in range(1, 6)] if C == 10 else ["train"]):
        with open(os.path.join(d, f), "rb") as fh:
            e = pickle.load(fh, encoding="bytes")
        xs.append(e[b"data"])
        ys += list(e[b"labels" if C == 10 else b"fine_labels"])
    x = np.concatenate(xs).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    keep = _official_selection(ys, expect)
    assert np.array_equal(ds.data, x[keep])
    assert ds.targets == [ys[i] for i in keep]
    test = CIFARLT(str(tmp_path), C, "test", imb_factor=IF)
    assert len(test) == 2 * C and test.cls_num_list == [2] * C
    img, label = ds[0]
    assert img.size == (32, 32)


def test_cifar_val_holdout_disjoint(tmp_path):
    write_cifar_pickles(str(tmp_path), 10, train_per_class=30, test_per_class=1)
    kw = dict(root=str(tmp_path), num_classes=10, imb_factor=5, val_per_class=4)
    tr, va = CIFARLT(split="train", **kw), CIFARLT(split="val", **kw)
    assert va.cls_num_list == [4] * 10
    assert tr.cls_num_list[0] == 26 and tr.cls_num_list[-1] == int(26 * 0.2)
    rows = lambda a: {a[i].tobytes() for i in range(len(a))}  # noqa: E731
    assert not rows(tr.data) & rows(va.data)


def test_cifar_missing_files_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFARLT(str(tmp_path), 10, "train")
    write_cifar_pickles(str(tmp_path), 10, train_per_class=5, test_per_class=1)
    os.remove(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3"))
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFARLT(str(tmp_path), 10, "train")


# ---------------------------------------------------------------- list files
def test_list_file_dataset_loads_tree(tmp_path):
    counts = [5, 3, 1]
    lists = write_image_tree(str(tmp_path), counts, size=12)
    cfg = {"dataset": "imagenet_lt", "root": str(tmp_path), "train_list": lists["train"],
           "val_list": lists["val"], "test_list": lists["test"], "num_classes": 3, "image_size": 8,
           "verify": "all"}
    d = build_datasets(cfg)
    assert d["cls_num_list"] == counts and len(d["val"]) == 3 and len(d["test"]) == 3
    x, y = d["train"][len(d["train"]) - 1]
    assert tuple(x.shape) == (3, 8, 8) and y == 2
    x, _ = d["test"][0]
    assert tuple(x.shape) == (3, 8, 8)


def test_list_file_missing_image_reported(tmp_path):
    lists = write_image_tree(str(tmp_path), [2, 2], splits=("train",))
    os.remove(os.path.join(tmp_path, "train", "c1", "1.png"))
    with pytest.raises(FileNotFoundError, match=r"c1/1\.png"):
        ListFileDataset(str(tmp_path), lists["train"], verify="all")
    ds = ListFileDataset(str(tmp_path), lists["train"], verify="first")  # first entry exists
    with pytest.raises(FileNotFoundError, match=r"image missing: .*c1/1\.png.*line 4"):
        ds[3]
    with pytest.raises(FileNotFoundError, match="list file not found"):
        ListFileDataset(str(tmp_path), str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="image root"):
        ListFileDataset(str(tmp_path / "missing_root"), lists["train"])


def test_list_file_bad_line(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a.png 0\nb.png x\n")
    with pytest.raises(ValueError, match=r"l.txt:2"):
        read_list_file(str(p))


# ---------------------------------------------------------------- digits
def test_digits_lt_splits():
    tr, va, te = DigitsLT("train"), DigitsLT("val"), DigitsLT("test")
    assert tr.cls_num_list == [int(100 * (1 / 20) ** (i / 9)) for i in range(10)]
    assert tr.cls_num_list[0] == 100 and tr.cls_num_list[-1] == 5
    assert va.cls_num_list == [10] * 10 and te.cls_num_list == [50] * 10
    # no image shared between train and test (digits has no exact duplicates across these splits)
    a = {tuple(v.flatten().tolist()) for v in tr.data}
    b = {tuple(v.flatten().tolist()) for v in te.data}
    assert len(a & b) == 0
    x, y = tr[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    # the same seed gives the same split, another seed another one
    assert torch.equal(DigitsLT("train").data, tr.data)
    assert not torch.equal(DigitsLT("train", seed=1).data, tr.data)
