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
        drv.bind_head(model.head)  # the regularised losses' uniformity term acts on the head's weight
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


@pytest.mark.parametrize("override,pattern", [
    (["method=ldam_drw", "loss.params.max_n=3"], r"loss\.params\.max_n: not an argument of LDAMLoss.*did you mean "
                                                  r"'loss\.params\.max_m'"),
    (["method=gcl", "stage2.loss.params.noise_mull=1"], r"stage2\.loss\.params\.noise_mull.*GCLLoss.*noise_mul"),
    (["method=kps_ga", "loss.params.weighted=true"], r"loss\.params\.weighted.*not an argument"),  # set by the GA hook
    (["method=ldam_drw", "loss.params.weight=[1, 2]"], r"loss\.params\.weight.*set by DRW"),
    (["optim.lrr=0.1"], r"unknown config key 'optim\.lrr' \(did you mean 'optim\.lr'\?\)"),
    (["train.crash_at_step=3"], r"unknown config key 'train\.crash_at_step'"),   # a test hook, not a setting
    (["data.samplr=sqrt"], r"did you mean 'data\.sampler'"),
    (["data.sampler=class_balancd"], r"did you mean 'class_balanced'"),
    (["optim.lr=fast"], r"optim\.lr='fast' must be float"),
    (["optim.epochs=2.5"], r"optim\.epochs=2\.5 must be int"),
    (["optim.milestones=[1, x]"], r"optim\.milestones\[1\]='x' must be int"),
    (["train.compile=maybe"], r"train\.compile='maybe' must be bool"),
    (["data.prefetch_factor=0", "data.num_workers=2"], r"prefetch_factor >= 1"),
    (["loss=ce"], r"loss must be a mapping"),
])
def test_config_errors_before_any_data_is_read(monkeypatch, override, pattern):
    """Every key, loss arguments included (also those of stage 2), is checked by build_config: the closest
    valid name is suggested, and no dataset is touched."""
    import ltkernels.data as data_mod

    def no_data(*a, **k):
        raise AssertionError("data read before the config was checked")
    monkeypatch.setattr(data_mod, "build_datasets", no_data)
    with pytest.raises(ConfigError, match=pattern):
        build_config(os.path.join(ROOT, "digits_lt.yaml"), override)


def test_every_preset_is_checked(tmp_path):
    """A misspelt key in a preset that is not selected fails too, naming the preset."""
    (tmp_path / "r.yaml").write_text("base: digits_lt\nmethods:\n  mine:\n    loss: {name: la, params: {tua: 1}}\n"
                                     "  other:\n    optim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"methods\.mine\.loss\.params\.tua.*did you mean.*tau"):
        build_config(str(tmp_path / "r.yaml"), ["method=other"])
    (tmp_path / "s.yaml").write_text("base: digits_lt.yaml\nmethods:\n  mine:\n    optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'methods\.mine\.optim\.lrr'"):
        build_config(str(tmp_path / "s.yaml"), ["method=ce"])
    # a preset that sets loss.name without params keeps the recipe's (empty) params, as the merge does
    cfg = build_config(os.path.join(ROOT, "digits_lt.yaml"), ["method=gcl"])
    assert cfg["methods"]["bs"] == {"loss": {"name": "bs"}}


def test_numeric_strings_become_floats():
    cfg = build_config(os.path.join(ROOT, "digits_lt.yaml"), ["optim.lr=1e-3", "eval.logit_scale=1e1"])
    assert cfg["optim"]["lr"] == 0.001 and cfg["eval"]["logit_scale"] == 10.0


def test_recipes_found_by_name_from_any_directory(tmp_path, monkeypatch):
    from ltkernels.train.config import PACKAGE_CONFIGS, available_recipes, resolve_config
    monkeypatch.chdir(tmp_path)
    assert set(available_recipes()) == {os.path.basename(p)[:-5] for p in CONFIGS}
    for name in available_recipes():
        assert resolve_config(name) == os.path.join(PACKAGE_CONFIGS, name + ".yaml")
        assert build_config(name) == build_config(os.path.join(ROOT, name + ".yaml"))
    assert resolve_config("cifar10_lt.yaml") == os.path.join(PACKAGE_CONFIGS, "cifar10_lt.yaml")
    # a file in the working directory wins over a packaged recipe, and may take a packaged base by name
    (tmp_path / "cifar10_lt.yaml").write_text("base: cifar10_lt\noptim: {lr: 0.5}\n")
    assert build_config("cifar10_lt.yaml")["optim"]["lr"] == 0.5
    assert build_config("cifar10_lt")["optim"]["lr"] == 0.1    # a bare name is the packaged recipe
    (tmp_path / "cifar100_lt.yaml").write_text("base: cifar100_lt.yaml\noptim: {lr: 0.3}\n")   # not itself
    assert build_config("cifar100_lt.yaml")["optim"]["lr"] == 0.3
    with pytest.raises(ConfigError, match=r"'cifar10_ltt'.*did you mean 'cifar10_lt'"):
        build_config("cifar10_ltt")
    with pytest.raises(ConfigError, match=r"no such file"):
        build_config(str(tmp_path / "nope" / "x.yaml"))


def test_every_key_is_documented():
    """docs/harness.md holds the key table generated from the schema (ltk-train --config-keys), and every key
    of the merged defaults appears in it."""
    from ltkernels.train.config import DEFAULTS, schema_markdown, schema_rows
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "harness.md")).read()
    start, end = "<!-- config-keys:start -->\n", "\n<!-- config-keys:end -->"
    assert start in doc and end in doc
    assert doc.split(start, 1)[1].split(end, 1)[0] == schema_markdown(), \
        "regenerate the table: ltk-train --config-keys"
    keys = {r[0] for r in schema_rows()}

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k not in ("params", "methods"):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    assert set(flat(DEFAULTS)) - {"stage2"} <= keys
    assert {"stage2.head_init", "stage2.init", "stage2.freeze_backbone", "stage2.loss"} <= keys
