"""Evaluate a checkpoint: ``ltk-eval --config CFG --checkpoint runs/x/checkpoint.pt`` (also
``python -m ltkernels.eval``); CFG is a packaged recipe name or a YAML path.

Prints overall top-1/top-5, many/medium/few-shot accuracy (thresholds from the config's eval.many /
eval.few), ECE and per-class accuracy; ``--json`` writes everything. Accepts the harness checkpoint
(``checkpoint.pt``), a ``best_stage*.pt`` state dict, or a bare model state dict."""
from __future__ import annotations

import argparse
import json
import sys

import torch


def load_model_for_eval(cfg: dict, ckpt_path: str, num_classes: int):
    from .models import build_model
    from .train.config import stage_configs
    from .train.engine import prepare_stage, resolve_head
    obj = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    sd = obj["model"] if isinstance(obj, dict) and "model" in obj and "optimizer" in obj else obj
    model = build_model({**cfg["model"], "head": resolve_head(cfg)}, num_classes)
    stages = stage_configs(cfg)
    # a checkpoint of stage 2 has the stage-2 head structure (e.g. LWS): rebuild it before loading
    n_stage = obj.get("stage", len(stages) - 1) + 1 if isinstance(obj, dict) and "stage" in obj else len(stages)
    if any(k.startswith("head.base.") for k in sd):
        n_stage = len(stages)
    for si in range(1, n_stage):
        prepare_stage(model, stages[si], si, num_classes)
    model.load_state_dict(sd)
    return model, stages[n_stage - 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ltk-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="packaged recipe name or YAML path")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    from .data import build_datasets
    from .train.config import ConfigError, build_config
    from .train.engine import evaluate, pick_device
    from .train.loss_factory import SPECS
    from .train.metrics import format_table
    try:
        cfg = build_config(a.config, a.overrides)
        ds = build_datasets(cfg["data"], cfg["seed"])
        model, scfg = load_model_for_eval(cfg, a.checkpoint, ds["num_classes"])
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ds[a.split] is None:
        print(f"error: the config has no {a.split} split", file=sys.stderr)
        return 2
    device = pick_device(cfg)
    model.to(device)
    if cfg["model"].get("channels_last"):   # as in training (the inputs follow in evaluate)
        model.to(memory_format=torch.channels_last)
    name = scfg["loss"]["name"]
    scale = float((scfg["loss"].get("params") or {}).get("s", SPECS[name][1].get("s", 1.0))) \
        if SPECS[name][2] == "cosine" and scfg["eval"]["logit_scale"] == "auto" else \
        (1.0 if scfg["eval"]["logit_scale"] == "auto" else float(scfg["eval"]["logit_scale"]))
    m = evaluate(model, ds[a.split], scfg, device, ds["cls_num_list"], ds["num_classes"], scale)
    e = cfg["eval"]
    print(format_table({cfg["name"]: m}, extra_header=f"{a.split}: many > {e['many']}, few < {e['few']}"))
    print("per-class accuracy:", " ".join(f"{v:.1f}" for v in m["per_class_acc"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(m, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
