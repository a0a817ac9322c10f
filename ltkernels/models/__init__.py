"""Backbones + heads. ``LTModel(x)`` returns logits; ``LTModel(x, return_features=True)`` returns
``(logits, features)`` (features = the pooled backbone output fed to the head, used by FBL and analysis)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .heads import HEADS, LWSHead, NormedLinear, make_head, tau_normalize_
from .resnet_cifar import resnet8, resnet32
from .small_cnn import DigitsCNN

ARCHS = ("digits_cnn", "resnet8", "resnet32", "resnet50", "resnext50_32x4d", "resnet152")

__all__ = ["ARCHS", "HEADS", "LTModel", "NormedLinear", "LWSHead", "build_model", "make_backbone",
           "tau_normalize_"]


def make_backbone(arch: str, **kw) -> nn.Module:
    if arch == "digits_cnn":
        return DigitsCNN(width=kw.get("width", 32), bn=kw.get("bn", True))
    if arch == "resnet32":
        return resnet32()
    if arch == "resnet8":
        return resnet8()
    if arch in ("resnet50", "resnext50_32x4d", "resnet152"):
        import torchvision.models as tvm
        net = getattr(tvm, arch)(weights=None)  # never downloads
        net.out_features = net.fc.in_features
        net.fc = nn.Identity()
        return net
    raise ValueError(f"model.arch={arch!r}: allowed values are {list(ARCHS)}")


class LTModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x, return_features: bool = False):
        f = self.backbone(x)
        out = self.head(f)
        return (out, f) if return_features else out


def load_pretrained_backbone(bb: nn.Module, path: str) -> None:
    """Loads a local state dict (e.g. torchvision ImageNet weights saved with torch.save) into the backbone;
    the classifier ('fc.*') and a leading 'module.'/'backbone.' prefix are dropped. Nothing is downloaded."""
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained: file not found: {path!r}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
    clean = {}
    for k, v in sd.items():
        for pre in ("module.", "backbone."):
            if k.startswith(pre):
                k = k[len(pre):]
        if not k.startswith("fc."):
            clean[k] = v
    missing, unexpected = bb.load_state_dict(clean, strict=False)
    if missing:
        raise ValueError(f"model.pretrained={path!r} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}")


def build_model(m: dict, num_classes: int) -> LTModel:
    """``m`` is the ``model`` section of a config: arch, head (linear|cosine), cosine_impl, width, bn."""
    bb = make_backbone(m["arch"], width=m.get("width", 32), bn=m.get("bn", True))
    if m.get("pretrained"):
        load_pretrained_backbone(bb, m["pretrained"])
    head = make_head(m["head"], bb.out_features, num_classes, m.get("cosine_impl", "eager"))
    # model.sync_bn and model.channels_last are applied by the trainer, which knows the device and world size
    return LTModel(bb, head)
