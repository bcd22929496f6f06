"""Backbones from timm. ``pretrained`` is off by default (no network here); with ``pretrained_file`` set,
weights load from a local file through timm's ``pretrained_cfg_overlay`` (engineering notes section 5)."""

from __future__ import annotations

import timm
from torch import nn


def create_backbone(name: str = "resnet18", pretrained: bool = False, pretrained_file: str | None = None,
                    **kwargs) -> tuple[nn.Module, int]:
    """A timm model without its classifier, returning pooled features; and their dimension.

    Extra ``kwargs`` go to the timm constructor, e.g. ``channels=[16, 32, 64, 128], stem_width=16`` for the
    narrow ResNets of the quick CPU profile.
    """
    if "channels" in kwargs and kwargs["channels"] is not None:
        kwargs["channels"] = tuple(kwargs["channels"])
    overlay = {"pretrained_cfg_overlay": {"file": pretrained_file}} if pretrained_file else {}
    model = timm.create_model(name, pretrained=pretrained or bool(pretrained_file), num_classes=0, **overlay,
                              **kwargs)
    return model, model.num_features
