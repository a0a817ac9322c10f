"""Configuration: defaults, YAML loading (with ``base:`` includes), ``key=value`` overrides, method presets
and validation that names the offending key and its allowed values."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, Iterable, List

import yaml

from ..data import DATASETS, SAMPLER_KINDS
from ..models import ARCHS

LOSS_NAMES = ("ce", "ldam", "ldam_drw", "kps", "kps_ga", "la", "bs", "focal", "cb", "fbl", "gcl", "gcl_ang",
              "arcface", "cosface", "decoupled")


class ConfigError(ValueError):
    pass


DEFAULTS: Dict[str, Any] = {
    "name": "run",
    "method": None,          # key of `methods` applied on top of the base config
    "methods": {},           # named partial configs (the comparison command iterates over them)
    "seed": 0,
    "device": "auto",
    "num_threads": None,     # torch.set_num_threads (1 is fastest for the tiny digits model on a busy CPU)
    "output_dir": None,      # default runs/<name>
    "data": {
        "dataset": "digits_lt", "root": None, "list_root": None,
        "train_list": None, "val_list": None, "test_list": None, "num_classes": None,
        "imb_factor": 100, "imb_type": "exp", "n_max": None, "split_seed": 0,
        "val_per_class": 0, "test_per_class": 50, "image_size": 224, "color_jitter": 0.4,
        "verify": "first", "augment": True,
        "batch_size": 128, "eval_batch_size": 256, "num_workers": 0, "drop_last": False,
        "sampler": "instance", "class_aware_k": 4, "sampler_beta": 0.9999, "cben_a": 0.9999, "cben_b": 1e-5,
    },
    "model": {"arch": "digits_cnn", "head": "auto", "cosine_impl": "eager", "width": 32, "bn": True,
              "sync_bn": False, "pretrained": None},
    "loss": {"name": "ce", "impl": "fused", "params": {}, "drw": "auto", "drw_epoch": 160,
             "drw_beta": 0.9999, "ga_epoch": 120, "noise": "module"},
    "optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False, "epochs": 200,
              "warmup_epochs": 5, "schedule": "multistep", "milestones": [160, 180], "gamma": 0.1,
              "milestone_factors": None, "lr_min": 0.0, "grad_clip": None},
    "train": {"mixup_alpha": 0.0, "mixup_noise": "two", "amp": "none", "ref_check_every": 0, "ckpt_every_steps": 0,
              "resume": True, "progress": True, "tensorboard": True, "figures": True, "crash_at_step": None,
              "max_steps_per_epoch": None},
    "eval": {"many": 100, "few": 20, "ece_bins": 15, "every": 1, "logit_scale": "auto", "select": "val",
             "posthoc": "none", "tau": 1.0, "nc_metrics": False},
    "stage2": None,
}

# keys whose value must be one of a fixed set
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data.dataset": DATASETS,
    "data.imb_type": ("exp", "step", "none"),
    "data.sampler": SAMPLER_KINDS,
    "data.verify": ("none", "first", "all"),
    "model.arch": ARCHS,
    "model.head": ("auto", "linear", "cosine"),
    "model.cosine_impl": ("eager", "fused"),
    "loss.name": LOSS_NAMES,
    "loss.impl": ("reference", "fused"),
    "loss.drw": ("auto", True, False),
    "loss.noise": ("module", "injected"),
    "optim.schedule": ("multistep", "cosine", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.mixup_noise": ("two", "one"),
    "eval.select": ("val", "last"),
    "eval.posthoc": ("none", "tau_norm", "logit_adjust"),
    "stage2.head_init": ("keep", "reinit", "lws"),
    "stage2.init": ("last", "best"),
}
FREE_FORM = {"methods", "loss.params"}     # dicts whose keys are not checked
STAGE2_KEYS = {"data", "model", "loss", "optim", "train", "eval", "head_init", "init", "freeze_backbone"}
STAGE2_DEFAULTS = {"head_init": "keep", "init": "last", "freeze_backbone": True}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        # loss.params is replaced as a whole: constructor kwargs of one loss must not leak into another
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = cfg.pop("base", None)
    if base:
        bases = [base] if isinstance(base, str) else list(base)
        merged: dict = {}
        for b in bases:
            merged = deep_merge(merged, load_yaml(os.path.join(os.path.dirname(path), b)))
        cfg = deep_merge(merged, cfg)
    return cfg


def parse_overrides(items: Iterable[str]) -> List[tuple]:
    out = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r} must look like key.sub=value")
        k, v = it.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
    return out


def set_path(cfg: dict, key: str, value) -> None:
    parts = key.split(".")
    d = cfg
    for p in parts[:-1]:
        if d.get(p) is None:
            d[p] = {}
        if not isinstance(d[p], dict):
            raise ConfigError(f"override {key}: {p!r} is not a section")
        d = d[p]
    d[parts[-1]] = value


def _check(cfg: dict, ref: dict, prefix: str = "") -> None:
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if k not in ref:
            raise ConfigError(f"unknown config key {path!r}; allowed keys here: {sorted(ref)}")
        if path in FREE_FORM:
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{path} must be a mapping, got {v!r}")
            continue
        if isinstance(ref[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{path} must be a mapping with keys {sorted(ref[k])}, got {v!r}")
            _check(v, ref[k], path + ".")
        elif path in CHOICES and v not in CHOICES[path]:
            raise ConfigError(f"{path}={v!r}: allowed values are {list(CHOICES[path])}")


def validate(cfg: dict) -> dict:
    _check({k: v for k, v in cfg.items() if k != "stage2"}, DEFAULTS)
    s2 = cfg.get("stage2")
    if s2 is not None:
        if not isinstance(s2, dict):
            raise ConfigError("stage2 must be a mapping or null")
        for k, v in s2.items():
            if k not in STAGE2_KEYS:
                raise ConfigError(f"unknown config key 'stage2.{k}'; allowed keys here: {sorted(STAGE2_KEYS)}")
            if k in DEFAULTS and isinstance(DEFAULTS[k], dict):
                if not isinstance(v, dict):
                    raise ConfigError(f"stage2.{k} must be a mapping")
                _check(v, DEFAULTS[k], f"{k}.")
            elif f"stage2.{k}" in CHOICES and v not in CHOICES[f"stage2.{k}"]:
                raise ConfigError(f"stage2.{k}={v!r}: allowed values are {list(CHOICES['stage2.' + k])}")
    if cfg["optim"]["epochs"] < 1:
        raise ConfigError(f"optim.epochs must be >= 1, got {cfg['optim']['epochs']}")
    if cfg["loss"]["name"] == "fbl" and cfg["optim"]["epochs"] <= 10:
        raise ConfigError("loss.name=fbl needs optim.epochs > 10 (alpha(t) = (t/(T-10))^2)")
    return cfg


def build_config(path: str = None, overrides: Iterable[str] = (), base: dict = None) -> dict:
    """defaults ← YAML (with base includes) ← methods[method] ← key=value overrides; then validated."""
    user = load_yaml(path) if path else {}
    if base:
        user = deep_merge(base, user)
    ov = parse_overrides(overrides)
    method = user.get("method")
    for k, v in ov:
        if k == "method":
            method = v
    cfg = deep_merge(DEFAULTS, user)
    if method is not None:
        methods = cfg.get("methods") or {}
        if method not in methods:
            raise ConfigError(f"method={method!r}: allowed values are {sorted(methods)} (the config's 'methods')")
        cfg = deep_merge(cfg, methods[method])
        cfg["method"] = method
        if "name" not in (methods[method] or {}):
            cfg["name"] = f"{cfg['name']}_{method}"
    for k, v in ov:
        if k != "method":
            set_path(cfg, k, v)
    if not cfg.get("output_dir"):
        cfg["output_dir"] = os.path.join("runs", str(cfg["name"]))
    return validate(cfg)


def stage_configs(cfg: dict) -> List[dict]:
    """[stage-1 config] or [stage 1, stage 2]; stage 2 inherits everything not overridden."""
    stages = [cfg]
    if cfg.get("stage2"):
        s2 = deep_merge(STAGE2_DEFAULTS, cfg["stage2"])
        c2 = deep_merge({k: v for k, v in cfg.items() if k != "stage2"},
                        {k: v for k, v in s2.items() if k in DEFAULTS})
        for k in ("head_init", "init", "freeze_backbone"):
            c2[k] = s2[k]
        stages.append(c2)
    return stages
