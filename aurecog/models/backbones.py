"""Backbones from timm. ``pretrained`` is off by default (no network here); with ``pretrained_file`` set,
weights load from a local file through timm's ``pretrained_cfg_overlay`` (engineering notes section 5)."""

from __future__ import annotations

import timm
from timm.models.resnet import ResNet
from torch import nn


def create_backbone(name: str = "resnet18", pretrained: bool = False, pretrained_file: str | None = None,
                    **kwargs) -> tuple[nn.Module, int]:
    """A timm model without its classifier, returning pooled features; and their dimension.

    Extra ``kwargs`` go to the timm constructor, e.g. ``channels=[16, 32, 64, 128]`` for the
    narrow ResNets of the quick CPU profile.
    """
    if "channels" in kwargs and kwargs["channels"] is not None:
        kwargs["channels"] = tuple(kwargs["channels"])
    overlay = {"pretrained_cfg_overlay": {"file": pretrained_file}} if pretrained_file else {}
    model = timm.create_model(name, pretrained=pretrained or bool(pretrained_file), num_classes=0, **overlay,
                              **kwargs)
    _check_stem_width(name, model, kwargs.get("stem_width"))
    return model, model.num_features


def _check_stem_width(name: str, model: nn.Module, stem_width: int | None) -> None:
    """timm's ResNets accept ``stem_width`` but use it only for deep stems: the default 7x7 stem is 64 channels
    whatever it says. Refuse the silently ignored value instead of training a different network than asked."""
    if stem_width is None or not isinstance(model, ResNet) or not isinstance(model.conv1, nn.Conv2d):
        return
    if model.conv1.out_channels != stem_width:
        raise ValueError(
            f"backbone {name!r}: stem_width={stem_width} has no effect on timm's single 7x7 stem, which has "
            f"{model.conv1.out_channels} channels; remove stem_width from the backbone config, or set "
            "stem_type: deep (three 3x3 convolutions whose width it sets)")
