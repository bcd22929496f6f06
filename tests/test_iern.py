"""IERN (Chen et al., ACM MM 2022): strata batching, the three-optimizer loop, centre loss, confusion losses,
test-time branch, variants, DDP."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import dataset_config, make_prepared

from aurecog.config import model_variants, resolve
from aurecog.data.datamodule import AUDataModule
from aurecog.models.iern import IERN, StrataBatchNorm2d, center_loss, confusion_loss, warmup_hold_linear
from aurecog.models.registry import build_model
from aurecog.tasks import TaskSpec, TrainStats

EMOTIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]


def _stats(n_conf: int = 3, k: int = 6) -> TrainStats:
    return TrainStats(n_train=60, label_rate=[1 / k] * k, n_pos=[10] * k, n_neg=[50] * k,
                      label_corr=torch.eye(k).tolist(), subjects=["s0", "s1"], subject_counts=[30, 30],
                      confounder="dataset", confounders=[f"d{i}" for i in range(n_conf)],
                      confounder_counts=[20] * n_conf)


def _cfg(variant: str = "iern", input_size: int = 32, dim: int = 8) -> dict:
    cfg = resolve(variant, "synth", "quick")
    cfg["data"]["input_size"] = input_size
    if "iern" in cfg:
        cfg["iern"].update(feat_dim=dim, dis_channels=[dim, dim, dim, dim], nwgm_dim=dim)
    return cfg


def _model(variant: str = "iern", kind: str = "expression", n_conf: int = 3) -> IERN:
    torch.manual_seed(0)
    names = EMOTIONS if kind == "expression" else ["AU1", "AU2", "AU4"]
    return IERN(TaskSpec(kind, names), _stats(n_conf, len(names)), _cfg(variant))


def _batch(b: int = 6, kind: str = "expression", n_conf: int = 3, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(1)
    target = (torch.randint(0, 6, (b,), generator=g) if kind == "expression"
              else torch.randint(0, 2, (b, 3), generator=g).float())
    return {"image": torch.randn(b, 3, size, size, generator=g), "target": target,
            "confounder": torch.arange(b) % n_conf}


# ---------------------------------------------------------------------------------------------- Eqs. 7/9 batching
@pytest.mark.parametrize("train", [False, True])
def test_batched_strata_equal_explicit_loop(train):
    m = _model()
    m.train(train)
    emo = torch.randn(5, m.dim, m.size, m.size)
    centers = torch.randn(3, m.dim, m.size, m.size)
    m_loop = copy.deepcopy(m)
    batched = m.deconfounded_logits(emo, centers)
    loop = m_loop.deconfounded_logits_loop(emo, centers)
    assert batched.shape == (5, 6)
    torch.testing.assert_close(batched, loop, rtol=1e-4, atol=1e-5)
    # the running statistics of g_r's BatchNorms receive the same N_c sequential updates
    for (n, a), (_, b) in zip(m.g_r.named_buffers(), m_loop.g_r.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    if train:
        bn = next(x for x in m.g_r.modules() if isinstance(x, StrataBatchNorm2d))
        assert int(bn.num_batches_tracked) == 3


def test_eval_logits_are_mean_of_per_stratum_logits():
    """Eq. 9 written out by hand: average f_c(g_r(g_e(f_b x), C_i)) over the strata, C the learned centres."""
    m = _model().eval()
    x = _batch()["image"]
    with torch.no_grad():
        out = m({"image": x})["logits"]
        emo = m.g_e(m.backbone(x))
        ref = torch.stack([m.f_c(m.g_r.net(torch.cat([emo, c.expand_as(emo)], 1))) for c in m.centers]).mean(0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- Algorithm 1
def _snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _changed(before, m):
    return {n for n, p in m.named_parameters() if not torch.equal(before[n], p.detach())}


def _prefixes(names):
    return {n.split(".")[0] for n in names}


@pytest.mark.parametrize("kind", ["expression", "au"])
def test_each_optimizer_step_changes_only_its_group(kind):
    m = _model(kind=kind)
    m.train()
    opt_dis, opt_feat, opt_cls = m.build_optimizers()
    batch = _batch(kind=kind)
    base = m.backbone(batch["image"])
    emo, con = m.disentangle_features(base.detach())

    s0 = _snapshot(m)
    m.discriminator_step(opt_dis, emo, con, batch)
    assert _prefixes(_changed(s0, m)) == {"d_e", "d_c"}

    s1 = _snapshot(m)
    parts = m.feature_step(opt_feat, base.detach(), emo, con, batch)
    assert _prefixes(_changed(s1, m)) == {"g_e", "g_c", "g_r", "centers"}
    assert set(parts) == {"gen", "recon", "center"}

    s2 = _snapshot(m)
    bn_before = {n: b.clone() for n, b in m.g_e.named_buffers()}
    m.classifier_step(opt_cls, base, batch)  # no in-place-modification error: g_e is recomputed
    assert _prefixes(_changed(s2, m)) == {"backbone", "g_e", "f_c"}
    for n, b in m.g_e.named_buffers():  # the recomputation does not update g_e's BN statistics again
        assert torch.equal(b, bn_before[n]), n
    # optimisers hold disjoint sets except g_e (Feat and Cls, Algorithm 1), and g_r is in none of Cls's groups
    p = m.optimizer_params()
    cls_ids = {id(q) for q in p["cls_backbone"] + p["cls_heads"]}
    assert not cls_ids & {id(q) for q in m.g_r.parameters()}
    assert {id(q) for q in p["feat"]} & cls_ids == {id(q) for q in m.g_e.parameters()}
    lrs = [g["lr"] for g in opt_cls.param_groups]
    assert lrs == [m.cfg["optim"]["backbone_lr"], m.cfg["optim"]["lr"]]
    assert opt_cls.defaults["betas"] == (0.5, 0.999)


def test_classifier_gradient_reaches_backbone_and_not_centres():
    m = _model()
    _, _, opt_cls = m.build_optimizers()
    batch = _batch()
    base = m.backbone(batch["image"])
    opt_cls.step = lambda *a, **k: None  # inspect the gradients only
    m.classifier_step(opt_cls, base, batch)
    assert m.backbone.proj.weight.grad is not None and m.backbone.proj.weight.grad.abs().sum() > 0
    assert m.centers.grad is None and all(q.grad is None for q in m.g_r.parameters())
    assert all(q.grad is None for q in m.g_c.parameters())


# ---------------------------------------------------------------------------------------------- Eq. 6
def test_center_loss_value_and_gradients():
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]], requires_grad=True)
    c = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 1, -1])  # the unknown label is ignored
    lam = 0.1
    loss = center_loss(x, c, y, lam)
    # (1/2) [ (1 + 4) + (4 + 1) ] = 5 over the 2 labelled samples
    assert loss.item() == pytest.approx(lam * 5.0)
    loss.backward()
    torch.testing.assert_close(x.grad, lam * torch.tensor([[1.0, 2.0], [2.0, -1.0], [0.0, 0.0]]))
    # centres: gradient of the unweighted loss (the authors' 1/lambda_2 rescaling)
    torch.testing.assert_close(c.grad, torch.tensor([[-1.0, -2.0], [-2.0, 1.0]]))


def test_center_loss_pulls_centres_to_group_means():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    feats = torch.randn(40, 4, generator=g) + torch.where(labels[:, None] == 0, 3.0, -2.0)
    centers = torch.nn.Parameter(torch.randn(2, 4, generator=g))
    opt = torch.optim.Adam([centers], lr=0.05, betas=(0.5, 0.999))
    for _ in range(600):
        opt.zero_grad()
        center_loss(feats, centers, labels, 5e-4).backward()
        opt.step()
    means = torch.stack([feats[labels == k].mean(0) for k in range(2)])
    torch.testing.assert_close(centers.detach(), means, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------- Eqs. 3-4
def test_confusion_losses_minimal_at_uniform():
    assert confusion_loss(torch.zeros(4, 6), "expression").item() == 0.0
    assert confusion_loss(torch.zeros(4, 12), "au").item() == 0.0
    assert confusion_loss(torch.zeros(4, 3, 6), "intensity").item() == 0.0
    # hand value: logits (log 2, 0) -> p = (2/3, 1/3), MSE to (1/2, 1/2) = 1/36
    assert confusion_loss(torch.tensor([[torch.log(torch.tensor(2.0)), 0.0]]), "expression").item() == \
        pytest.approx(1 / 36, rel=1e-5)
    z = torch.zeros(2, 6, requires_grad=True)
    confusion_loss(z, "expression").backward()
    assert z.grad.abs().max() == 0  # stationary point
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert confusion_loss(torch.randn(4, 6, generator=g), "expression") > 0
        assert confusion_loss(torch.randn(4, 12, generator=g), "au") > 0


# ---------------------------------------------------------------------------------------------- test branch
def test_test_time_uses_top_branch_only(tmp_path):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=6, datasets=("d0", "d1", "d2"))
    dm = AUDataModule(dataset_config("fake", task="expression", confounder="dataset"), fold=0,
                      data_root=str(tmp_path), input_size=32, batch_size=8)
    dm.setup()
    m = build_model(_cfg("iern"), dm.task_spec, dm.stats)
    before = _snapshot(m)
    tr = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    tr.fit(m, datamodule=dm)  # the three-optimizer loop under a Trainer (manual optimisation)
    assert _prefixes(_changed(before, m)) == {"backbone", "g_e", "g_c", "g_r", "d_e", "d_c", "f_c", "centers"}
    assert {"train/loss", "train/dis", "train/gen", "train/recon", "train/center"} <= set(tr.callback_metrics)

    def boom(*a, **k):
        raise AssertionError("training-only branch called at test time")

    for mod in (m.g_c, m.d_e, m.d_c):
        mod.forward = boom
    m.reconstruct = boom
    tr.test(m, datamodule=dm, verbose=False)
    assert 0.0 <= m.test_results["metrics"]["acc"] <= 1.0


# ---------------------------------------------------------------------------------------------- variants
def test_variants_registered():
    v = model_variants()
    assert v["iern"]["main"] and v["iern"]["group"] == "iern"
    for name in ("iern-baseline", "iern-disentangle", "iern-nwgm", "iern-resample"):
        assert v[name]["group"] == "iern-ablation"
    assert v["iern-baseline"]["family"] == "baseline"
    for name in ("iern-disentangle", "iern-nwgm", "iern-resample"):
        assert resolve(name, "synth-fermix", "quick")["iern"]["mode"] == name.split("-")[1]


@pytest.mark.parametrize("variant,kind", [("iern", "au"), ("iern-disentangle", "expression"),
                                          ("iern-nwgm", "expression"), ("iern-resample", "au")])
def test_fit_and_test(tmp_path, variant, kind):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=6, datasets=("d0", "d1", "d2"))
    conf = "dataset" if kind == "expression" else "subject"
    dm = AUDataModule(dataset_config("fake", task=kind, confounder=conf), fold=0, data_root=str(tmp_path),
                      input_size=32, batch_size=8)
    dm.setup()
    m = build_model(_cfg(variant), dm.task_spec, dm.stats)
    before = _snapshot(m)
    tr = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    tr.fit(m, datamodule=dm)
    assert "backbone" in _prefixes(_changed(before, m))
    assert torch.isfinite(tr.callback_metrics["train/loss"])
    tr.test(m, datamodule=dm, verbose=False)
    assert m.test_results["metrics"]
    if variant == "iern-nwgm":  # dictionary = per-confounder mean pooled feature of the first epoch
        assert m.dictionary.abs().sum() > 0 and m.prior.sum().item() == pytest.approx(1.0)


def test_resample_cell_weights_hand_computed():
    m = _model("iern-resample", n_conf=2)
    # confounder 0: classes 0,0,0,1 ; confounder 1: class 1 -> cells (0,0):3 (0,1):1 (1,1):1, 5 samples, 3 cells
    conf = torch.tensor([0, 0, 0, 0, 1])
    y = torch.tensor([0, 0, 0, 1, 1])
    m.set_cell_weights(y, conf)
    w = m.cell_weight
    assert w[0, 0].item() == pytest.approx(5 / (3 * 3))
    assert w[0, 1].item() == pytest.approx(5 / 3) and w[1, 1].item() == pytest.approx(5 / 3)
    assert (w[conf, y].sum()).item() == pytest.approx(5.0)  # weights average 1 over the training samples
    logits = torch.randn(5, 6)
    ref = (w[conf, y] * torch.nn.functional.cross_entropy(logits, y, reduction="none")).mean()
    torch.testing.assert_close(m.resample_loss(logits, y, conf), ref)


# ---------------------------------------------------------------------------------------------- schedule, size
def test_warmup_hold_linear_schedule():
    f = [warmup_hold_linear(s, 2, 3, 10) for s in range(11)]
    assert f[:2] == [0.5, 1.0] and f[2:5] == [1.0, 1.0, 1.0]
    assert f[5] == 1.0 and f[10] == 0.0 and f[6] == pytest.approx(0.8)


def test_paper_size_parameter_count():
    """Table 5 at 224 input: ResNet-50 trunk (23,508,032) + 1x1 2048->512, generators, discriminators, g_r,
    classifier and 3 centres of 512x7x7, counted from the table's layer list."""
    from aurecog.models.backbones import no_pretrained

    cfg = resolve("iern", "synth-fermix", "paper")
    with no_pretrained():  # sizes only: no ImageNet file needed
        m = IERN(TaskSpec("expression", EMOTIONS), _stats(3), cfg)
    assert m.size == 7
    d = 512
    conv3 = d * d * 9
    block = 2 * conv3 + 2 * 2 * d  # two bias-free 3x3 convs + two BN (weight, bias)
    gen = conv3 + d + 2 * block
    recon = 2 * d * d * 9 + d + 3 * block

    def dis(n_out):
        return (d * 512 * 16 + 512) + (512 * 256 + 256) + (256 * 128 + 128) + (128 * 64 + 64) + 64 * n_out * 9

    expected = {
        "backbone": 23_508_032 + 2048 * d + d, "g_e": gen, "g_c": gen, "g_r": recon, "d_e": dis(6), "d_c": dis(3),
        "f_c": d * 6 + 6, "centers": 3 * d * 7 * 7,
    }
    got = {k: sum(p.numel() for n, p in m.named_parameters() if n.split(".")[0] == k) for k in expected}
    assert got == expected
    assert sum(got.values()) == sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_ddp_two_cpu_processes(tmp_path):
    script = Path(__file__).with_name("ddp_iern.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    init = torch.load(tmp_path / "init.pt")
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    params = [k for k in r0 if "running_" not in k and "num_batches" not in k]
    for k in params:  # gradients were averaged: the ranks hold identical weights
        assert torch.equal(r0[k], r1[k]), k
    for group in ("backbone.", "g_e.", "g_c.", "g_r.", "d_e.", "d_c.", "f_c.", "centers"):
        assert any(k.startswith(group) and not torch.equal(r0[k], init[k]) for k in params), group


# ---------------------------------------------------------------------------------------------- iern-baseline, bias90
def test_iern_baseline_uses_iern_backbone_lr_and_schedule():
    """'Baseline' of Tables 2-3 trains with IERN's optimiser: backbone at optim.backbone_lr (1e-4, the rest 2e-4)
    and the warm-up / 15-epoch hold / linear-decay schedule (before: one lr for all, no hold)."""
    from aurecog.models.backbones import no_pretrained
    from aurecog.models.base import build_optimizer

    cfg = resolve("iern-baseline", "synth-fermix", "paper")
    with no_pretrained():
        m = build_model(cfg, TaskSpec("expression", EMOTIONS), _stats(3))
    from types import SimpleNamespace

    m._trainer = SimpleNamespace(estimated_stepping_batches=1000, max_epochs=cfg["trainer"]["max_epochs"])
    out = build_optimizer(m, m.param_groups(), cfg)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    trunk = {id(p) for p in m.backbone.parameters()}
    lrs = {("trunk" if id(p) in trunk else "head"): g["initial_lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {"trunk": 1.0e-4, "head": 2.0e-4}
    # 1000 steps over max_epochs=80 epochs -> 12.5 steps per epoch; warm-up 5, hold 15 epochs
    per_epoch = 1000 / cfg["trainer"]["max_epochs"]
    warm, hold = round(5 * per_epoch), round(15 * per_epoch)
    factors = [sched.lr_lambdas[0](s) for s in range(1000)]
    ref = [warmup_hold_linear(s, warm, hold, 1000) for s in range(1000)]
    assert factors == ref and factors[warm + hold - 1] == 1.0 and factors[warm + hold + 10] < 1.0


def test_bias90_moves_whole_sequences():
    """bias90 (Table 3, 'sequence-independent'): the moved 10% of each held-out cell are whole sequences, so
    no test frame shares a (subject, session) with a training frame (before: single frames, 18% of the test
    frames had a sequence mate in training)."""
    import pandas as pd

    from aurecog.config import load_dataset
    from aurecog.data.protocols import split_rows

    rows = []
    for ds in ("ckplus", "mmi", "oulu"):
        for e in range(6):
            for q in range(30):  # 30 three-frame sequences per (dataset, emotion) cell
                for f in range(3):
                    rows.append({"dataset": ds, "subject": f"{ds}_{q % 10}", "session": f"{e}-{q}", "frame": f,
                                 "expression": e})
    index = pd.DataFrame(rows)
    protos = load_dataset("fermix")["protocols"]
    for fold in range(3):
        tr100, te100 = split_rows(index, protos["bias100"], fold, EMOTIONS)
        tr, te = split_rows(index, protos["bias90"], fold, EMOTIONS)
        seq = (index["subject"] + "/" + index["session"]).to_numpy()
        assert not set(seq[tr]) & set(seq[te])
        moved = np.setdiff1d(te100, te)
        assert len(moved) == 6 * 3 * 3  # 6 held-out cells x 3 of their 30 sequences x 3 frames
        assert set(np.concatenate([tr, te])) == set(range(len(index)))
