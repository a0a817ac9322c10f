"""Every recipe in configs/ parses and builds its objects (dataset paths mocked with tiny generated data);
config errors name the key and the allowed values."""
import functools
import glob
import os
import shutil

import pytest
import torch

from ltkernels.data import LTSampler, build_datasets
from ltkernels.data.synthetic import write_cifar_pickles, write_image_tree
from ltkernels.models import LTModel, build_model, make_backbone, make_head
from ltkernels.train import ConfigError, LossDriver, build_config, stage_configs
from ltkernels.train.config import load_yaml
from ltkernels.train.engine import prepare_stage, resolve_head
from ltkernels.train.schedule import lr_at

ROOT = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "*.yaml")) if not os.path.basename(p).startswith("_"))
CASES = [(p, m) for p in CONFIGS for m in sorted((load_yaml(p).get("methods") or {"default": None}))]


def test_config_set_is_complete():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert {"digits_lt", "cifar10_lt", "cifar100_lt", "imagenet_lt_r50", "imagenet_lt_x50", "inat2018_r50",
            "places_lt_r152"} <= names
    for p in CONFIGS:
        if os.path.basename(p) != "digits_lt.yaml":
            ms = set(load_yaml(p)["methods"])
            assert {"ce", "ldam_drw", "kps_ga", "fbl", "gcl", "la", "bs", "crt"} <= ms, p


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lt_data")
    write_cifar_pickles(str(root), 10, train_per_class=12, test_per_class=1)
    write_cifar_pickles(str(root), 100, train_per_class=3, test_per_class=1)
    lists = write_image_tree(str(root), [4, 2, 1], size=8)
    return str(root), lists


@functools.lru_cache(maxsize=None)
def backbone(arch, width):
    """One (meta-device) backbone per architecture: building ResNet-152 per recipe would dominate the test."""
    with torch.device("meta"):
        return make_backbone(arch, width=width)


def test_build_model_from_config():
    cfg = build_config(os.path.join(ROOT, "cifar10_lt.yaml"), ["method=ldam_drw"])
    m = build_model({**cfg["model"], "head": resolve_head(cfg)}, 10)
    assert type(m.head).__name__ == "NormedLinear" and m.backbone.out_features == 64


def mocked_overrides(path, fake):
    root, lists = fake
    d = load_yaml(path)["data"]
    ov = [f"data.root={root}", "train.tensorboard=false", "data.num_workers=0"]
    if d["dataset"] in ("cifar10_lt", "cifar100_lt"):
        ov += ["data.imb_factor=3"]
    elif d["dataset"] != "digits_lt":
        # the config's own list-file names, filled with the generated tiny tree (3 classes)
        for key, split in (("train_list", "train"), ("val_list", "val"), ("test_list", "test")):
            if d.get(key):
                shutil.copy(lists[split], os.path.join(root, d[key]))
        ov += [f"data.list_root={root}", "data.num_classes=3", "data.image_size=8", "data.verify=all"]
    return ov


@pytest.mark.parametrize("path,method", CASES, ids=[f"{os.path.basename(p)[:-5]}:{m}" for p, m in CASES])
def test_config_builds(path, method, fake_data):
    ov = mocked_overrides(path, fake_data) + ([f"method={method}"] if method != "default" else [])
    cfg = build_config(path, ov)
    ds = build_datasets(cfg["data"], cfg["seed"])
    counts = ds["cls_num_list"]
    assert all(c > 0 for c in counts)
    x, y = ds["train"][0]
    assert torch.is_tensor(x) and 0 <= y < ds["num_classes"]
    model = LTModel(backbone(cfg["model"]["arch"], cfg["model"]["width"]),
                    make_head(resolve_head(cfg), backbone(cfg["model"]["arch"], cfg["model"]["width"]).out_features,
                              ds["num_classes"], cfg["model"]["cosine_impl"]))
    for si, s in enumerate(stage_configs(cfg)):
        prepare_stage(model, s, si, ds["num_classes"])
        E = s["optim"]["epochs"]
        lrs = [lr_at(s["optim"], e) for e in range(E)]
        assert all(0 <= v <= s["optim"]["lr"] + 1e-12 for v in lrs)
        drv = LossDriver(s["loss"], counts, E, impl="reference")
        for e in sorted({0, E // 2, E - 1}):
            drv.set_epoch(e)
        C = ds["num_classes"]
        z = torch.randn(4, C).clamp(-1, 1) if drv.logit_scale != 1.0 else torch.randn(4, C)
        loss = drv(z, torch.rand(4, 6) + 0.1, torch.arange(4) % C)
        assert torch.isfinite(loss)
        LTSampler(ds["train"].targets, s["data"]["sampler"])
    if cfg.get("stage2"):
        assert len(stage_configs(cfg)) == 2


def test_overrides_and_method_presets():
    cfg = build_config(os.path.join(ROOT, "digits_lt.yaml"), ["method=gcl", "optim.epochs=12", "loss.params.s=25"])
    assert cfg["loss"]["name"] == "gcl" and cfg["loss"]["params"] == {"m": 0.0, "s": 25, "noise_mul": 0.5}
    assert cfg["optim"]["epochs"] == 12 and cfg["train"]["mixup_alpha"] == 1.0
    s2 = stage_configs(cfg)[1]
    assert s2["data"]["sampler"] == "class_balanced" and s2["loss"]["params"]["train_cls"] is True
    assert s2["optim"]["epochs"] == 10 and s2["head_init"] == "keep" and s2["freeze_backbone"] is True
    assert s2["data"]["batch_size"] == cfg["data"]["batch_size"]  # inherited


@pytest.mark.parametrize("override,pattern", [
    (["data.sampler=balanced"], r"data\.sampler='balanced'.*allowed values.*class_balanced"),
    (["loss.name=ldam-drw"], r"loss\.name='ldam-drw'.*allowed values.*ldam_drw"),
    (["optim.schedule=step"], r"optim\.schedule='step'.*allowed values.*multistep"),
    (["model.arch=resnet18"], r"model\.arch='resnet18'.*allowed values.*resnet32"),
    (["optim.lrr=0.1"], r"unknown config key 'optim\.lrr'.*allowed keys.*'lr'"),
    (["method=nope"], r"method='nope'.*allowed values.*gcl"),
    (["train.amp=fp8"], r"train\.amp='fp8'.*allowed values"),
    (["stage2.head_init=zero"], r"stage2.head_init='zero'.*allowed values"),
])
def test_config_errors_name_key_and_allowed_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(os.path.join(ROOT, "digits_lt.yaml"), override)


def test_bad_loss_params_name_the_key():
    cfg = build_config(os.path.join(ROOT, "digits_lt.yaml"), ["method=ldam_drw", "loss.params.margin=3"])
    with pytest.raises(ConfigError, match=r"loss\.params.*ldam_drw.*margin"):
        LossDriver(cfg["loss"], [5, 3, 1], 10, impl="reference")
