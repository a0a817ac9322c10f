"""Configuration: a typed schema (dataclasses below: every key, its type, default and meaning), recipes found by
name in the package (``ltkernels/configs``) or by path, YAML ``base:`` includes, method presets, ``key=value``
overrides, and validation of every key -- loss constructor arguments included -- before any data is read.

Merge order: schema defaults <- YAML (with its bases) <- ``methods[method]`` <- command-line overrides.
``ltk-train --config-keys`` prints the key table of docs/harness.md.

The schema is plain dataclasses plus a small checker rather than OmegaConf structured configs: the recipes
need ``Literal`` choices, a mixed ``"auto" | true | false`` key, partial sections (``stage2``, ``methods``)
and suggestions for misspelt keys, none of which OmegaConf 2.3 validates; wrapping it would not be shorter."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Literal, Optional, Union

import yaml

from ..data import DATASETS, SAMPLER_KINDS
from ..models import ARCHS

LOSS_NAMES = ("ce", "ldam", "ldam_drw", "kps", "kps_ga", "la", "bs", "focal", "cb", "fbl", "gcl", "gcl_ang",
              "arcface", "cosface", "decoupled")
PACKAGE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    pass


def _k(default, doc: str):
    """A schema field: its default and the one-line description docs/harness.md shows."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# ---------------------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    dataset: Literal[DATASETS] = _k("digits_lt", "which long-tailed dataset")
    root: Optional[str] = _k(None, "image root (CIFAR: folder with the python pickles)")
    list_root: Optional[str] = _k(None, "folder the *_list files are relative to")
    train_list: Optional[str] = _k(None, "`relative/path label` list of the training images")
    val_list: Optional[str] = _k(None, "validation list (none: no validation split)")
    test_list: Optional[str] = _k(None, "test list")
    num_classes: Optional[int] = _k(None, "number of classes of a list-file dataset (none: the known size)")
    imb_factor: float = _k(100, "imbalance factor n_max / n_min (CIFAR, digits)")
    imb_type: Literal["exp", "step", "none"] = _k("exp", "long-tail profile")
    n_max: Optional[int] = _k(None, "images of the largest class (digits; none: 100)")
    split_seed: int = _k(0, "seed of the long-tail subset and the held-out splits")
    val_per_class: int = _k(0, "balanced validation images per class held out of the training set")
    test_per_class: int = _k(50, "test images per class (digits)")
    image_size: int = _k(224, "crop size of list-file datasets")
    color_jitter: float = _k(0.4, "ColorJitter strength of list-file training images (0: off)")
    verify: Literal["none", "first", "all"] = _k("first", "check list-file images exist up front")
    augment: bool = _k(True, "training augmentation")
    batch_size: int = _k(128, "global training batch (split over DDP ranks)")
    eval_batch_size: int = _k(256, "per-rank evaluation batch")
    num_workers: int = _k(0, "DataLoader worker processes (0: load in the training process)")
    persistent_workers: bool = _k(False, "keep the workers alive across epochs (only with num_workers > 0)")
    prefetch_factor: Optional[int] = _k(None, "batches each worker loads ahead (none: torch's 2; only with "
                                              "num_workers > 0)")
    drop_last: bool = _k(False, "drop the last incomplete training batch")
    sampler: Literal[SAMPLER_KINDS] = _k("instance", "training sampler (ltkernels.data.LTSampler)")
    class_aware_k: int = _k(4, "class_aware sampler: samples per class visit")
    sampler_beta: float = _k(0.9999, "effective_number sampler: beta")
    cben_a: float = _k(0.9999, "cben sampler: a")
    cben_b: float = _k(1e-5, "cben sampler: b")


@dataclass
class ModelConfig:
    arch: Literal[ARCHS] = _k("digits_cnn", "backbone")
    head: Literal["auto", "linear", "cosine"] = _k("auto", "classifier (auto: cosine for margin losses)")
    cosine_impl: Literal["eager", "fused"] = _k("eager", "cosine head: eager or ltkernels.NormedLinear")
    width: int = _k(32, "channels of digits_cnn")
    bn: bool = _k(True, "BatchNorm in digits_cnn")
    sync_bn: bool = _k(False, "SyncBatchNorm under DDP on GPUs (ignored, with a note, on CPU or one process)")
    channels_last: bool = _k(False, "model and 4-d inputs in channels_last memory format")
    pretrained: Optional[str] = _k(None, "local state dict loaded into the backbone (nothing is downloaded)")


@dataclass
class LossConfig:
    name: Literal[LOSS_NAMES] = _k("ce", "loss (ltkernels/train/loss_factory.py: SPECS)")
    impl: Literal["reference", "fused"] = _k("fused", "ltkernels.losses (fused) or ltkernels.reference (eager)")
    params: Dict[str, Any] = _k({}, "constructor keyword arguments, checked against the loss's signature; a "
                                    "preset replaces them as a whole")
    drw: Literal["auto", True, False] = _k("auto", "deferred re-weighting (auto: on for ldam_drw)")
    drw_epoch: int = _k(160, "epoch DRW starts")
    drw_beta: float = _k(0.9999, "class-balanced beta of the DRW weights")
    ga_epoch: int = _k(120, "kps_ga: epoch the gradient adjustment starts")
    noise: Literal["module", "injected"] = _k("module", "GCL noise drawn by the loss, or a function of "
                                                        "(seed, step)")


@dataclass
class OptimConfig:
    lr: float = _k(0.1, "SGD learning rate")
    momentum: float = _k(0.9, "SGD momentum")
    weight_decay: float = _k(2e-4, "SGD weight decay")
    nesterov: bool = _k(False, "Nesterov momentum")
    epochs: int = _k(200, "epochs of the stage")
    warmup_epochs: int = _k(5, "linear warm-up epochs")
    schedule: Literal["multistep", "cosine", "constant"] = _k("multistep", "learning-rate schedule")
    milestones: List[int] = _k([160, 180], "multistep: epochs the rate drops")
    gamma: float = _k(0.1, "multistep: factor per milestone")
    milestone_factors: Optional[List[float]] = _k(None, "multistep: absolute factor after each milestone "
                                                        "(instead of gamma)")
    lr_min: float = _k(0.0, "cosine: final rate")
    grad_clip: Optional[float] = _k(None, "clip the gradient norm to this")


@dataclass
class TrainConfig:
    mixup_alpha: float = _k(0.0, "mixup Beta(alpha, alpha) (0: off)")
    mixup_noise: Literal["two", "one"] = _k("two", "GCL under mixup: a noise draw per term, or one shared")
    amp: Literal["none", "bf16", "fp16"] = _k("none", "autocast dtype of the forward (the loss stays fp32)")
    compile: bool = _k(False, "torch.compile the backbone (state-dict keys unchanged)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _k(
        "default", "torch.compile mode")
    compile_backend: str = _k("inductor", "torch.compile backend")
    log_every: int = _k(0, "steps between reads of the running loss (non-finite check, TensorBoard); "
                           "0: once per epoch")
    ref_check_every: int = _k(0, "steps between fused-vs-reference loss checks (0: off)")
    ckpt_every_steps: int = _k(0, "steps between mid-epoch checkpoints (0: per epoch only)")
    resume: bool = _k(True, "resume from output_dir/checkpoint.pt")
    progress: bool = _k(True, "tqdm progress bar")
    tensorboard: bool = _k(True, "TensorBoard logs in output_dir/tb")
    figures: bool = _k(True, "per-class accuracy and feature-norm figures")
    max_steps_per_epoch: Optional[int] = _k(None, "cut every epoch after this many steps")


@dataclass
class EvalConfig:
    many: int = _k(100, "many-shot: more training images than this")
    few: int = _k(20, "few-shot: fewer training images than this")
    ece_bins: int = _k(15, "ECE bins")
    every: int = _k(1, "epochs between evaluations (0: only at the end)")
    logit_scale: Union[Literal["auto"], float] = _k("auto", "scale of the head output for calibration "
                                                            "(auto: the loss's s)")
    select: Literal["val", "last"] = _k("val", "model reported: best validation epoch, or last")
    posthoc: Literal["none", "tau_norm", "logit_adjust"] = _k("none", "post-hoc logit correction")
    tau: float = _k(1.0, "tau of the post-hoc correction")
    nc_metrics: bool = _k(False, "neural-collapse statistics of the features")


@dataclass
class Stage2Config:
    """A second stage: any section given here overrides stage 1's (sections are partial)."""
    head_init: Literal["keep", "reinit", "lws"] = _k("keep", "head from stage 1, re-initialised (cRT) or "
                                                             "with learnable scales (LWS)")
    init: Literal["last", "best"] = _k("last", "start from stage 1's last or best-validation model")
    freeze_backbone: bool = _k(True, "freeze the backbone (kept in eval mode)")
    data: Optional[DataConfig] = _k(None, "partial data section")
    model: Optional[ModelConfig] = _k(None, "partial model section")
    loss: Optional[LossConfig] = _k(None, "partial loss section")
    optim: Optional[OptimConfig] = _k(None, "partial optim section")
    train: Optional[TrainConfig] = _k(None, "partial train section")
    eval: Optional[EvalConfig] = _k(None, "partial eval section")


@dataclass
class Config:
    name: str = _k("run", "run name (output directory runs/<name>)")
    method: Optional[str] = _k(None, "key of `methods` applied on top of the recipe")
    methods: Dict[str, Any] = _k({}, "named partial configs (each checked like the whole)")
    seed: int = _k(0, "seed of initialisation, sampling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = _k("auto", "auto: cuda when available")
    num_threads: Optional[int] = _k(None, "torch.set_num_threads")
    output_dir: Optional[str] = _k(None, "run directory (none: runs/<name>)")
    data: DataConfig = _k(DataConfig(), "dataset, splits, loader")
    model: ModelConfig = _k(ModelConfig(), "backbone and head")
    loss: LossConfig = _k(LossConfig(), "loss and its epoch hooks")
    optim: OptimConfig = _k(OptimConfig(), "optimizer and schedule")
    train: TrainConfig = _k(TrainConfig(), "loop options")
    eval: EvalConfig = _k(EvalConfig(), "evaluation")
    stage2: Optional[Stage2Config] = _k(None, "optional second stage")


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        v = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = _defaults(type(v)) if dataclasses.is_dataclass(v) else copy.deepcopy(v)
    return out


DEFAULTS: Dict[str, Any] = _defaults(Config)
STAGE2_DEFAULTS = {k: v for k, v in _defaults(Stage2Config).items() if v is not None}
_HINTS = {c: typing.get_type_hints(c) for c in (DataConfig, ModelConfig, LossConfig, OptimConfig, TrainConfig,
                                                EvalConfig, Stage2Config, Config)}


# ---------------------------------------------------------------------------------------------------------
# checking
# ---------------------------------------------------------------------------------------------------------
def _closest(word: str, options: Iterable[str], prefix: str = "") -> str:
    m = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {prefix + m[0]!r}?)" if m else ""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in args)
    if origin is Union:
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, List):
        return f"list of {_type_name(args[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _check_value(path: str, v, tp):
    """``v`` checked against the type ``tp``; returns it, with a numeric string (YAML reads ``1e-3`` as one)
    turned into a float where a float is expected. Raises ConfigError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return v
    if origin is Union:
        if v is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _check_value(path, v, a)
            except ConfigError as e:
                errors.append(e)
        # a choice error (it names the allowed values) is the most useful of the alternatives'
        raise next((e for e in errors if "allowed values" in str(e)), errors[0])
    if origin is Literal:
        if any(v == a and type(v) is type(a) for a in args):
            return v
        raise ConfigError(f"{path}={v!r}: allowed values are {list(args)}{_closest(v, args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise ConfigError(f"{path} must be a mapping with keys {sorted(_HINTS[tp])}, got {v!r}")
        return check_section(v, tp, path + ".")
    if origin in (list, List):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{path} must be a {_type_name(tp)}, got {v!r}")
        return [_check_value(f"{path}[{i}]", x, args[0]) for i, x in enumerate(v)]
    if origin in (dict, Dict):
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ConfigError(f"{path} must be a mapping, got {v!r}")
        return v
    if tp is bool:
        if isinstance(v, bool):
            return v
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
    raise ConfigError(f"{path}={v!r} must be {_type_name(tp)}")


def check_section(d: dict, cls, prefix: str = "") -> dict:
    """Checks the keys present in ``d`` (a possibly partial section) against the dataclass ``cls``; unknown keys
    name the closest valid one. Returns a checked copy."""
    hints = _HINTS[cls]
    out = {}
    for k, v in d.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{prefix}{k}'{_closest(k, hints, prefix)}; allowed keys here: "
                              f"{sorted(hints)}")
        out[k] = _check_value(f"{prefix}{k}", v, hints[k])
    return out


def loss_arguments(name: str) -> Dict[str, inspect.Parameter]:
    """The keyword arguments ``loss.params`` may set for loss ``name``: its constructor's parameters less the
    class counts, and less those the harness itself sets (DRW weights, the GA switch, the regulariser's
    implementation and weight layout)."""
    from .loss_factory import REGULARISED, SPECS
    if name not in SPECS:
        raise ConfigError(f"loss.name={name!r}: allowed values are {list(LOSS_NAMES)}{_closest(name, LOSS_NAMES)}")
    cls_name = SPECS[name][0]
    if cls_name in REGULARISED:
        from .. import regularisers as mod
    else:
        from .. import reference as mod   # same signatures as ltkernels.losses, and no compiled extension needed
    sig = inspect.signature(getattr(mod, cls_name).__init__)
    managed = {"self", "cls_num_list"} | ({"weighted"} if name == "kps_ga" else set()) | \
        ({"impl", "weight_layout"} if cls_name in REGULARISED else set())
    return {k: p for k, p in sig.parameters.items() if k not in managed
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_loss_params(loss: dict, path: str = "loss") -> None:
    from .loss_factory import SPECS
    name, params = loss.get("name"), loss.get("params") or {}
    allowed = loss_arguments(name)
    for k in params:
        if k not in allowed:
            raise ConfigError(f"{path}.params.{k}: not an argument of {SPECS[name][0]} (loss.name={name!r})"
                              f"{_closest(k, allowed, path + '.params.')}; its arguments: {sorted(allowed)}")
    drw = loss.get("drw", "auto")
    if "weight" in params and (drw is True or (drw == "auto" and name == "ldam_drw")):
        raise ConfigError(f"{path}.params.weight: the weights are set by DRW (loss.drw) for loss.name={name!r}")


def _check_preset(key: str, preset, base: dict) -> None:
    """A method preset: a partial config (any section, a stage2), whose loss arguments fit its loss."""
    if not isinstance(preset, dict):
        raise ConfigError(f"methods.{key} must be a mapping, got {preset!r}")
    for bad in ("method", "methods"):
        if bad in preset:
            raise ConfigError(f"methods.{key}.{bad}: a preset cannot select or define presets")
    checked = check_section(preset, Config, f"methods.{key}.")
    loss = {**base["loss"], **(checked.get("loss") or {})}
    if "params" not in (checked.get("loss") or {}):
        loss["params"] = base["loss"].get("params") or {}
    check_loss_params(loss, f"methods.{key}.loss")
    s2 = checked.get("stage2")
    if s2 and s2.get("loss"):
        l2 = {**loss, **s2["loss"]}
        if "params" not in s2["loss"]:
            l2["params"] = loss["params"]
        check_loss_params(l2, f"methods.{key}.stage2.loss")


def validate(cfg: dict, presets_base: Optional[dict] = None) -> dict:
    """Checks every key of a merged config (type, allowed values, loss arguments, every preset of ``methods``
    as merged onto ``presets_base``, the config before its method was applied) and the rules between keys;
    returns the checked config. Nothing here reads data."""
    cfg = check_section(cfg, Config)
    for k, v in DEFAULTS.items():   # a config given as a dict (not through build_config) may lack sections
        cfg.setdefault(k, copy.deepcopy(v))
    base = deep_merge(DEFAULTS, presets_base) if presets_base is not None else cfg
    for key, preset in (cfg.get("methods") or {}).items():
        _check_preset(key, preset, base)
    for si, s in enumerate(stage_configs(cfg)):
        where = "loss" if si == 0 else "stage2.loss"
        check_loss_params(s["loss"], where)
        o = s["optim"]
        if o["epochs"] < 1:
            raise ConfigError(f"{'' if si == 0 else 'stage2.'}optim.epochs must be >= 1, got {o['epochs']}")
        if s["loss"]["name"] == "fbl" and o["epochs"] <= 10:
            raise ConfigError("loss.name=fbl needs optim.epochs > 10 (alpha(t) = (t/(T-10))^2)")
        if o.get("milestone_factors") is not None and len(o["milestone_factors"]) != len(o["milestones"]):
            raise ConfigError("optim.milestone_factors must have one entry per optim.milestones entry")
        for key in ("batch_size", "eval_batch_size"):
            if s["data"][key] < 1:
                raise ConfigError(f"data.{key} must be >= 1, got {s['data'][key]}")
        if s["data"]["num_workers"] < 0 or (s["data"]["prefetch_factor"] is not None and s["data"]["prefetch_factor"] < 1):
            raise ConfigError("data.num_workers must be >= 0 and data.prefetch_factor >= 1")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# files, merging, overrides
# ---------------------------------------------------------------------------------------------------------
def available_recipes() -> List[str]:
    """Names of the recipes shipped in the package (``--config <name>``)."""
    if not os.path.isdir(PACKAGE_CONFIGS):
        return []
    return sorted(f[:-5] for f in os.listdir(PACKAGE_CONFIGS) if f.endswith(".yaml") and not f.startswith("_"))


def resolve_config(name_or_path: str, relative_to: Optional[str] = None, including: Optional[str] = None) -> str:
    """A recipe file: ``name_or_path`` as a path (relative to ``relative_to``, else the working directory), or
    else the packaged recipe of that name (``cifar10_lt`` or ``cifar10_lt.yaml``). ``including``: the file
    whose ``base:`` this is (a file never includes itself: ``base: cifar10_lt.yaml`` in a local
    ``cifar10_lt.yaml`` is the packaged one)."""
    p = os.path.join(relative_to, name_or_path) if relative_to and not os.path.isabs(name_or_path) else name_or_path
    if os.path.isfile(p) and not (including and os.path.samefile(p, including)):
        return p
    base = os.path.basename(name_or_path)
    name = base[:-5] if base.endswith(".yaml") else base
    packaged = os.path.join(PACKAGE_CONFIGS, name + ".yaml")
    if os.path.isfile(packaged) and (os.sep not in name_or_path or not os.path.exists(os.path.dirname(p))):
        return packaged
    names = available_recipes()
    raise ConfigError(f"config {name_or_path!r}: no such file, nor a packaged recipe{_closest(name, names)}; "
                      f"packaged recipes: {names}")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        # loss.params is replaced as a whole: constructor kwargs of one loss must not leak into another
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "params":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str, relative_to: Optional[str] = None, including: Optional[str] = None) -> dict:
    """A recipe (path or packaged name) with its ``base:`` includes merged in (a base is looked up next to
    the including file first, then among the packaged recipes)."""
    path = resolve_config(path, relative_to, including)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = cfg.pop("base", None)
    if base:
        merged: dict = {}
        for b in [base] if isinstance(base, str) else list(base):
            merged = deep_merge(merged, load_yaml(b, os.path.dirname(path), path))
        cfg = deep_merge(merged, cfg)
    return cfg


def parse_overrides(items: Iterable[str]) -> List[tuple]:
    out = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override {it!r} must look like key.sub=value")
        k, v = it.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {it!r}: the value is not valid YAML ({e})") from e
    return out


def set_path(cfg: dict, key: str, value) -> None:
    parts = key.split(".")
    d = cfg
    for i, p in enumerate(parts[:-1]):
        if d.get(p) is None:
            d[p] = {}
        if not isinstance(d[p], dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])!r} is not a section")
        d = d[p]
    d[parts[-1]] = value


def build_config(path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> dict:
    """defaults <- YAML (a path or a packaged recipe name, with base includes) <- methods[method] <- key=value
    overrides; then validated (:func:`validate`)."""
    user = load_yaml(path) if path else {}
    if base:
        user = deep_merge(base, user)
    ov = parse_overrides(overrides)
    method = user.get("method")
    for k, v in ov:
        if k == "method":
            method = v
    cfg = deep_merge(DEFAULTS, user)
    before_method = cfg
    if method is not None:
        methods = cfg.get("methods") or {}
        if method not in methods:
            raise ConfigError(f"method={method!r}: allowed values are {sorted(methods)} (the config's 'methods')"
                              f"{_closest(method, methods)}")
        cfg = deep_merge(cfg, methods[method])
        cfg["method"] = method
        if "name" not in (methods[method] or {}):
            cfg["name"] = f"{cfg['name']}_{method}"
    for k, v in ov:
        if k != "method":
            set_path(cfg, k, v)
    if not cfg.get("output_dir"):
        cfg["output_dir"] = os.path.join("runs", str(cfg["name"]))
    return validate(cfg, before_method)


def stage_configs(cfg: dict) -> List[dict]:
    """[stage-1 config] or [stage 1, stage 2]; stage 2 inherits everything not overridden."""
    stages = [cfg]
    if cfg.get("stage2"):
        s2 = deep_merge(STAGE2_DEFAULTS, {k: v for k, v in cfg["stage2"].items() if v is not None})
        c2 = deep_merge({k: v for k, v in cfg.items() if k != "stage2"},
                        {k: v for k, v in s2.items() if k in DEFAULTS})
        for k in ("head_init", "init", "freeze_backbone"):
            c2[k] = s2[k]
        stages.append(c2)
    return stages


# ---------------------------------------------------------------------------------------------------------
# documentation
# ---------------------------------------------------------------------------------------------------------
def schema_rows(cls=Config, prefix: str = ""):
    """(dotted key, type, default, description) of every key, sections expanded."""
    for f in dataclasses.fields(cls):
        tp = _HINTS[cls][f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or (inner and cls is not Stage2Config):
            yield from schema_rows(tp if dataclasses.is_dataclass(tp) else inner[0], f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        yield f"{prefix}{f.name}", _type_name(tp), default, f.metadata["doc"]


def schema_markdown() -> str:
    """The key table of docs/harness.md (between its ``<!-- config-keys:start/end -->`` markers)."""
    def show(v):
        return "null" if v is None else (str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str)
                                         else str(v))
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in schema_rows():
        lines.append(f"| `{key}` | {tp.replace('|', chr(92) + '|')} | `{show(default)}` | {doc} |")
    return "\n".join(lines)

