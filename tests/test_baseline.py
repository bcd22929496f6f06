"""The baseline model: forward/backward on all three task kinds, and the optimiser/schedule construction."""

import pytest
import torch
from helpers import dataset_config, make_prepared

from aurecog.config import resolve
from aurecog.data.datamodule import AUDataModule
from aurecog.models.backbones import create_backbone
from aurecog.models.registry import build_model


@pytest.mark.parametrize("task", ["au", "intensity", "expression"])
def test_baseline_forward_backward_all_tasks(tmp_path, task):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=6)
    dm = AUDataModule(dataset_config(), task=task, data_root=str(tmp_path), input_size=32, batch_size=6)
    dm.setup()
    model = build_model(resolve("baseline", "synth", "quick"), dm.task_spec, dm.stats)
    batch = next(iter(dm.train_dataloader()))
    out = model(batch)
    c = dm.task_spec.num_outputs
    expected = {"au": (6, c), "intensity": (6, c, 6), "expression": (6, c)}[task]
    assert out["logits"].shape == expected
    loss, _ = model.compute_loss(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    s = model.scores(out)
    if task == "intensity":
        assert s.shape == (6, c) and (s >= 0).all() and (s <= 5).all()
    elif task == "expression":
        torch.testing.assert_close(s.sum(-1), torch.ones(6))


def test_quick_profile_uses_narrow_backbone():
    cfg = resolve("baseline", "synth", "quick")
    assert cfg["backbone"]["channels"] == [16, 32, 64, 128]
    paper = resolve("baseline", "synth", "paper")
    assert "channels" not in paper["backbone"] and paper["data"]["input_size"] == 224


def test_ignored_stem_width_is_refused():
    """timm's 7x7 ResNet stem is 64 channels whatever ``stem_width`` says; the quick configs used to pass 16."""
    model, dim = create_backbone("resnet18", channels=[16, 32, 64, 128])
    assert model.conv1.out_channels == 64 and model.layer1[0].conv1.in_channels == 64 and dim == 128
    with pytest.raises(ValueError, match="stem_width=16 has no effect"):
        create_backbone("resnet18", channels=[16, 32, 64, 128], stem_width=16)
    deep, _ = create_backbone("resnet18", channels=[16, 32, 64, 128], stem_width=16, stem_type="deep")
    assert deep.conv1[0].out_channels == 16  # a deep stem uses it
    for name in ("baseline", "cisnet", "iern", "renet"):
        assert "stem_width" not in resolve(name, "synth", "quick")["backbone"]


def test_balanced_pos_weight_loss_matches_hand_computation(tmp_path):
    import math

    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=6)
    dm = AUDataModule(dataset_config(), data_root=str(tmp_path), input_size=32, batch_size=6)
    dm.setup()
    model = build_model(resolve("baseline", "synth", "quick"), dm.task_spec, dm.stats)
    assert model.cfg["loss"]["pos_weight"] == "balanced"
    logits = torch.randn(4, 12)
    target = (torch.rand(4, 12) < 0.4).float()
    target[0, 3] = -1
    loss, _ = model.compute_loss({"logits": logits}, {"target": target})
    total, known = 0.0, 0
    for i in range(4):
        for j in range(12):
            t = float(target[i, j])
            if t < 0:
                continue
            v = dm.stats.n_neg[j] / max(dm.stats.n_pos[j], 1)
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            total += -(v * t * math.log(p) + (1 - t) * math.log(1 - p))
            known += 1
    assert float(loss) == pytest.approx(total / known, rel=1e-5)
