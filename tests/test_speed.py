"""Execution settings chosen by measurement (aurecog/runner/speed.py): the choice rule, the per-machine cache,
explicit settings left alone, channels_last in the model, and the choice entering a cell's identity."""

from __future__ import annotations

import json

import pytest
import torch

from aurecog import config as C
from aurecog.runner import grid
from aurecog.runner import speed as SP

RATES = {"fp32": 100.0, "fp32-cl": 105.0, "bf16": 150.0, "bf16-cl": 240.0}


def test_the_fastest_setting_wins_only_by_a_margin_and_within_the_explicit_part():
    assert SP.choose(RATES, "auto", "auto") == "bf16-cl"
    assert SP.choose(RATES, "32-true", "auto") == "fp32"  # fp32-cl is only 5% faster: below MIN_GAIN
    assert SP.choose(RATES, "auto", False) == "bf16"
    assert SP.choose(RATES, "bf16-mixed", "auto") == "bf16-cl"
    slow = {"fp32": 100.0, "fp32-cl": 108.0, "bf16": 60.0, "bf16-cl": 70.0}  # AC2D-like: bf16 slower
    assert SP.choose(slow, "auto", "auto") == "fp32"
    assert SP.choose({**slow, "fp32-cl": 111.0}, "auto", "auto") == "fp32-cl"


def test_measured_once_per_machine_and_variant_then_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(SP, "_measure", lambda cfg, threads, **kw: calls.append(threads) or dict(RATES))
    cfg = C.resolve("baseline", "synth", "quick")
    cache = tmp_path / "speed.json"
    a = SP.resolve(cfg, 1, cache=cache)
    b = SP.resolve(cfg, 1, cache=cache)
    assert (a["precision"], a["channels_last"]) == ("bf16-mixed", True) and b["setting"] == a["setting"]
    assert calls == [1]
    SP.resolve(cfg, 2, cache=cache)  # threads are part of the key
    SP.resolve(cfg, 1, cache=cache, remeasure=True)
    assert calls == [1, 2, 1]
    doc = json.loads(cache.read_text())
    assert list(doc) == [SP.machine_key()] and len(doc[SP.machine_key()]) == 2


def test_explicit_settings_are_never_measured_or_overridden(monkeypatch):
    monkeypatch.setattr(SP, "_measure", lambda *a, **k: pytest.fail("measured an explicit setting"))
    cfg = C.deep_merge(C.resolve("baseline", "synth", "quick"),
                       {"trainer": {"precision": "32-true", "channels_last": False}})
    assert SP.resolve(cfg, 1) == {"precision": "32-true", "channels_last": False}
    with pytest.raises(ValueError, match="channels_last must be true, false or auto"):
        SP.resolve(C.deep_merge(cfg, {"trainer": {"channels_last": "yes"}}), 1)


def test_the_runner_resolves_auto_into_the_config_and_the_identity(monkeypatch):
    monkeypatch.setattr(SP, "resolve", lambda cfg, threads, **k: {"precision": "bf16-mixed", "channels_last": True})
    cells = grid.expand("synth", "baseline", "0", "0")
    assert cells[0].config["trainer"]["precision"] == "auto"
    grid.assign_identities(cells, jobs=2)
    t = cells[0].config["trainer"]
    assert (t["precision"], t["channels_last"]) == ("bf16-mixed", True)
    assert cells[0].identity["precision"] == "bf16-mixed"
    monkeypatch.setattr(SP, "resolve", lambda cfg, threads, **k: {"precision": "32-true", "channels_last": False})
    other = grid.expand("synth", "baseline", "0", "0")
    grid.assign_identities(other, jobs=2)
    assert other[0].identity["row"] != cells[0].identity["row"]


def test_channels_last_model_keeps_its_numbers():
    """The same weights in NHWC give the NCHW outputs (a memory layout, not a different network)."""
    from aurecog.models.backbones import no_pretrained
    from aurecog.models.probe import probe_batch, probe_stats
    from aurecog.models.registry import build_model
    from aurecog.tasks import TaskSpec

    task = TaskSpec("au", list(SP.PROBE_LABELS))
    cfg = C.deep_merge(C.resolve("baseline", "synth", "quick"), {"trainer": {"channels_last": True}})
    torch.manual_seed(0)
    with no_pretrained():
        model = build_model(cfg, task, probe_stats(task)).eval()
    batch = probe_batch(4, 56, task)
    ref = model(batch)["logits"]
    model.setup("test")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    moved = model.on_after_batch_transfer(batch, 0)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(moved)["logits"], ref, rtol=1e-4, atol=1e-5)


def test_a_model_and_its_ablations_share_the_setting_of_the_papers_main_model(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(SP, "_measure", lambda cfg, threads, **kw: seen.append(cfg["model"]["name"]) or dict(RATES))
    assert SP.reference_variant("renet-baseline") == "renet" and SP.reference_variant("ac2d-ae") == "ac2d"
    assert SP.reference_variant("baseline") == "baseline"
    cache = tmp_path / "speed.json"
    for v in ("renet-baseline", "renet-identity", "renet"):
        SP.resolve(C.resolve(v, "synth", "quick"), 1, cache=cache)
    assert seen == ["renet"]  # measured once, on the main model, at the same size and batch
