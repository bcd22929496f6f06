"""CISNet (Chen et al., AAAI 2022): confounder dictionary, bank-only first epoch, CIS attention (Eqs. 3-5),
Eq. 6 loss, checkpointing, DDP agreement, and the paper's model size (AC2D paper Table 6: 22.4M params, 4.8G MACs).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import BP4D_AUS, dataset_config, make_prepared
from torch.utils.flop_counter import FlopCounterMode

from aurecog.config import model_variants, resolve
from aurecog.data.datamodule import AUDataModule
from aurecog.models.backbones import no_pretrained
from aurecog.models.cisnet import BANK_ONLY_MONITOR_VALUE, CISNet
from aurecog.models.registry import build_model
from aurecog.tasks import TaskSpec, TrainStats

TESTS = Path(__file__).resolve().parent
# CISNet-ResNet34, 12 AUs, 256 x 256: AC2D paper Table 6 (one multiply-add counted as one FLOP).
PAPER_PARAMS = 22.4e6
PAPER_MACS = 4.8e9


def _stats(n_groups: int = 3, confounder: str = "subject", c: int = 12, rate: float = 0.3) -> TrainStats:
    names = [f"s{i}" for i in range(n_groups)]
    return TrainStats(n_train=10 * n_groups, label_rate=[rate] * c, n_pos=[3] * c, n_neg=[7] * c,
                      label_corr=np.eye(c).tolist(), subjects=names, subject_counts=[10] * n_groups,
                      confounder=confounder, confounders=names, confounder_counts=[10] * n_groups)


def _quick_model(stats: TrainStats, task: TaskSpec | None = None) -> CISNet:
    torch.manual_seed(0)
    return build_model(resolve("cisnet-resnet18", "synth", "quick"), task or TaskSpec("au", BP4D_AUS), stats)


def test_variants_registered():
    v = model_variants()
    assert v["cisnet"]["main"] and v["cisnet"]["group"] == "cisnet" and v["cisnet"]["family"] == "cisnet"
    for name in ("cisnet-resnet18", "cisnet-resnet50"):
        assert v[name]["family"] == "cisnet" and v[name]["group"] == "cisnet-ablation"
    for depth in (18, 34, 50):
        w = v[f"cisnet-resnet{depth}-wo"]
        assert w["family"] == "cisnet" and w["group"] == "cisnet-ablation"
        assert w["overrides"]["backbone"]["name"] == f"resnet{depth}" and w["overrides"]["cis"]["enabled"] is False
    paper = resolve("cisnet", "synth", "paper")
    assert paper["optim"] == {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    assert paper["data"]["input_size"] == 256 and paper["data"]["batch_size"] == 4
    assert paper["trainer"]["max_epochs"] == 15 and paper["trainer"]["early_stopping_patience"]
    assert paper["cis"] == {"feature_dim": 512, "d_m": 256} and paper["head"]["hidden"] == 64


def test_dictionary_is_subject_mean_and_sample_share():
    """Banked features from a stream of batches (incl. a non-training subject, -1) -> s_i = mean, P(s_i) = n_i/N."""
    model = _quick_model(_stats(3)).eval()  # eval: batch-norm running stats, so features are reproducible
    g = torch.Generator().manual_seed(1)
    stream = [(torch.randn(4, 3, 24, 24, generator=g), torch.tensor(s))
              for s in ([0, 2, 2, -1], [1, 0, 2, 2], [2, -1, 0, 2])]
    for i, (img, subj) in enumerate(stream):
        loss = model.training_step({"image": img, "train_subject": subj, "confounder": subj}, i)
        assert loss.item() == 0.0 and not loss.requires_grad  # bank-only: nothing to back-propagate
    model.on_train_epoch_start()  # the next epoch builds the dictionary from this epoch's bank
    feats, subjects = [], []
    with torch.no_grad():
        for img, subj in stream:
            for f, s in zip(model.features(img), subj.tolist()):
                feats.append(f)
                subjects.append(s)
    counts = [subjects.count(i) for i in range(3)]  # 3, 1, 6
    for i in range(3):
        mean_i = sum(f for f, s in zip(feats, subjects) if s == i) / counts[i]
        torch.testing.assert_close(model.prototypes[i], mean_i, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.priors, torch.tensor([c / sum(counts) for c in counts]))
    assert bool(model.dictionary_ready)
    assert model.bank.counts.sum() == 0  # reset for the next epoch


def test_dataset_confounder_uses_confounder_index():
    stats = _stats(2, confounder="dataset")
    model = _quick_model(stats, TaskSpec("expression", ["anger", "happiness", "surprise"])).eval()
    assert model.prototypes.shape[0] == stats.n_confounders
    batch = {"image": torch.randn(3, 3, 24, 24), "train_subject": torch.tensor([-1, -1, -1]),
             "confounder": torch.tensor([1, 1, 0]), "target": torch.tensor([0, 2, -1])}
    model.training_step(batch, 0)
    model.on_train_epoch_start()
    torch.testing.assert_close(model.priors, torch.tensor([1 / 3, 2 / 3]))
    out = model(batch)
    assert out["logits"].shape == (3, 3) and out["attention"].shape == (3, 2)
    loss, _ = model.compute_loss(out, batch)
    expected = torch.nn.functional.cross_entropy(out["logits"][:2], batch["target"][:2])
    torch.testing.assert_close(loss, expected)


def test_without_cis_differs_only_by_the_cis_module():
    """Table 3 'w/o CIS': same backbone/projector/classifier, f_cur straight to the classifier; the same
    update-free first epoch (so both take the same optimiser steps)."""
    stats = _stats(3)
    with_cis = _quick_model(stats)
    torch.manual_seed(0)
    wo = build_model(resolve("cisnet-resnet18-wo", "synth", "quick"), TaskSpec("au", BP4D_AUS), stats).eval()
    n_cis = sum(p.numel() for p in with_cis.cis.parameters())
    d, dm = with_cis.prototypes.shape[1], with_cis.cis.d_m
    assert n_cis == 2 * (d * dm + dm) + 2 * (d * d + d)  # W_Q, W_K (d -> d_m), W_X, W_S (d -> d)
    assert sum(p.numel() for p in wo.parameters()) == sum(p.numel() for p in with_cis.parameters()) - n_cis
    assert wo.cis is None and wo.bank_only() and with_cis.bank_only()
    img = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        out = wo({"image": img})
        torch.testing.assert_close(out["logits"], wo.head(wo.projector(wo.backbone(img))))
    assert out["attention"] is None


def test_intensity_task_uses_six_level_cross_entropy():
    model = _quick_model(_stats(2, c=3), TaskSpec("intensity", ["AU6", "AU10", "AU12"])).eval()
    batch = {"image": torch.randn(2, 3, 24, 24), "target": torch.tensor([[0.0, 3.0, -1.0], [5.0, 1.0, 2.0]])}
    out = model(batch)
    assert out["logits"].shape == (2, 3, 6) and out["attention"] is None  # no dictionary yet: r_cur = 0
    loss, _ = model.compute_loss(out, batch)
    known = batch["target"] >= 0
    expected = torch.nn.functional.cross_entropy(out["logits"][known], batch["target"][known].long())
    torch.testing.assert_close(loss, expected)


def test_cis_attention_matches_eqs_3_to_5():
    """alpha sums to 1 over subjects; y = W_X f + W_S sum_i alpha_i P(s_i) s_i, alpha from scaled dot products."""
    model = _quick_model(_stats(5)).eval()
    d = model.prototypes.shape[1]
    with torch.no_grad():
        model.prototypes.copy_(torch.randn(5, d))
        model.priors.copy_(torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]))
        model.dictionary_ready.fill_(True)
        img = torch.randn(3, 3, 24, 24)
        out = model({"image": img})
        attn = out["attention"]
        assert attn.shape == (3, 5)
        torch.testing.assert_close(attn.sum(-1), torch.ones(3))
        cis, f, s, p = model.cis, out["feature"], model.prototypes, model.priors
        scores = (cis.w_q(f) @ cis.w_k(s).T) / math.sqrt(cis.d_m)  # Eq. 5
        alpha = scores.exp() / scores.exp().sum(-1, keepdim=True)
        r = (alpha[:, :, None] * (p[None, :, None] * s[None])).sum(1)  # Eq. 4
        y = cis.w_x(f) + cis.w_s(r)  # Eq. 3
        torch.testing.assert_close(attn, alpha, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["logits"], model.head(y), rtol=1e-5, atol=1e-5)
        assert out["logits"].shape == (3, len(BP4D_AUS))


def test_eq6_loss_matches_hand_computation():
    mu = [0.2, 0.5, 0.9]
    stats = TrainStats(n_train=10, label_rate=mu, n_pos=[2, 5, 9], n_neg=[8, 5, 1], label_corr=np.eye(3).tolist(),
                       subjects=["a"], subject_counts=[10], confounders=["a"], confounder_counts=[10])
    model = _quick_model(stats, TaskSpec("au", ["AU1", "AU2", "AU4"]))
    logits = torch.tensor([[1.5, -0.5, 0.2], [-2.0, 0.7, 3.0]])
    target = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # one unknown label
    loss, _ = model.compute_loss({"logits": logits}, {"target": target})

    def sig(x):
        return 1.0 / (1.0 + math.exp(-x))

    terms = []
    for b in range(2):
        for i in range(3):
            p, x = target[b, i].item(), logits[b, i].item()
            if p < 0:
                continue
            terms.append(-((1 - mu[i]) * p * math.log(sig(x)) + mu[i] * (1 - p) * math.log(1 - sig(x))))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # loss.reduction: sum_au_mean_batch (Eq. 6 written per sample: summed over AUs, averaged over the batch)
    model.loss_reduction = "sum_au_mean_batch"
    loss, _ = model.compute_loss({"logits": logits}, {"target": target})
    assert loss.item() == pytest.approx(sum(terms) / 2, rel=1e-5)


def test_loss_goes_through_the_base_supervised_loss(monkeypatch):
    """Eq. 6 and the expression cross-entropy are the base class's one supervised-loss path
    (AUModel.supervised_loss with CISNet's coefficients), not a loss of CISNet's own."""
    from aurecog.models.base import AUModel

    stats = TrainStats(n_train=10, label_rate=[0.2, 0.5], n_pos=[2, 5], n_neg=[8, 5], label_corr=np.eye(2).tolist(),
                       subjects=["a"], subject_counts=[10], confounders=["a"], confounder_counts=[10])
    calls = []
    monkeypatch.setattr(AUModel, "supervised_loss", lambda self, logits, target, **kw: calls.append(kw) or
                        torch.tensor(7.0))
    au = _quick_model(stats, TaskSpec("au", ["AU1", "AU2"]))
    loss, _ = au.compute_loss({"logits": torch.zeros(2, 2)}, {"target": torch.ones(2, 2)})
    assert float(loss) == 7.0 and set(calls[0]) == {"pos_coef", "neg_coef", "reduction"}
    torch.testing.assert_close(calls[0]["pos_coef"], torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(calls[0]["neg_coef"], torch.tensor([0.2, 0.5]))
    fer = _quick_model(stats, TaskSpec("expression", ["anger", "joy"]))
    loss, _ = fer.compute_loss({"logits": torch.zeros(2, 2)}, {"target": torch.tensor([0, 1])})
    assert float(loss) == 7.0 and calls[1] == {}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs on a tiny fake dataset with the paper's SGD (momentum, Nesterov, weight decay)."""
    tmp = tmp_path_factory.mktemp("cisnet")
    make_prepared(tmp / "fake", n_subjects=6, per_subject=8, size=28)
    dm = AUDataModule(dataset_config(), fold=0, data_root=str(tmp), input_size=24, batch_size=8)
    dm.setup()
    cfg = resolve("cisnet-resnet18", "synth", "quick",
                  {"optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.05}})
    L.seed_everything(0)
    model = build_model(cfg, dm.task_spec, dm.stats)
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                self.val0 = float(trainer.callback_metrics[pl_module.monitor])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 0:  # after the module built the epoch-0 dictionary
                self.after0 = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
                self.opt_state0 = len(trainer.optimizers[0].state)
                self.sched0 = trainer.lr_scheduler_configs[0].scheduler.last_epoch
                self.ready0 = bool(pl_module.dictionary_ready)

    rec = Record()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(model, datamodule=dm)
    return {"model": model, "trainer": trainer, "rec": rec, "initial": initial, "dm": dm, "tmp": tmp}


def test_first_epoch_changes_no_weights(fitted):
    rec, initial, model = fitted["rec"], fitted["initial"], fitted["model"]
    assert rec.opt_state0 == 0  # no optimiser step: no momentum buffers
    assert rec.sched0 == 0  # the schedule waits for the first real step
    assert rec.ready0  # the dictionary exists after the bank-only epoch
    changed = [k for k, v in rec.after0.items() if not torch.equal(v, initial[k])]
    assert changed == []
    # the second epoch does train (so the check above can fail)
    assert fitted["trainer"].global_step > 0
    assert any(not torch.equal(v, initial[k]) for k, v in model.named_parameters())
    # the bank-only epoch's validation is skipped and logs a score below any real one
    assert rec.val0 == BANK_ONLY_MONITOR_VALUE


def test_dictionary_survives_checkpoint(fitted):
    model, trainer = fitted["model"], fitted["trainer"]
    path = fitted["tmp"] / "cisnet.ckpt"
    trainer.save_checkpoint(path)
    loaded = CISNet.load_from_checkpoint(path, map_location="cpu")
    assert bool(loaded.dictionary_ready)
    assert loaded.priors.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(loaded.prototypes, model.prototypes)
    torch.testing.assert_close(loaded.priors, model.priors)
    batch = {"image": torch.randn(2, 3, 24, 24)}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["logits"], model(batch)["logits"])


@pytest.mark.ddp
def test_ddp_two_processes_give_the_single_process_dictionary(tmp_path):
    from ddp_cisnet_bank import run

    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=6, size=28)
    single = run(str(tmp_path), str(tmp_path / "single"), devices=1)
    assert single["n_train"] % 2 == 0  # no DistributedSampler padding or dropping
    proc = subprocess.run([sys.executable, str(TESTS / "ddp_cisnet_bank.py"), str(tmp_path),
                           str(tmp_path / "ddp"), "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "dict_rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "dict_rank1.pt")
    assert r0["world_size"] == 2 and r0["global_step"] == single["global_step"] // 2 > 0
    for key in ("prototypes", "priors"):
        # the bank-only epoch sees the same features in both runs: same dictionary
        torch.testing.assert_close(r0["epoch0"][key], single["epoch0"][key], rtol=1e-5, atol=1e-6)
        # every rank holds the same dictionary after a DDP training epoch
        torch.testing.assert_close(r0["epoch1"][key], r1["epoch1"][key], rtol=0, atol=0)
    assert r0["epoch0"]["ready"] and r1["epoch1"]["ready"]
    # manual optimisation under DDP still all-reduces gradients: both ranks end with the same weights, which
    # moved away from the (shared) initial weights
    torch.testing.assert_close(r0["params"], r1["params"])
    torch.testing.assert_close(r0["initial_params"], single["initial_params"])
    assert not torch.allclose(r0["params"], r0["initial_params"])


def test_paper_size_resnet34_params_and_macs():
    """CISNet-ResNet34, 12 AUs, 256 x 256 input: 22.4M parameters, 4.8G multiply-accumulates."""
    with no_pretrained():  # the architecture only: no ImageNet file needed
        model = build_model(resolve("cisnet", "synth", "paper"), TaskSpec("au", BP4D_AUS), _stats(27)).eval()
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PAPER_PARAMS) / PAPER_PARAMS < 0.05
    with torch.no_grad():
        model.prototypes.normal_()
        model.priors.fill_(1 / 27)
        model.dictionary_ready.fill_(True)
        with FlopCounterMode(display=False) as fc:
            out = model({"image": torch.randn(1, 3, 256, 256)})
    assert out["attention"].shape == (1, 27)
    macs = fc.get_total_flops() / 2
    assert abs(macs - PAPER_MACS) / PAPER_MACS < 0.10


# --------------------------------------------------------------------------- recipe controls (issue 16)
def _fit_quick(tmp, variant: str, max_epochs: int = 3, checkpoint_dir: Path | None = None, callbacks=()):
    """Fit a quick-profile CISNet variant on a tiny fake dataset (cosine schedule without warm-up)."""
    if not (tmp / "fake").exists():
        make_prepared(tmp / "fake", n_subjects=6, per_subject=8, size=28)
    dm = AUDataModule(dataset_config(), fold=0, data_root=str(tmp), input_size=24, batch_size=8, progress=False)
    dm.setup()
    cfg = resolve(variant, "synth", "quick", {"schedule": {"name": "cosine", "warmup_epochs": 0, "final_factor": 0.0},
                                              "trainer": {"max_epochs": max_epochs}})
    L.seed_everything(0)
    model = build_model(cfg, dm.task_spec, dm.stats)
    cbs = list(callbacks)
    if checkpoint_dir is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        cbs.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor=model.monitor, mode="max",
                                   save_top_k=1, enable_version_counter=False))
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=checkpoint_dir is not None,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=cbs)
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_table3_pair_takes_the_same_steps_and_a_schedule_sized_by_them(tmp_path):
    """w/ and w/o CIS (Table 3) take the same optimiser steps (both spend epoch 0 without an update) and the
    cosine schedule ends at its final factor after the last step actually taken (not part-way)."""
    runs = {v: _fit_quick(tmp_path, v) for v in ("cisnet-resnet18", "cisnet-resnet18-wo")}
    updates = {}
    for v, (model, trainer) in runs.items():
        assert model.automatic_optimization  # the base class's step, logging, clipping and scheduler paths
        sched = trainer.lr_scheduler_configs[0].scheduler
        # global_step also counts the bank-only epoch's batches, in which neither weights nor schedule move
        updates[v] = trainer.global_step - trainer.num_training_batches
        assert sched.last_epoch == updates[v] == 2 * trainer.num_training_batches, v
        assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12), v  # cosine factor at its end: 0
    assert runs["cisnet-resnet18"][1].global_step == runs["cisnet-resnet18-wo"][1].global_step


def test_best_checkpoint_holds_the_dictionary_it_was_validated_with(tmp_path):
    class Used(L.Callback):
        def __init__(self):
            self.by_epoch = {}

        def on_validation_epoch_end(self, trainer, pl_module):
            self.by_epoch[trainer.current_epoch] = (pl_module.prototypes.clone(), pl_module.priors.clone())

    used = Used()
    _fit_quick(tmp_path, "cisnet-resnet18", max_epochs=3, checkpoint_dir=tmp_path / "ckpt", callbacks=[used])
    ckpt = torch.load(tmp_path / "ckpt" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] >= 1  # a validated epoch (epoch 0 only fills the banks)
    loaded = CISNet.load_from_checkpoint(tmp_path / "ckpt" / "best.ckpt", map_location="cpu")
    protos, priors = used.by_epoch[ckpt["epoch"]]
    torch.testing.assert_close(loaded.prototypes, protos, rtol=0, atol=0)
    torch.testing.assert_close(loaded.priors, priors, rtol=0, atol=0)


def test_loss_pos_weight_is_read_or_refused():
    """``loss.pos_weight`` (the base class's balanced BCE) is not silently ignored: it conflicts with Eq. 6's
    weighting, and replaces it when ``loss.au_weighting: none``."""
    stats = _stats(3)
    cfg = resolve("cisnet-resnet18", "synth", "quick", {"loss": {"pos_weight": "balanced"}})
    with pytest.raises(ValueError, match="loss.pos_weight"):
        build_model(cfg, TaskSpec("au", BP4D_AUS), stats)
    cfg = resolve("cisnet-resnet18", "synth", "quick", {"loss": {"pos_weight": "balanced", "au_weighting": "none"}})
    model = build_model(cfg, TaskSpec("au", BP4D_AUS), stats)
    logits, target = torch.randn(4, 12), (torch.rand(4, 12) < 0.4).float()
    loss, _ = model.compute_loss({"logits": logits}, {"target": target})
    pos = torch.tensor(stats.n_neg, dtype=torch.float32) / torch.tensor(stats.n_pos, dtype=torch.float32)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos)
    torch.testing.assert_close(loss, expected)


def test_paper_profile_initialises_from_imagenet_and_checkpoints_need_no_weights(tmp_path):
    """The paper profile asks for torchvision's ImageNet ResNet-34 (the authors' initialisation); a trained
    checkpoint reloads without the ImageNet file (its weights come from the checkpoint)."""
    import torchvision

    paper = resolve("cisnet", "synth", "paper")
    assert paper["backbone"]["pretrained"] is True and paper["backbone"]["pretrained_tag"] == "tv_in1k"
    torch.manual_seed(3)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)
    cfg = resolve("cisnet-resnet18", "synth", "quick",
                  {"backbone": {"channels": None, "pretrained": True, "pretrained_file": str(path)}})
    model = build_model(cfg, TaskSpec("au", BP4D_AUS), _stats(3))
    torch.testing.assert_close(model.backbone.conv1.weight, tv.conv1.weight)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    path.unlink()
    loaded = CISNet.load_from_checkpoint(tmp_path / "m.ckpt", map_location="cpu")
    torch.testing.assert_close(loaded.backbone.conv1.weight, tv.conv1.weight)
