"""ImageNet initialisation of the timm backbones (aurecog/models/backbones.py): torchvision-layout checkpoints (what
the CISNet and IERN authors load) map onto timm's ResNets, and a missing source stops with one line naming the fix,
fast and without network."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torchvision
from torch import nn

from aurecog.models import backbones
from aurecog.models.backbones import (
    PretrainedUnavailable,
    check_pretrained,
    create_backbone,
    no_pretrained,
    resolve_pretrained,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No hub cache, no torch hub folder, no weights folder: each test states the sources it provides."""
    monkeypatch.setattr(backbones, "_in_hub_cache", lambda name: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(backbones.ENV_DIR, raising=False)


def _torchvision(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return net.eval()


def _trunk_features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's pooled trunk output: everything before ``fc`` (the authors' children()[:-1], flattened)."""
    return nn.Sequential(*list(net.children())[:-1])(x).flatten(1)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_torchvision_checkpoint_loads_into_the_timm_backbone(name, tmp_path):
    tv = _torchvision(name)
    path = tmp_path / f"{name}-tv.pth"
    torch.save(tv.state_dict(), path)
    ours, dim = create_backbone(name, pretrained=True, pretrained_file=str(path))
    assert dim == 512 and ours.pretrained_source == str(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), _trunk_features(tv, x), rtol=1e-5, atol=1e-5)
    fresh, _ = create_backbone(name)  # the check above can fail: random init gives other features
    with torch.no_grad():
        assert not torch.allclose(fresh.eval()(x), _trunk_features(tv, x), atol=1e-3)


def test_authors_sequential_layout_and_wrapped_checkpoints(tmp_path):
    """CISNet's authors keep ``nn.Sequential(*resnet34.children()[:-1])`` (children numbered 0-8); training
    checkpoints wrap the weights in ``state_dict`` and DDP prefixes ``module.``."""
    tv = _torchvision("resnet18", seed=1)
    seq = nn.Sequential(*list(tv.children())[:-1])
    torch.save({"state_dict": {f"module.{k}": v for k, v in seq.state_dict().items()}}, tmp_path / "seq.pth")
    ours, _ = create_backbone("resnet18", pretrained_file=str(tmp_path / "seq.pth"))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), _trunk_features(tv, x), rtol=1e-5, atol=1e-5)


def test_a_file_of_another_network_is_refused_in_one_line(tmp_path):
    torch.save(_torchvision("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not fit backbone") as e:
        create_backbone("resnet34", pretrained_file=str(tmp_path / "r18.pth"))
    assert "\n" not in str(e.value)
    with pytest.raises(PretrainedUnavailable, match="backbone.pretrained_file='/nope.pth' does not exist"):
        create_backbone("resnet34", pretrained=True, pretrained_file="/nope.pth")


def test_weights_folder_holds_torchvision_file_names(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    tv = _torchvision("resnet18", seed=2)
    torch.save(tv.state_dict(), folder / "resnet18-f37072fd.pth")
    monkeypatch.setenv(backbones.ENV_DIR, str(folder))
    cfg = {"backbone": {"name": "resnet18", "pretrained": True}}
    check_pretrained(cfg)  # found locally: no network, no error
    ours, _ = create_backbone(**cfg["backbone"])
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), _trunk_features(tv, x), rtol=1e-5, atol=1e-5)
    assert resolve_pretrained("resnet18", tag="a1_in1k", probe=False) == "resnet18.a1_in1k"  # not that file


def test_no_source_offline_stops_in_one_line_naming_the_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "_hub_reachable", lambda *a: pytest.fail("offline: must not probe"))
    t0 = time.perf_counter()
    with pytest.raises(PretrainedUnavailable) as e:
        check_pretrained({"backbone": {"name": "resnet34", "pretrained": True}})
    assert time.perf_counter() - t0 < 1.0
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg
    assert "backbone.pretrained_file=PATH" in msg and "backbone.pretrained=false" in msg
    assert "resnet34-b627a593.pth" in msg
    check_pretrained({"backbone": {"name": "resnet34", "pretrained": False}})  # from scratch: nothing to check
    check_pretrained({"ac2d": {}})  # no timm backbone at all


def test_a_silent_hub_is_probed_with_a_bound(monkeypatch):
    """A server that accepts the connection and never answers (a proxy, a firewall) must not hang the check."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        t0 = time.perf_counter()
        assert backbones._hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/w.safetensors", 0.3) is False
        assert time.perf_counter() - t0 < 1.5
    monkeypatch.setattr(backbones, "_hub_reachable", lambda *a: False)
    with pytest.raises(PretrainedUnavailable, match="huggingface.co cannot be reached"):
        check_pretrained({"backbone": {"name": "resnet50", "pretrained": True}})


def test_checkpoint_builds_skip_the_imagenet_source():
    with no_pretrained():
        model, _ = create_backbone("resnet18", pretrained=True, pretrained_file="/gone.pth")
    assert not hasattr(model, "pretrained_source")
