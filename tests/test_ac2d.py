"""AC²D (aurecog/models/ac2d.py): attention ground truth (Eqs. 3-5), Eq. 7, Eq. 14 weights, branch independence,
batch-independent evaluation, the paper's parameter count (Table 6) and the Fig. 5 renderer."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from aurecog.config import model_variants, resolve
from aurecog.data.datamodule import AUDataModule
from aurecog.data.landmarks import INTRAFACE49_FROM_IBUG68
from aurecog.data.transforms import FaceTransform
from aurecog.models.ac2d import (
    AC2D,
    BAttention,
    attention_kl,
    complexity,
    gaussian_attention_gt,
    subcentre_table,
    subcentres,
)
from aurecog.models.losses import weighted_bce
from aurecog.models.registry import build_model
from aurecog.tasks import TaskSpec, TrainStats
from tests.helpers import BP4D_AUS, dataset_config, make_prepared


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread avoids OpenMP spin-waiting on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# pretrained_file: None: the quick profile's pretrained trunk (width 16) does not fit the width-8 test network
TINY = {"ac2d": {"width": 8, "depths": [1, 1, 2], "drop_path": 0.0, "attention": {"sigma": 1.0},
                 "pretrained_file": None},
        "data": {"input_size": 32, "batch_size": 8, "eval_batch_size": 16}}


def tiny_cfg(variant: str = "ac2d", **extra) -> dict:
    over = {"ac2d": dict(TINY["ac2d"]), "data": dict(TINY["data"])}
    for k, v in extra.items():
        over["ac2d"][k] = v
    return resolve(variant, "synth", "quick", overrides=over)


def toy_stats(m: int, rate=0.3) -> TrainStats:
    return TrainStats(n_train=100, label_rate=[rate] * m, n_pos=[30] * m, n_neg=[70] * m, label_corr=[[1.0]],
                      subjects=["s"], subject_counts=[100])


def tiny_model(variant="ac2d", names=BP4D_AUS, kind="au", **extra) -> AC2D:
    torch.manual_seed(0)
    return build_model(tiny_cfg(variant, **extra), TaskSpec(kind, names), toy_stats(len(names)))


def random_batch(b=4, size=32, m=12, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 3, size, size, generator=g),
            "landmarks": torch.rand(b, 68, 2, generator=g) * (size * 0.6) + size * 0.2,
            "target": (torch.rand(b, m, generator=g) < 0.4).float()}


# --------------------------------------------------------------------------- ground-truth attention (Eqs. 3-5)
def test_gt_sums_to_one_and_peaks_at_subcentres():
    size, grid = 176, 22
    lm = torch.full((1, 49, 2), 88.0)
    cell = 176 / 22  # 8 px; the centre of cell k is at pixel 8k + 3.5 (pixel-index coordinates)
    lm[0, 22, 0], lm[0, 25, 0] = 60.0, 100.0  # ruler r = 40 px
    lm[0, 31] = torch.tensor([3 * cell + 3.5, 15 * cell + 3.5])  # mouth corners -> AU12
    lm[0, 37] = torch.tensor([17 * cell + 3.5, 15 * cell + 3.5])
    lm[0, 4] = torch.tensor([9 * cell + 3.5, 8 * cell + 3.5 + 20])  # inner brows; AU1 is r/2 = 20 px above
    lm[0, 5] = torch.tensor([12 * cell + 3.5, 8 * cell + 3.5 + 20])
    idx, dy, table = subcentre_table(["AU1", "AU12"], "au")
    pts = subcentres(lm, idx, dy)
    torch.testing.assert_close(pts[0, :2], torch.tensor([[9 * cell + 3.5, 8 * cell + 3.5], [12 * cell + 3.5,
                                                                                         8 * cell + 3.5]]))
    gt, has = gaussian_attention_gt(pts, table, size, grid, sigma=3.0)
    assert gt.shape == (1, 2, grid * grid) and has.all()
    torch.testing.assert_close(gt.sum(-1), torch.ones(1, 2))
    for j, cells in ((0, [(8, 9), (8, 12)]), (1, [(15, 3), (15, 17)])):
        mp = gt[0, j].reshape(grid, grid)
        for r, c in cells:  # both sub-centres are (equal) global maxima
            assert math.isclose(float(mp[r, c]), float(mp.max()), rel_tol=1e-6)
        # Eq. 3-5 by hand at one cell: exp(-d^2 / (2 delta^2)) of the nearer sub-centre over the map's sum
        r0, c0 = cells[0]
        raw = torch.tensor([[max(math.exp(-((a - cells[0][0]) ** 2 + (b - cells[0][1]) ** 2) / 18),
                                 math.exp(-((a - cells[1][0]) ** 2 + (b - cells[1][1]) ** 2) / 18))
                             for b in range(grid)] for a in range(grid)])
        torch.testing.assert_close(mp, (raw / raw.sum()).float(), rtol=1e-5, atol=1e-7)


def test_flip_swaps_subcentres_and_mirrors_gt():
    size, grid = 48, 6
    rng = np.random.default_rng(3)
    lm = rng.uniform(6, 42, size=(68, 2)).astype(np.float32)
    image = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    _, lm_plain, f0 = FaceTransform(False, size)(image, lm)
    _, lm_flip, f1 = FaceTransform(True, size, flip_p=1.0, jitter_p=0.0)(image, lm)
    assert not f0 and f1
    names = BP4D_AUS + ["AU9", "AU25", "AU26", "AU5", "AU20"]
    idx, dy, table = subcentre_table(names, "au")
    p0, p1 = subcentres(lm_plain[None], idx, dy)[0], subcentres(lm_flip[None], idx, dy)[0]
    mirror = lambda p: torch.stack([size - 1 - p[..., 0], p[..., 1]], -1)  # noqa: E731
    for j, name in enumerate(names):
        a, b = table[j]
        if name in ("AU23", "AU24", "AU25"):  # both sub-centres on the midline: each maps to itself
            torch.testing.assert_close(p1[a], mirror(p0[a]), atol=1e-4, rtol=0)
        else:  # left/right pair: sub-centre 1 of the flipped face is the mirror of sub-centre 2
            torch.testing.assert_close(p1[a], mirror(p0[b]), atol=1e-4, rtol=0)
            torch.testing.assert_close(p1[b], mirror(p0[a]), atol=1e-4, rtol=0)
    g0, _ = gaussian_attention_gt(p0[None], table, size, grid, 1.0)
    g1, _ = gaussian_attention_gt(p1[None], table, size, grid, 1.0)
    torch.testing.assert_close(g1.reshape(-1, grid, grid), g0.reshape(-1, grid, grid).flip(-1), atol=1e-6, rtol=1e-4)


def test_68_point_landmarks_use_the_49_point_layout():
    lm68 = torch.rand(2, 68, 2) * 100
    idx, dy, _ = subcentre_table(["AU12"], "au")
    pts = subcentres(lm68, idx, dy)
    torch.testing.assert_close(pts[:, 0], lm68[:, INTRAFACE49_FROM_IBUG68[31]])
    torch.testing.assert_close(pts[:, 1], lm68[:, 54])  # 49-pt 37 = iBUG mouth corner 54


def test_expression_prior_and_unknown_outputs():
    idx, dy, table = subcentre_table(["happiness", "neutral", "sadness"], "expression")
    assert (table[0] >= 0).sum() == 4  # AU6 + AU12, two sub-centres each
    assert (table[1] >= 0).sum() == 0  # neutral: no prior
    assert (table[2] >= 0).sum() == 6
    happy = set(idx[table[0]].tolist())
    assert happy == {24, 29, 31, 37}
    _, _, t2 = subcentre_table(["AU1", "AU99"], "au")
    pts = torch.rand(1, len(idx), 2)
    gt, has = gaussian_attention_gt(pts, table, 32, 4, 1.0)
    assert has.tolist() == [True, False, True]
    assert (t2[1] < 0).all()


# --------------------------------------------------------------------------- Eq. 7 and the attention average
def test_eq7_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    b, m, cells = 2, 3, 4
    gt = torch.rand(b, m, cells, generator=g)
    gt[0, 1, 2] = 0.0  # 0 log 0 = 0
    gt = gt / gt.sum(-1, keepdim=True)
    pred = torch.rand(b, m, cells, generator=g).softmax(-1)
    hand = 0.0
    for i in range(b):
        s = 0.0
        for j in range(m):
            for t in range(cells):
                p = float(gt[i, j, t])
                s += (p * math.log(p) if p > 0 else 0.0) - p * math.log(float(pred[i, j, t]))
        hand += s / (m * cells)
    hand /= b
    assert math.isclose(float(attention_kl(gt, pred.log())), hand, rel_tol=1e-5)
    mask = torch.tensor([True, False, True])
    hand_masked = sum(
        float((gt[i, j] * (gt[i, j].clamp_min(1e-30).log() - pred[i, j].log())).sum()) for i in range(b) for j in (0, 2)
    ) / (2 * cells) / b
    assert math.isclose(float(attention_kl(gt, pred.log(), mask)), hand_masked, rel_tol=1e-5)


def test_attention_average_is_over_heads_and_queries():
    torch.manual_seed(0)
    m, b, h, w, c, heads = 2, 3, 4, 4, 8, 2
    att = BAttention(m, c, heads, sr=1)
    x = torch.randn(m, b, h * w, c)
    y, extra = att(x, h, w, stats="each", return_full=True)
    full = extra["full"]
    assert y.shape == (m, b, h * w, c)
    assert full.shape == (m, b, heads, h * w, h * w)  # heads x queries x keys
    assert extra["avg"].shape == (m, b, h * w)
    torch.testing.assert_close(extra["avg"], full.mean((2, 3)))
    torch.testing.assert_close(extra["avg"].sum(-1), torch.ones(m, b))
    torch.testing.assert_close(extra["mean_log"], full.log().mean((2, 3)), atol=1e-5, rtol=1e-5)
    # the explicit path equals the fused one (SDPA) used when no statistics are needed
    y2, none = att(x, h, w)
    assert none is None
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
    # spatial reduction: keys on the reduced grid
    att2 = BAttention(1, c, 1, sr=2)
    _, e2 = att2(torch.randn(1, b, 64, c), 8, 8, stats="avg")
    assert e2["avg"].shape == (1, b, 16)


def test_model_attention_output_and_loss():
    model = tiny_model().train()
    batch = random_batch()
    out = model(batch)
    assert out["logits"].shape == (4, 12)
    assert out["attention"].shape == (4, 12, 16)  # 32 px input -> 4 x 4 stage-3 grid
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(4, 12))
    loss, parts = model.compute_loss(out, batch)
    gt, has = model.attention_target(batch, 4)
    l_a = attention_kl(gt, out["attention"].log(), has)
    torch.testing.assert_close(parts["loss_attention"], l_a)
    assert model.lambda_a == model.cfg["ac2d"]["attention"]["lambda"]
    torch.testing.assert_close(loss, parts["loss_au"] + model.lambda_a * l_a)  # Eq. 15
    # A^e: the mean over channels of KL(gt || A_s)
    ae = tiny_model("ac2d-ae").train()
    out = ae(batch)
    _, parts = ae.compute_loss(out, batch)
    assert parts["loss_attention"] > attention_kl(gt, out["attention"].log(), has) - 1e-6  # Jensen
    # B-Net: no attention loss
    bnet = tiny_model("ac2d-bnet").train()
    out = bnet(batch)
    _, parts = bnet.compute_loss(out, batch)
    assert "loss_attention" not in parts and "attention" not in out


# --------------------------------------------------------------------------- Eq. 14
def test_eq14_weights_and_loss_match_hand_computation(tmp_path):
    y = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    n, m = y.shape
    occ = y.sum(0)  # 2, 1, 3
    stats = TrainStats(n_train=n, label_rate=(occ / n).tolist(), n_pos=occ.int().tolist(),
                       n_neg=(n - occ).int().tolist(), label_corr=[[1.0]], subjects=["s"], subject_counts=[n])
    model = build_model(tiny_cfg(), TaskSpec("au", ["AU1", "AU2", "AU4"]), stats)
    inv = [n / 2, n / 1, n / 3]
    w_paper = [v / sum(inv) for v in inv]
    v = [(n - 2) / 2, (n - 1) / 1, (n - 3) / 3]
    torch.testing.assert_close(model.au_weight, torch.tensor([wp * m for wp in w_paper]))
    torch.testing.assert_close(model.pos_weight, torch.tensor(v))
    logits = torch.tensor([[0.3, -1.0, 2.0], [1.5, 0.2, -0.4]])
    target = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    loss, parts = model.compute_loss({"logits": logits}, {"target": target})
    sig = torch.sigmoid(logits)
    terms = []
    for i in range(2):
        for j in range(3):
            p = float(target[i, j])
            if p < 0:
                continue
            terms.append(-w_paper[j] * m * (v[j] * p * math.log(sig[i, j]) + (1 - p) * math.log(1 - sig[i, j])))
    assert math.isclose(float(parts["loss_au"]), sum(terms) / len(terms), rel_tol=1e-5)
    # with every label known, the mean over B x m with mean-1 weights is the paper's per-sample sum with w_j
    full = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    per_sample = [-sum(w_paper[j] * (v[j] * full[i, j] * math.log(sig[i, j]) + (1 - full[i, j])
                                     * math.log(1 - sig[i, j])) for j in range(3)) for i in range(2)]
    got = weighted_bce(logits, full, au_weight=model.au_weight, pos_coef=model.pos_weight)
    assert math.isclose(float(got), sum(per_sample) / 2, rel_tol=1e-5)


def test_loss_goes_through_the_base_supervised_loss(monkeypatch):
    """Eq. 14's L_u and the expression/intensity cross-entropy are the base class's one supervised-loss path
    (AUModel.supervised_loss with AC2D's w_j, v_j), not a loss of AC2D's own."""
    from aurecog.models.base import AUModel

    calls = []
    monkeypatch.setattr(AUModel, "supervised_loss", lambda self, logits, target, **kw: calls.append(kw) or
                        torch.tensor(7.0))
    model = tiny_model("ac2d-bnet", names=["AU1", "AU2", "AU4"])
    _, parts = model.compute_loss({"logits": torch.zeros(2, 3)}, {"target": torch.ones(2, 3)})
    assert float(parts["loss_au"]) == 7.0 and set(calls[0]) == {"au_weight", "pos_coef"}
    assert calls[0]["au_weight"] is model.au_weight and calls[0]["pos_coef"] is model.pos_weight
    fer = tiny_model("ac2d-bnet", names=["anger", "joy"], kind="expression")
    _, parts = fer.compute_loss({"logits": torch.zeros(2, 2)}, {"target": torch.tensor([0, 1])})
    assert float(parts["loss_au"]) == 7.0 and calls[1] == {}


# --------------------------------------------------------------------------- structure
def _branch_params(model):
    for name, p in model.named_parameters():
        if name.startswith(("net.patch3", "net.stage3", "net.norm", "head")):
            yield name, p


def test_branch_gradients_are_isolated():
    model = tiny_model().train()
    m = 12
    with torch.no_grad():  # a prototype from a finished epoch: the causal modules are in use
        model.prototype.normal_()
        model.prototype_ready.fill_(True)
    batch = random_batch()
    j = 5
    out = model(batch)
    out["logits"][:, j].sum().backward()
    for name, p in _branch_params(model):
        g = p.grad.reshape(m, -1).abs().sum(1)
        assert g[j] > 0, name
        assert torch.all(g[torch.arange(m) != j] == 0), name
    for k, mod in enumerate(model.causal):
        got = mod.w_x.weight.grad
        assert (got is not None and got.abs().sum() > 0) == (k == j)
    trunk = [p for n, p in model.named_parameters() if n.startswith(("net.stem", "net.stage1", "net.patch2",
                                                                    "net.stage2"))]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk)
    # the trunk receives gradient from every AU
    for k in (0, 11):
        model.zero_grad()
        model(batch)["logits"][:, k].sum().backward()
        assert model.net.stage2[0].fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["ac2d", "ac2d-av-ces", "ac2d-av-csd"])
def test_eval_predictions_do_not_depend_on_the_batch(variant):
    model = tiny_model(variant).train()
    feats = []
    for s in range(3):  # training batches fill the feature bank
        out = model(random_batch(seed=s))
        feats.append(out["feature"].detach())
    if variant == "ac2d-av-ces":  # C^e(s) recomputes its prototype in a pass of its own (tested below)
        model.bank.update(torch.cat(feats).transpose(0, 1).reshape(-1, 8), torch.arange(12).repeat_interleave(12))
    model.on_train_epoch_start()  # the next epoch: prototype = mean training feature of the epoch
    if variant != "ac2d-av-csd":
        torch.testing.assert_close(model.prototype, torch.cat(feats).mean(0), atol=1e-5, rtol=1e-5)
    assert bool(model.prototype_ready)
    model.eval()
    with torch.no_grad():
        big = random_batch(b=6, seed=10)
        alone = model({k: v[:1] for k, v in big.items()})["logits"]
        together = model(big)["logits"][:1]
        other = random_batch(b=6, seed=11)
        other = {k: torch.cat([big[k][:1], v[1:]]) for k, v in other.items()}
        mixed = model(other)["logits"][:1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, mixed, atol=1e-5, rtol=1e-5)


def test_output_shapes_for_intensity_and_expression():
    m = tiny_model(names=["AU6", "AU10", "AU12"], kind="intensity").train()
    b = random_batch(m=3)
    b["target"] = torch.randint(0, 6, (4, 3)).float()
    out = m(b)
    assert out["logits"].shape == (4, 3, 6)
    loss, _ = m.compute_loss(out, b)
    assert torch.isfinite(loss)
    e = tiny_model(names=["anger", "happiness", "neutral"], kind="expression").train()
    b = random_batch(m=3)
    b["target"] = torch.tensor([0, 1, 2, 1])
    out = e(b)
    assert out["logits"].shape == (4, 3)
    _, parts = e.compute_loss(out, b)
    assert "loss_attention" in parts
    off = tiny_model(names=["anger", "happiness"], kind="expression", attention={"expression_prior": False})
    assert off.att_mode == "none"


def test_variants_registered():
    v = model_variants()
    assert v["ac2d"]["main"] and v["ac2d"]["group"] == "ac2d"
    expected = {"ac2d-bnet": ("none", "none"), "ac2d-av": ("avg", "none"), "ac2d-ae": ("each", "none"),
                "ac2d-av-ces": ("avg", "branch_static"), "ac2d-av-csd": ("avg", "shared_dynamic"),
                "ac2d": ("avg", "branch_dynamic")}
    for name, (att, causal) in expected.items():
        cfg = resolve(name, "synth", "paper")
        assert cfg["ac2d"]["attention"]["mode"] == att and cfg["ac2d"]["causal"]["mode"] == causal
        if name != "ac2d":
            assert v[name]["group"] == "ac2d-ablation"
    p = resolve("ac2d", "synth", "paper")
    assert p["data"]["input_size"] == 176 and p["data"]["resize"] == 200
    assert p["trainer"]["gradient_clip_val"] == 3.0 and p["optim"]["lr_scale_batch"] == 256
    assert p["ac2d"]["attention"]["lambda"] == 1.28e4 and p["ac2d"]["attention"]["sigma"] == 3.0
    assert p["ac2d"]["width"] == 64 and p["ac2d"]["depths"] == [1, 6, 3]


def test_parameter_count_matches_table6():
    """Table 6: 3.6M parameters for 12 AUs (notes 1.1: shared trunk ~0.445M + 12 x 0.265M, causal 74,880 each)."""
    task, stats = TaskSpec("au", BP4D_AUS), toy_stats(12)
    model = AC2D(task, stats, {"ac2d": {}})
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 3.6e6) / 3.6e6 < 0.05
    assert sum(p.numel() for p in model.causal[0].parameters()) == 74_880
    bnet = AC2D(task, stats, {"ac2d": {"causal": {"mode": "none"}}})
    assert n - sum(p.numel() for p in bnet.parameters()) == 12 * 74_880


def test_macs_at_paper_size():
    """176 x 176, 12 AUs: 3.63M parameters and about 4.48G multiply-accumulates (Table 6 prints 3.6M / 9.6G
    FLOPs), on every torch release: torch 2.14.1's own FlopCounterMode counted 2.197G (no CPU attention)."""
    r = complexity(12, 176)
    assert 4.44e9 < r["macs"] < 4.52e9
    assert round(r["params"] / 1e6, 2) == 3.63
    assert r["flops"] == 2 * r["macs"]


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ac2d_data")
    make_prepared(root / "fake", n_subjects=6, per_subject=10, size=32)
    return root


def _dm(root, batch_size=8):
    dm = AUDataModule(dataset_config(), fold=0, data_root=str(root), input_size=32, batch_size=batch_size,
                      eval_batch_size=16, progress=False)
    dm.setup()
    return dm


def test_fit_and_test_end_to_end(fake_root):
    dm = _dm(fake_root)
    cfg = tiny_cfg()
    model = build_model(cfg, dm.task_spec, dm.stats)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert not bool(model.prototype_ready)  # epoch 0 trains and validates without the causal layer (authors)
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = model.test_results["metrics"]
    assert 0.0 <= float(metrics["f1"]) <= 1.0 and "f1/AU12" in metrics
    assert model.test_results["predictions"]["scores"].shape[1] == 12


def test_render_attention_png(fake_root, tmp_path):
    from aurecog.models.ac2d_attention_map import main, render_attention

    dm = _dm(fake_root)
    model = build_model(tiny_cfg(), dm.task_spec, dm.stats)
    batch = next(iter(dm.test_dataloader()))
    out = render_attention(model, batch, tmp_path / "att.png", max_images=2)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CLI path: a checkpoint in the runner's layout (written by hand: no training needed to test loading)
    cfg = dict(model.cfg, dataset_config=dataset_config())
    model.hparams["cfg"] = cfg
    run_dir = tmp_path / "runs" / "fake" / "ac2d" / "0-0"
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    png = main(["--run-dir", str(run_dir), "--out",
                str(tmp_path / "cli.png"), "--n", "2", "--data-root", str(fake_root)])
    assert png.exists() and png.stat().st_size > 1000


# --------------------------------------------------------------------------- DISFA from BP4D (paper 4.1.3)
DISFA8 = ["AU1", "AU2", "AU4", "AU6", "AU9", "AU12", "AU25", "AU26"]


@pytest.mark.parametrize("variant", ["ac2d", "ac2d-av-csd"])
def test_init_from_a_model_with_another_au_set_maps_branches_by_au_name(variant):
    """A DISFA model initialised from a BP4D model predicts exactly what the BP4D model predicts for the AUs they
    share (the shared trunk is copied, each shared AU's branch, head, causal module and prototype follow its
    name), and the DISFA-only AUs keep their own initialisation."""
    from aurecog.models.transfer import TransferError, transfer_state

    src = tiny_model(variant)
    with torch.no_grad():  # distinct weights per branch and a trained-looking prototype
        for p in src.parameters():
            p.add_(0.05 * torch.randn_like(p))
        src.prototype.copy_(torch.randn_like(src.prototype))
        src.prototype_ready.fill_(True)
    torch.manual_seed(1)
    dst = build_model(tiny_cfg(variant), TaskSpec("au", DISFA8), toy_stats(len(DISFA8)))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    report = transfer_state(dst, src.state_dict(), BP4D_AUS)
    assert report["labels"] == ["AU1", "AU2", "AU4", "AU6", "AU12"]
    src.eval()
    dst.eval()
    x = random_batch(m=12)
    with torch.no_grad():
        ys, yd = src(x)["logits"], dst(x)["logits"]
    for name in report["labels"]:
        torch.testing.assert_close(yd[:, DISFA8.index(name)], ys[:, BP4D_AUS.index(name)])
    j = DISFA8.index("AU25")  # no AU25 in BP4D: its head row is untouched
    torch.testing.assert_close(dst.head.weight[j], before["head.weight"][j])
    assert not torch.equal(dst.head.weight[0], before["head.weight"][0])
    with pytest.raises(TransferError, match="no label in common"):
        transfer_state(dst, src.state_dict(), [f"X{i}" for i in range(12)])


def test_runner_init_option_reads_labels_from_the_checkpoint(tmp_path):
    """``init.from_dataset`` loads <results>/runs/<dataset>/<model>/<fold>-<seed>/checkpoints/best.ckpt of the
    same results folder (labels from its hyperparameters); a missing checkpoint names the file and the command
    that makes it."""
    from aurecog.runner.cell import initialise

    src = tiny_model()
    ck = tmp_path / "runs" / "bp4d" / "ac2d" / "1-0" / "checkpoints" / "best.ckpt"
    ck.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": {"task": src.task.to_dict()}, "state_dict": src.state_dict()}, ck)
    dst = build_model(tiny_cfg(), TaskSpec("au", DISFA8), toy_stats(len(DISFA8)))
    cfg = {"model": {"name": "ac2d"}, "init": {"from_dataset": "bp4d"}}
    here = tmp_path / "runs" / "disfa" / "ac2d"
    rep = initialise(dst, cfg, here / "1-0", fold=1, seed=0)
    assert rep["labels"] == ["AU1", "AU2", "AU4", "AU6", "AU12"] and rep["mapped"] > 0 and rep["copied"] > 0
    torch.testing.assert_close(dst.head.weight[DISFA8.index("AU12")], src.head.weight[BP4D_AUS.index("AU12")])
    with pytest.raises(FileNotFoundError, match=r"2-0/checkpoints/best.ckpt; train that cell first.*--dataset bp4d"):
        initialise(dst, cfg, here / "2-0", fold=2, seed=0)
    assert initialise(dst, {"model": {"name": "ac2d"}}, here / "0-0", 0, 0) is None


# --------------------------------------------------------------------------- recipe (issue 16)
def test_weight_decay_groups_count_the_authors_elements():
    """ResT's get_parameter_groups (authors' optim_factory): no decay on biases and 1-d parameters. Our branch-batched
    LayerNorm gains are (m, c), so they must be recognised as norm gains: 3,558,560 decayed elements at paper size
    (12 AUs), the count of the authors' per-branch modules; 3,568,928 would decay the 10,368 batched gains."""
    model = build_model(resolve("ac2d", "synth", "paper"), TaskSpec("au", BP4D_AUS), toy_stats(12))
    groups = model.param_groups()
    decayed = [g for g in groups if g.get("weight_decay") is None]
    assert sum(p.numel() for g in decayed for p in g["params"]) == 3_558_560
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    ids = {id(p) for g in decayed for p in g["params"]}
    assert id(model.net.stage3[0].norm1.weight) not in ids and id(model.net.stage3[0].fc1.weight) in ids


def _causal_logits(model, f, proto):
    """Eqs. 10-13 with the authors' values V = f_bar / N: logits from branch features f (m, B, c)."""
    n = model.stats.n_train
    y = torch.stack([mod(f[j], proto[j:j + 1], proto[j:j + 1] / n)[0] for j, mod in enumerate(model.causal)])
    return model.head(y)[..., 0].T


def test_causal_schedule_follows_the_authors_code():
    """Epoch 0 trains without the causal layer; from epoch 1 on the prototype is the previous epoch's mean feature
    (values divided by the training-set size), not the current mini-batch mean."""
    model = tiny_model("ac2d").train()
    model.net.eval()  # no drop path: features reproducible
    feats = []
    for s in range(2):  # epoch 0
        b = random_batch(seed=s)
        out = model(b)
        feats.append(out["feature"].detach())
        f = out["feature"].transpose(0, 1)
        torch.testing.assert_close(out["logits"], model.head(f)[..., 0].T)  # no causal layer
    model.on_train_epoch_start()  # epoch 1 starts: the prototype is epoch 0's mean feature
    epoch0 = torch.cat(feats).mean(0)
    torch.testing.assert_close(model.prototype, epoch0, atol=1e-5, rtol=1e-5)
    b = random_batch(seed=5)
    out = model(b)
    f = out["feature"].transpose(0, 1).detach()
    torch.testing.assert_close(out["logits"], _causal_logits(model, f, epoch0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(f.mean(1), epoch0, atol=1e-3)  # the batch mean would give another answer


def test_a_fit_from_another_model_starts_without_the_causal_layer():
    model = tiny_model("ac2d")
    with torch.no_grad():  # e.g. initialised from the BP4D model (paper 4.1.3)
        model.prototype.normal_()
        model.prototype_ready.fill_(True)
    model.on_train_start()
    assert not bool(model.prototype_ready)


def test_best_checkpoint_holds_the_prototype_it_was_validated_with(fake_root, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Used(L.Callback):
        def __init__(self):
            self.by_epoch = {}

        def on_validation_epoch_end(self, trainer, pl_module):
            self.by_epoch[trainer.current_epoch] = (pl_module.prototype.clone(), bool(pl_module.prototype_ready))

    dm = _dm(fake_root)
    L.seed_everything(0)
    model = build_model(tiny_cfg(), dm.task_spec, dm.stats)
    used = Used()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor=model.monitor, mode="max", save_top_k=1,
                           enable_version_counter=False)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        enable_model_summary=False, callbacks=[used, ckpt])
    trainer.fit(model, datamodule=dm)
    epoch = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)["epoch"]
    loaded = AC2D.load_from_checkpoint(tmp_path / "best.ckpt", map_location="cpu")
    proto, ready = used.by_epoch[epoch]
    assert bool(loaded.prototype_ready) == ready == (epoch >= 1)  # epoch 0 validates without the causal layer
    torch.testing.assert_close(loaded.prototype, proto, rtol=0, atol=0)
    assert used.by_epoch[2][1] and not torch.equal(used.by_epoch[2][0], used.by_epoch[1][0])


def test_static_prototype_is_recomputed_with_the_current_weights(fake_root):
    """C^e(s) (Table 8): 'computed at the end of each training epoch' with the current parameters: after the fit,
    the prototype is the mean eval-mode feature of the training set under the final weights."""
    dm = AUDataModule(dataset_config(), fold=0, data_root=str(fake_root), input_size=32, batch_size=8,
                      eval_batch_size=16, progress=False, augment={"enabled": False})
    dm.setup()
    L.seed_everything(0)
    model = build_model(tiny_cfg("ac2d-av-ces"), dm.task_spec, dm.stats)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    model.eval()
    loader = torch.utils.data.DataLoader(dm.dataset("train"), batch_size=7)  # every training sample once
    with torch.no_grad():
        feats = torch.cat([model(b)["feature"] for b in loader])
    assert len(feats) == len(dm.split_rows["train"]) and bool(model.prototype_ready)
    torch.testing.assert_close(model.prototype, feats.mean(0), atol=1e-5, rtol=1e-5)
