"""The paper profile runs: every registered variant is built at its paper input size and trained for a few
optimiser steps, validated and tested through the runner (``run_cell``) on SynthAU rendered at the profile's
resize, on CPU, in one process. Shrunk only where the CPU budget needs it, and said here:

* data (rendered once per dataset and size for the whole session, shared by every variant of that size):
  AU variants: 4 SynthAU subjects x 1 session x 2 frames with a 4-fold subject split, so fold 0 fits on
  2 subjects (4 frames: two optimiser steps of batch 2) and validates and tests on one subject (2 frames) each;
  IERN variants: synth-fermix with one subject per source and the last (apex) frame of each clip (18 frames),
  under IERN's own bias100 protocol (fold 0: 6 test frames, one source subject carved for validation);
* ``data.batch_size: 2`` (AC2D, LayerNorm only: 1), ``data.eval_batch_size: 8`` (the papers: 100 RE-Net,
  24 AC2D, 8 IERN, 4 CISNet);
* one epoch of two optimiser steps (CISNet, w/ and w/o CIS: two epochs of one step, its epoch 0 takes no
  step; IERN and its disentanglement ablation: one batch, i.e. Algorithm 1's three optimiser steps); no early
  stopping; schedules as configured;
* ``backbone.pretrained: false`` (no weights can be downloaded here);
* ``trainer.accelerator: cpu``, one device, 32-bit.

Everything else (input size, resize, normalisation, augmentation, optimiser, schedule, loss, architecture) is
the paper profile's. Each run asserts: every training loss is finite and went through
:meth:`AUModel.supervised_loss` (the one supervised-loss path; the IERN re-sampling baseline's per-sample
re-weighted loss is the exception, checked to be its own), every parameter that got a gradient changed (and
some backbone parameter did), the variant's distinguishing
component is on (or off) as its config says, and the test predictions have one finite score per sample and
label. Plus ``aurecog bench --profile paper`` end to end for one main model (RE-Net).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.data.prepared import PreparedDataset, PreparedWriter
from aurecog.data.synth import generate
from aurecog.models import registry
from aurecog.models.base import AUModel
from aurecog.models.iern import MANUAL_MODES
from aurecog.runner import grid
from aurecog.runner.cell import run_cell

SHRINK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.accelerator=cpu", "trainer.devices=1",
          "trainer.strategy=auto", "trainer.precision=32-true", "trainer.early_stopping_patience=null",
          "data.batch_size=2", "data.eval_batch_size=8", "data.num_workers=0"]
#: CISNet's epoch 0 (``bank_only_epochs: 1``, w/ and w/o CIS) takes no optimiser step: two epochs of one step
BANK_EPOCH = ["trainer.max_epochs=2", "trainer.limit_train_batches=1"]
#: AC2D (LayerNorm only, no batch statistics) trains on batches of one: two steps of one frame
ONE_FRAME = ["data.batch_size=1"]
#: IERN and its disentanglement ablation take three optimiser steps per batch (Algorithm 1): one batch
ONE_BATCH = ["trainer.limit_train_batches=1"]
AU_SYNTH = {"n_subjects": 4, "sessions_per_subject": 1, "frames_per_session": (2, 2)}
#: fold 0 tests one subject, validation is carved as one of the other three: fit 4 frames, val 2, test 2
AU_PROTOCOL = {"type": "subject_kfold", "k": 4}
FER_SYNTH = {"n_subjects": 1}  # one subject per source, 3 apex frames per clip; the last one is kept


def _dataset(model: str) -> str:
    return "synth-fermix" if C.model_variants()[model]["file"] == "iern" else "synth"


def _last_frame_per_clip(folder, out):
    """A prepared copy of ``folder`` holding the last frame of each (subject, session) clip."""
    src = PreparedDataset.open(folder)
    rows = src.index.reset_index(drop=True).groupby(["subject", "session"], sort=False).tail(1).index.to_numpy()
    w = PreparedWriter(out, len(rows), src.images.shape[1], src.meta["landmark_layout"])
    w.images[:] = src.images[rows]
    w.landmarks[:] = src.landmarks[rows]
    meta = {k: v for k, v in src.meta.items() if k not in ("format", "version", "n", "landmark_layout", "image_size")}
    return w.finalize(src.index.iloc[rows].reset_index(drop=True), meta)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory):
    """(dataset, size) -> (inline dataset config reading SynthAU rendered at ``size``, data root); each
    (dataset, size) is rendered once per session and shared by every variant that reads it."""
    root = tmp_path_factory.mktemp("paper-synth")
    cache: dict[tuple[str, int], dict] = {}

    def get(dataset: str, size: int) -> tuple[dict, str]:
        if (dataset, size) not in cache:
            ds = C.load_dataset(dataset)
            ov = {**(FER_SYNTH if dataset == "synth-fermix" else AU_SYNTH), "image_size": size}
            folder = generate(ds["preset"], seed=0, cache_dir=root, progress=False, overrides=ov)
            if dataset == "synth-fermix":
                folder = _last_frame_per_clip(folder, root / f"{folder.name}-apex")
                cache[(dataset, size)] = {**ds, "source": "prepared", "prepared_dir": folder.name}
            else:
                cache[(dataset, size)] = {**ds, "source": "prepared", "prepared_dir": folder.name,
                                          "protocols": {**ds["protocols"], "smoke": AU_PROTOCOL},
                                          "default_protocol": "smoke"}
        return cache[(dataset, size)], str(root)

    return get


def _component(model: AUModel, cfg: dict, hist: pd.DataFrame, state: dict) -> None:
    """The variant's distinguishing component is on (or off) as its resolved config says."""
    fam = cfg["model"]["family"]
    if "backbone" in cfg and hasattr(model, "backbone"):
        timm_net = next(mod for mod in model.backbone.modules() if hasattr(mod, "pretrained_cfg"))
        assert timm_net.pretrained_cfg["architecture"] == cfg["backbone"]["name"]
    if fam == "cisnet":
        cis = bool(cfg.get("cis", {}).get("enabled", True))
        assert model.use_cis is cis and (model.cis is not None) is cis
        if cis:  # epoch 0 filled the banks, the dictionary was built and used in epoch 1
            assert state["dictionary_ready"] and state["priors"].sum() > 0
    elif fam == "ac2d":
        a = cfg.get("ac2d", {})
        assert model.att_mode == a.get("attention", {}).get("mode", "avg")
        assert model.causal_mode == a.get("causal", {}).get("mode", "branch_dynamic")
        assert hasattr(model, "causal") is (model.causal_mode != "none")
        logged = bool("train/loss_attention" in hist and hist["train/loss_attention"].notna().any())
        assert logged is (model.att_mode != "none"), "Eq. 15's attention loss is logged iff attention is on"
    elif fam == "iern":
        assert model.mode == cfg.get("iern", {}).get("mode", "iern")
    elif fam == "renet":
        r = cfg.get("renet", {})
        assert model.strategy == r.get("strategy", "random")
        g = r.get("graph", {})
        assert isinstance(model.graph.off, torch.nn.Parameter) is bool(g.get("learnable", False))
        if r.get("unseen_au"):
            assert model.unseen is not None and model.unseen not in model.val_labels
            assert model.unseen not in model.train_conditions.tolist()
    dup = bool(cfg.get("duplicate", {}).get("enabled", False))
    assert bool(getattr(model, "dup_copies", 0)) is dup


def _recording(fn, into: list):
    """``fn`` that also appends each training-mode (grad-enabled) loss value to ``into``."""
    def wrapped(*args, **kwargs):
        loss = fn(*args, **kwargs)
        if torch.is_grad_enabled() and loss.requires_grad:
            into.append(float(loss.detach()))
        return loss

    return wrapped


@pytest.mark.parametrize("model", sorted(C.model_variants()))
def test_paper_profile_trains_validates_and_tests(model, rendered, tmp_path, monkeypatch):
    dataset = _dataset(model)
    cfg = C.resolve(model, dataset, "paper")
    shrink = list(SHRINK) + (["backbone.pretrained=false"] if "backbone" in cfg else [])
    if int(cfg.get("bank_only_epochs") or 0) > 0:  # CISNet, w/ and w/o CIS (one recipe, Table 3)
        shrink += BANK_EPOCH
    shrink += ONE_FRAME if cfg["model"]["family"] == "ac2d" else []
    shrink += ONE_BATCH if cfg.get("iern", {}).get("mode", "iern") in MANUAL_MODES and "iern" in cfg else []
    cfg = grid.set_dotted(cfg, shrink)
    registry.check_config(cfg)
    size = int(cfg["data"].get("resize") or cfg["data"]["input_size"])
    ds_cfg, data_root = rendered(dataset, size)
    cfg["dataset_config"] = ds_cfg
    cfg["protocol"] = ds_cfg["default_protocol"]

    built, losses, resampled, state, touched = [], [], [], {}, set()
    build = registry.build_model

    def spy_build(*args, **kwargs):  # the model run_cell trains, its initial parameters, its end-of-fit state
        m = build(*args, **kwargs)
        built.append(m)
        state["init"] = {k: p.detach().clone() for k, p in m.named_parameters()}
        for k, p in m.named_parameters():  # which parameters ever got a non-zero gradient
            p.register_hook(lambda g, k=k: touched.add(k) if bool(g.ne(0).any()) else None)

        def on_train_end():
            state["final"] = {k: p.detach().clone() for k, p in m.named_parameters()}
            for k in ("dictionary_ready", "priors"):
                if hasattr(m, k):
                    state[k] = getattr(m, k).detach().clone()

        m.on_train_end = on_train_end
        if hasattr(m, "resample_loss"):
            m.resample_loss = _recording(m.resample_loss, resampled)
        return m

    sup = AUModel.supervised_loss
    monkeypatch.setattr(registry, "build_model", spy_build)
    monkeypatch.setattr(AUModel, "supervised_loss", lambda self, *a, **k: _recording(sup, losses)(self, *a, **k))
    t0, c0 = time.time(), time.process_time()
    metrics = run_cell(cfg, 0, 0, tmp_path / "run", data_root=data_root, wandb_mode="disabled", progress=False)
    assert metrics["n_test"] > 0 and metrics["epochs_run"] >= 1, metrics
    assert metrics["profile"] == "paper" and metrics["test"], metrics
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert metrics["monitor"] in hist and hist[metrics["monitor"]].notna().any()  # validation ran
    (m,) = built
    # every step's supervised loss went through the base class (IERN's re-sampling baseline: its own per-sample
    # re-weighted loss, resample_loss), and was finite
    assert (not losses and resampled) if getattr(m, "mode", None) == "resample" else (losses and not resampled)
    assert all(math.isfinite(v) for v in losses + resampled), losses + resampled
    changed = [k for k, p in state["init"].items() if not torch.equal(p, state["final"][k])]
    # the optimiser moved every parameter that got a gradient (timm zero-initialises each residual block's last BN
    # gain, so from scratch a block's convolutions get none until that gain moves: not all change in two steps)
    assert touched and touched <= set(changed), sorted(touched - set(changed))
    assert any(k.startswith("backbone.") for k in changed) or "backbone" not in cfg, changed
    _component(m, cfg, hist, state)
    preds = pd.read_parquet(tmp_path / "run" / "predictions.parquet")  # one finite score per sample and label
    scores = preds[[f"score_{name}" for name in metrics["labels"]]].to_numpy()
    assert len(preds) == metrics["n_test"] and np.isfinite(scores).all(), preds.columns
    print(f"{model}: {time.time() - t0:.1f} s (cpu {time.process_time() - c0:.1f} s) at {cfg['data']['input_size']} "
          f"px: {len(losses) or len(resampled)} losses, {len(changed)}/{len(state['init'])} parameters changed")


def test_bench_paper_profile_end_to_end(tmp_path, rendered):
    """``aurecog bench --profile paper`` for one main model (RE-Net), shrunk as above, one fold: the configs are
    copied with one extra dataset, SynthAU rendered at 256 px (``AURECOG_CONFIGS``)."""
    import shutil

    import yaml

    ds_cfg, data_root = rendered("synth", 256)
    configs = tmp_path / "configs"
    shutil.copytree(C.CONFIG_DIR, configs)
    (configs / "datasets" / "synth-paper.yaml").write_text(yaml.safe_dump({**ds_cfg, "name": "synth-paper"}))
    cmd = [sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "synth-paper", "--models", "renet",
           "--profile", "paper", "--folds", "0", "--results", str(tmp_path / "results"), "--data-root", data_root,
           "--no-leaderboard", *[a for s in SHRINK + ["backbone.pretrained=false"] for a in ("--set", s)]]
    env = {**os.environ, "WANDB_MODE": "disabled", "AURECOG_CHECKPOINTS": str(tmp_path / "ckpt"),
           "AURECOG_CONFIGS": str(configs)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    found = list((tmp_path / "results").rglob("metrics.json"))
    assert found, proc.stderr[-2000:]
    m = json.loads(found[0].read_text())
    assert m["profile"] == "paper" and m["model"] == "renet" and m["n_test"] > 0
