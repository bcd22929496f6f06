"""Config keys: every key of every registered cell config is read by the runner or by its family class, a
misspelt key is rejected with the file it comes from and the closest valid key, and each key a family declares
is actually read when the model is built (a key-recording config)."""

from __future__ import annotations

import functools

import pytest
import torch

from aurecog import config as C
from aurecog.models.base import AUModel
from aurecog.models.registry import allowed_keys, build_model, check_config, family_class, flatten_keys
from aurecog.runner import grid
from aurecog.tasks import TaskSpec, TrainStats

AUS = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]


def test_every_variant_dataset_profile_passes(monkeypatch):
    monkeypatch.setattr(C, "_load", functools.lru_cache(maxsize=None)(C._load))  # 756 cells: read each yaml once
    failures = []
    for m in C.model_variants():
        for d in C.dataset_names():
            for p in C.profile_names():
                try:
                    check_config(C.resolve(m, d, p))
                except C.ConfigError as e:
                    failures.append(str(e))
    assert not failures, "\n".join(sorted(set(failures))[:5])


def test_misspelt_key_is_rejected_with_source_and_suggestion():
    cfg = grid.set_dotted(C.resolve("renet", "synth", "quick"), ["renet.graph.inti=identity"], validate=False)
    with pytest.raises(C.ConfigError, match=r"renet\.graph\.inti \(from --set / overrides; did you mean "
                                            r"renet\.graph\.init"):
        check_config(cfg)
    # a key in a yaml names that yaml
    fam = C.load_family("renet")
    bad = C.deep_merge(C.resolve("renet", "synth", "quick"), {"renet": {"strategy_": "all"}})
    with pytest.raises(C.ConfigError, match="renet.strategy_"):
        check_config(bad)
    assert "variants" in fam


@pytest.mark.parametrize("model,key", [
    ("renet-baseline", "renet.graph.init=identity"),  # RE-Net keys do nothing to the baseline class
    ("renet-baseline", "head.shared=false"),
    ("renet", "head.hidden=64"),  # RE-Net's classifier is one linear layer
    ("cisnet", "loss.pos_weight=balanced"),  # CISNet's Eq. 6 replaces the base loss
    ("iern-baseline", "iern.mode=nwgm"),
])
def test_silent_no_op_keys_are_rejected(model, key):
    cfg = grid.set_dotted(C.resolve(model, "synth", "quick"), [key], validate=False)
    with pytest.raises(C.ConfigError, match=key.split("=")[0].replace(".", r"\.")):
        check_config(cfg)


def test_baseline_variants_of_other_files_carry_none_of_their_keys():
    for model, section in (("renet-baseline", "renet"), ("renet-baseline-dup", "renet"), ("iern-baseline", "iern")):
        for p in C.profile_names():
            cfg = C.resolve(model, "synth", p)
            assert section not in cfg and "shared" not in cfg.get("head", {})


def test_common_keys_come_from_the_profiles():
    keys = allowed_keys(C.resolve("baseline", "synth", "quick"))
    for p in C.profile_names():
        prof = C.load_profile(p)
        for k in flatten_keys({s: prof[s] for s in ("trainer", "data", "optim", "schedule", "init") if s in prof}):
            assert k in keys


class Recorder(dict):
    """A config dict that records the dotted keys read through ``get`` / ``[]`` (nested dicts wrapped)."""

    def __init__(self, d: dict, seen: set, prefix: str = ""):
        super().__init__({k: Recorder(v, seen, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in d.items()})
        self._seen, self._prefix = seen, prefix

    def __getitem__(self, k):
        self._seen.add(self._prefix + k)
        return super().__getitem__(k)

    def get(self, k, default=None):
        self._seen.add(self._prefix + k)
        return super().get(k, default)


def _stats(c: int) -> TrainStats:
    rates = [0.1 + 0.4 * i / max(1, c - 1) for i in range(c)]
    return TrainStats(n_train=100, label_rate=rates, n_pos=[int(r * 100) for r in rates],
                      n_neg=[100 - int(r * 100) for r in rates], label_corr=torch.eye(c).tolist(),
                      subjects=["S0", "S1", "S2"], subject_counts=[30, 30, 40], confounders=["S0", "S1", "S2"],
                      confounder_counts=[30, 30, 40])


@pytest.mark.parametrize("model", ["baseline", "renet", "renet-baseline-dup", "iern", "iern-baseline"])
def test_declared_keys_are_read_when_the_model_is_built(model):
    """Every key the class declares beyond the base class's, and present in the cell config, is read by
    building the model and its optimiser (backbone keys: passed to timm)."""
    cfg = C.resolve(model, "synth", "quick")
    seen: set[str] = set()
    rec = Recorder(cfg, seen)
    task = TaskSpec("au", AUS)
    m = build_model(rec, task, _stats(len(AUS)))
    m.configure_optimizers()
    cls = family_class(cfg["model"]["family"])
    own = set(cls.config_keys) - set(AUModel.config_keys)
    present = {k for k in flatten_keys(cfg) if k in own}
    # a mapping read as a whole (backbone -> create_backbone(**b)) counts for its leaves
    unread = {k for k in present if k not in seen and not (k.startswith("backbone.") and "backbone" in seen)}
    assert not unread, f"{model}: declared and set but never read: {sorted(unread)}"


def test_a_paper_table_runs_under_its_own_protocol():
    """``--models iern-table3`` on synth-fermix runs under bias90 (IERN Table 3) without --protocol; every paper
    with an ablation table has a runnable group."""
    cells = grid.expand("synth-fermix", "iern-table3", "0", "0")
    assert {c.config["protocol"] for c in cells} == {"bias90"}
    assert {c.model for c in cells} == {"iern", "iern-baseline", "iern-nwgm", "iern-resample"}
    assert grid.expand("synth-fermix", "iern-table3", "0", "0", protocol="bias100")[0].config["protocol"] == "bias100"
    tables = C.table_groups()
    for t in ("cisnet-table3", "ac2d-table7", "iern-table2", "iern-table3", "renet-table6", "renet-table8"):
        assert tables[t]["models"], t
    assert set(tables["cisnet-table3"]["models"]) == {"cisnet", "cisnet-resnet18", "cisnet-resnet50",
                                                      "cisnet-resnet18-wo", "cisnet-resnet34-wo", "cisnet-resnet50-wo"}
