"""RE-Net (Yang & Yin, ACCV 2020): AU-conditional BN (Eqs. 2-5), batched conditional inference, unseen-AU
transfer, Eq. 5 denominator handling, duplication, ICC(3,1), parameter count."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from aurecog.config import deep_merge, resolve
from aurecog.metrics import icc31
from aurecog.models.registry import build_model
from aurecog.models.renet import (
    AUConditionalBatchNorm2d,
    Condition,
    RENet,
    near_singular_rows,
    normalize_graph,
    unseen_stat_mix,
)
from aurecog.tasks import TaskSpec, TrainStats

AUS = ["AU1", "AU2", "AU4", "AU6", "AU12", "AU23"]
# width 8: not the SynthAU-pretrained trunk of the quick profile (width 16), so from scratch
TINY = {"backbone": {"name": "resnet18", "channels": [8, 8, 8, 8], "pretrained_file": None}}


def _corr(c: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = (rng.random((200, c)) < 0.4).astype(float)
    y[:, 1] = np.maximum(y[:, 1], y[:, 0])  # AU2 follows AU1
    y[:, -1] = 1 - y[:, -2]  # negatively correlated pair
    corr = np.corrcoef(y.T)
    np.fill_diagonal(corr, 1.0)
    return corr


def _stats(c: int, rates=None, corr=None) -> TrainStats:
    rates = list(rates or np.linspace(0.1, 0.6, c))
    corr = _corr(c) if corr is None else corr
    return TrainStats(n_train=100, label_rate=rates, n_pos=[int(r * 100) for r in rates],
                      n_neg=[100 - int(r * 100) for r in rates], label_corr=np.asarray(corr).tolist(),
                      subjects=["S0"], subject_counts=[100])


def _model(kind: str = "au", variant: str = "renet", names=AUS, extra: dict | None = None, stats=None) -> RENet:
    cfg = resolve(variant, "synth", "quick", overrides=deep_merge(TINY, extra or {}))
    task = TaskSpec(kind, names)
    m = build_model(cfg, task, stats or _stats(len(names)))
    _randomise(m)
    return m


@torch.no_grad()
def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Distinct per-AU gamma/beta and running statistics, so that conditioning matters."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, AUConditionalBatchNorm2d):
            mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
            mod.running_var.copy_(1 + 0.5 * torch.rand(mod.running_var.shape, generator=g))


def _cbn(c=3, f=4, weights=None, momentum=0.1, seed=0):
    ctx = Condition()
    bn = AUConditionalBatchNorm2d(f, c, ctx, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(1 + torch.randn(c, f, generator=g))
        bn.bias.copy_(torch.randn(c, f, generator=g))
        bn.running_mean.copy_(torch.randn(c, f, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, f, generator=g))
    return bn, ctx


# --------------------------------------------------------------------------------------- conditional BN
def test_identity_graph_equals_independent_batchnorms():
    """Identity graph + per-AU statistics = C independent BatchNorm2d (Eq. 3), in training and eval."""
    c, f = 3, 4
    cbn, ctx = _cbn(c, f)
    refs = []
    for k in range(c):
        bn = nn.BatchNorm2d(f, momentum=0.1)
        with torch.no_grad():
            bn.weight.copy_(cbn.weight[k])
            bn.bias.copy_(cbn.bias[k])
            bn.running_mean.copy_(cbn.running_mean[k])
            bn.running_var.copy_(cbn.running_var[k])
        refs.append(bn)
    x = torch.randn(10, f, 5, 5) * 3 + 1
    idx = torch.tensor([0, 2, 1, 0, 2, 2, 1, 0, 0, 2])
    ctx.index, ctx.weights = idx, normalize_graph(torch.eye(c))
    for train in (True, False):
        cbn.train(train)
        out = cbn(x)
        for k in range(c):
            refs[k].train(train)
            m = idx == k
            torch.testing.assert_close(out[m], refs[k](x[m]), atol=1e-5, rtol=1e-5)
    for k in range(c):  # the training pass updated every AU's running statistics like its own BN
        torch.testing.assert_close(cbn.running_mean[k], refs[k].running_mean)
        torch.testing.assert_close(cbn.running_var[k], refs[k].running_var)
    assert cbn.num_batches_tracked.tolist() == [1, 1, 1]


def test_single_condition_updates_only_that_au():
    cbn, ctx = _cbn(4, 3)
    before_m, before_v = cbn.running_mean.clone(), cbn.running_var.clone()
    x = torch.randn(8, 3, 4, 4)
    ctx.index, ctx.single, ctx.weights = torch.full((8,), 2), 2, normalize_graph(torch.eye(4))
    cbn.train()
    cbn(x)
    ref = nn.BatchNorm2d(3)
    ref.running_mean.copy_(before_m[2])
    ref.running_var.copy_(before_v[2])
    ref.train()(x)
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(cbn.running_mean[keep], before_m[keep])
    torch.testing.assert_close(cbn.running_var[keep], before_v[keep])
    torch.testing.assert_close(cbn.running_mean[2], ref.running_mean)
    torch.testing.assert_close(cbn.running_var[2], ref.running_var)
    assert cbn.num_batches_tracked.tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize("norm", ["shrink", "signed"])
def test_equal_parameters_equal_plain_batchnorm(norm):
    """All gamma/beta (and statistics) equal -> a plain BN whatever the (signed) graph, since the Eq. 5 weights
    of every row sum to 1."""
    c, f = 6, 5
    cbn, ctx = _cbn(c, f)
    plain = nn.BatchNorm2d(f)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(f))
        plain.bias.copy_(torch.randn(f))
        plain.running_mean.copy_(torch.randn(f))
        plain.running_var.copy_(0.5 + torch.rand(f))
        cbn.weight.copy_(plain.weight[None].repeat(c, 1))
        cbn.bias.copy_(plain.bias[None].repeat(c, 1))
        cbn.running_mean.copy_(plain.running_mean[None].repeat(c, 1))
        cbn.running_var.copy_(plain.running_var[None].repeat(c, 1))
    w = torch.as_tensor(_corr(c), dtype=torch.float32)
    assert (w < 0).any()  # the graph has negative correlations
    ctx.weights = normalize_graph(w, norm)
    x = torch.randn(12, f, 3, 3)
    ctx.index = torch.arange(c).repeat(2)
    for train in (False, True):
        cbn.train(train)
        plain.train(train)
        if train:  # every sample conditioned on one AU -> the plain BN's batch statistics
            ctx.index, ctx.single = torch.full((12,), 3), 3
        torch.testing.assert_close(cbn(x), plain(x), atol=1e-5, rtol=1e-5)


def test_eq5_combination_of_parameters():
    """gamma_c^G = sum_k w_ck gamma_k / sum_k w_ck for a positive graph (Eq. 5, hand-written)."""
    cbn, ctx = _cbn(3, 2)
    w = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.0], [0.2, 0.0, 1.0]])
    ctx.weights = normalize_graph(w)
    g, b = cbn.graph_params()
    gam = cbn.weight.detach()
    expect0 = (1.0 * gam[0] + 0.5 * gam[1] + 0.2 * gam[2]) / 1.7
    torch.testing.assert_close(g[0], expect0)
    torch.testing.assert_close(b[1], (0.5 * cbn.bias[0] + cbn.bias[1]).detach() / 1.5)


def test_negative_correlation_denominator():
    """A row whose correlations nearly cancel (sum_k w_ck = 0.001): detected; the literal Eq. 5 amplifies the
    parameters by up to 1000x, 'shrink' keeps rows summing to 1 with a bounded gain, 'abs' is bounded but no longer
    affine."""
    w = torch.tensor([[1.0, -0.6, -0.399], [-0.6, 1.0, 0.3], [-0.399, 0.3, 1.0]])
    tau = 0.5
    assert near_singular_rows(w, tau).tolist() == [True, False, False]
    gamma = torch.tensor([[1.0], [2.0], [-1.0]])

    signed = normalize_graph(w, "signed")
    assert signed[0].abs().max() > 500  # 1 / 0.001
    assert (signed @ gamma)[0].abs().item() > 50 * gamma.abs().max()  # (1 - 1.2 + 0.399) / 0.001 = 199

    shrink = normalize_graph(w, "shrink", tau)
    torch.testing.assert_close(shrink.sum(-1), torch.ones(3))
    # row 0: off-diagonal weights scaled by alpha = (tau - 1) / (-0.999), denominator exactly tau
    alpha = (tau - 1) / (-0.999)
    torch.testing.assert_close(shrink[0], torch.tensor([1.0, -0.6 * alpha, -0.399 * alpha]) / tau)
    torch.testing.assert_close(shrink[1:], signed[1:])  # well-conditioned rows: exactly Eq. 5
    gain = (1 + w[0, 1:].abs().sum()) / tau
    assert (shrink @ gamma).abs().max() <= gain * gamma.abs().max() + 1e-6
    assert shrink.abs().sum(-1).max() <= gain + 1e-6

    ab = normalize_graph(w, "abs")
    torch.testing.assert_close(ab.abs().sum(-1), torch.ones(3))
    assert (ab @ gamma).abs().max() <= gamma.abs().max()
    assert not torch.allclose(ab.sum(-1), torch.ones(3))  # equal parameters would not be preserved
    with pytest.raises(ValueError):
        normalize_graph(w, "nope")


# --------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("kind,shared", [("au", True), ("au", False), ("intensity", True), ("expression", True)])
def test_batched_evaluation_equals_per_au_loop(kind, shared):
    names = ["anger", "joy", "fear"] if kind == "expression" else AUS
    m = _model(kind, names=names, extra={"head": {"shared": shared}}).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        batched = m.predict_batched(x)
        loop = m.predict_loop(x)
        out = m({"image": x})["logits"]
    c = len(names)
    assert batched.shape == ((5, c, 6) if kind == "intensity" else (5, c))
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, batched)
    # conditioning matters: different AUs give different logits for the same image
    assert (batched[:, 0] - batched[:, 1]).abs().max() > 1e-4
    m.max_expanded = 2 * c  # chunked over samples: same result
    with torch.no_grad():
        torch.testing.assert_close(m.predict_batched(x), batched, atol=1e-5, rtol=1e-4)
        # the folded path (the default evaluation path without autograd) gives the loop's logits too
        torch.testing.assert_close(m.predict_folded(x), loop, atol=1e-5, rtol=1e-4)


def _flip_stem_signs(m: RENet) -> None:
    """Negative stem BN scales for half of the channels of every AU (the min-pool branch of the folded stem)."""
    with torch.no_grad():
        m.backbone.bn1.weight[:, ::2] *= -1


@pytest.mark.parametrize("backbone", ["resnet18", "resnet26"])  # BasicBlock, Bottleneck
def test_folded_evaluation_equals_per_au_loop(backbone):
    """The folded path (renet_folded.py: shared stem pooled before the per-AU BN + ReLU, BNs folded into the
    convolutions) reproduces the paper's per-AU passes, with positive and negative stem BN scales, and is what
    the model evaluates with when autograd is off; with autograd on it takes the batched pass."""
    m = _model(extra={"backbone": {"name": backbone}}).eval()
    _flip_stem_signs(m)
    assert m.fold_unsupported is None and bool((m.backbone.bn1.eval_affine()[0] < 0).any())
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        loop = m.predict_loop(x)
        torch.testing.assert_close(m.predict_folded(x), loop, atol=1e-5, rtol=1e-4)
    calls = []
    for name in ("predict_folded", "predict_batched"):
        fn = getattr(m, name)
        setattr(m, name, lambda x, fn=fn, name=name: calls.append(name) or fn(x))
    with torch.no_grad():
        torch.testing.assert_close(m({"image": x})["logits"], loop, atol=1e-5, rtol=1e-4)
    z = m({"image": x})["logits"]  # autograd on: differentiable batched pass
    assert calls == ["predict_folded", "predict_batched"] and z.requires_grad
    torch.testing.assert_close(z.detach(), loop, atol=1e-5, rtol=1e-4)


def test_folded_weights_follow_parameter_changes():
    """The folded weights are cached, and rebuilt when a parameter or buffer changes (optimiser step,
    load_state_dict, a graph update); train() frees them."""
    m = _model(variant="renet-learnable").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first = m.predict_folded(x)
        cached = m.folded()
        assert m.folded() is cached and cached.nbytes() > 0
    m.train()
    assert m._folded_cache is None
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    batch = {"image": torch.randn(4, 3, 16, 16), "target": (torch.rand(4, len(AUS)) < 0.5).float()}
    m.strategy = "all"
    loss, _ = m.compute_loss(m(batch), batch)
    loss.backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after = m.predict_folded(x)
        assert (after - first).abs().max() > 1e-4
        torch.testing.assert_close(after, m.predict_loop(x), atol=1e-5, rtol=1e-4)
        other = _model().eval()
        other.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("graph.")},
                              strict=False)
        torch.testing.assert_close(other.predict_folded(x), other.predict_loop(x), atol=1e-5, rtol=1e-4)
        assert after.abs().max() < 100  # a moderate step: the tolerances below are meaningful
        m.backbone.layer4[1].bn2.running_mean.add_(1.0)  # in-place buffer change while in eval mode
        moved = m.predict_folded(x)
        assert (moved - after).abs().max() > 1e-3
        torch.testing.assert_close(moved, m.predict_loop(x), atol=1e-5, rtol=1e-4)


def test_bf16_autocast_training_and_evaluation():
    """Under bf16 autocast the conditional BNs normalise in float32 (their statistics and Eq. 5 combination in
    full precision, as autocast treats nn.BatchNorm2d): both training strategies run, the running statistics stay
    float32 and close to a float32 step's, and folded weights built under autocast are the float32 ones."""
    ref = _model().train()
    m = copy.deepcopy(ref)
    batch = {"image": torch.randn(6, 3, 16, 16), "target": (torch.rand(6, len(AUS)) < 0.5).float()}
    for strategy in ("random", "all"):
        ref.strategy = m.strategy = strategy
        ref._au_gen = m._au_gen = None
        torch.manual_seed(1)
        ref.compute_loss(ref(batch), batch)[0].backward()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(batch)
            loss, _ = m.compute_loss(out, batch)
        assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(loss)
        loss.backward()
    for a, b in zip(ref.modules(), m.modules()):
        if isinstance(a, AUConditionalBatchNorm2d):
            assert b.running_mean.dtype == torch.float32
            torch.testing.assert_close(b.running_mean, a.running_mean, atol=0.05, rtol=0.05)
    m.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m({"image": x})["logits"]
        exact = m.predict_loop(x)
        torch.testing.assert_close(low.float(), exact, atol=0.1, rtol=0.05)
        torch.testing.assert_close(m.predict_folded(x), exact, atol=1e-5, rtol=1e-4)  # cache from autocast


def test_unsupported_backbone_falls_back_to_batched_pass():
    """A ResNet with squeeze-excitation cannot be folded: ``auto`` evaluates with the batched pass, an explicit
    ``eval_path: folded`` is refused at construction."""
    m = _model(extra={"backbone": {"name": "seresnet18"}}).eval()
    assert "squeeze-excitation" in m.fold_unsupported
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m({"image": x})["logits"], m.predict_loop(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="eval_path=folded: .*squeeze-excitation"):
        _model(extra={"backbone": {"name": "seresnet18"}, "renet": {"eval_path": "folded"}})
    with pytest.raises(ValueError, match="eval_path must be one of"):
        _model(extra={"renet": {"eval_path": "fast"}})


def test_all_au_training_pass_equals_single_au_passes():
    """Strategy 'all': one batched pass with per-AU batch statistics = C training passes conditioned on one AU."""
    m = _model().train()
    x = torch.randn(6, 3, 16, 16)
    cond = torch.arange(len(AUS))
    z = m.conditioned_logits(x, cond)  # B, C, 1
    for c in range(len(AUS)):
        zc = m.head(m.features(x, torch.full((6,), c), single=c))
        torch.testing.assert_close(z[:, c], zc, atol=1e-5, rtol=1e-4)


def test_training_step_random_and_all_strategies_and_masking():
    """Eq. 6 for the conditioned AU(s), unknown labels masked; ``loss.pos_weight: balanced`` (the quick profile)
    weighs AU c's positives by its training negatives/positives."""
    torch.manual_seed(0)
    stats = _stats(len(AUS))
    pos_w = torch.tensor(stats.n_neg, dtype=torch.float32) / torch.tensor(stats.n_pos, dtype=torch.float32)
    for strategy in ("random", "all"):
        for weighting in (None, "balanced"):
            m = _model(extra={"renet": {"strategy": strategy}, "loss": {"pos_weight": weighting}}, stats=stats).train()
            y = (torch.rand(8, len(AUS)) < 0.5).float()
            y[0, :] = -1
            batch = {"image": torch.randn(8, 3, 16, 16), "target": y}
            out = m(batch)
            loss, _ = m.compute_loss(out, batch)
            assert torch.isfinite(loss) and loss > 0
            loss.backward()
            gw = [mod.weight.grad for mod in m.modules() if isinstance(mod, AUConditionalBatchNorm2d)]
            assert all(g is not None for g in gw)

            def bce(z, t, c, weighting=weighting):
                pw = None if weighting is None else pos_w[c]
                return nn.functional.binary_cross_entropy_with_logits(z, t, pos_weight=pw)

            if strategy == "random":
                c = out["cond"]
                ref = bce(out["logits"][1:, 0], y[1:, c], c)
            else:  # Eq. 6 averaged over the known (sample, AU) entries (the base class's one reduction)
                z = out["logits"][:, :, 0]
                ref = bce(z[1:], y[1:], torch.arange(len(AUS)))
            torch.testing.assert_close(loss, ref)


def test_identity_graph_learns_no_cross_au_gradient():
    """Identity graph: AU c's loss gives gradient to gamma_c only; PCC graph: to its correlated AUs as well."""
    for init, expect_cross in (("identity", False), ("pcc", True)):
        m = _model(extra={"renet": {"graph": {"init": init}}}).train()
        batch = {"image": torch.randn(8, 3, 16, 16), "target": torch.ones(8, len(AUS))}
        out = m(batch)
        m.compute_loss(out, batch)[0].backward()
        c = out["cond"]
        g = next(mod for mod in m.modules() if isinstance(mod, AUConditionalBatchNorm2d)).weight.grad
        others = torch.tensor([k for k in range(len(AUS)) if k != c])
        assert g[c].abs().sum() > 0
        assert (g[others].abs().sum() > 0) == expect_cross


def test_unseen_au_never_trained_and_predicted_from_graph():
    """Table 6: AU23 withheld. It is never drawn (its statistics stay untouched, NaN labels never reach the
    loss), and at test it gets finite predictions from the graph-combined parameters and mixed statistics."""
    m = _model(variant="renet-unseen")
    u = AUS.index("AU23")
    assert m.unseen == u and u not in m.train_conditions.tolist()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    m.train()
    for strategy in ("random", "all"):
        m.strategy = strategy
        for _ in range(8 if strategy == "random" else 1):
            y = (torch.rand(8, len(AUS)) < 0.5).float()
            y[:, u] = float("nan")  # would poison the loss if AU23's labels were ever read
            batch = {"image": torch.randn(8, 3, 16, 16), "target": y}
            loss, _ = m.compute_loss(m(batch), batch)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    bns = [mod for mod in m.modules() if isinstance(mod, AUConditionalBatchNorm2d)]
    assert all(int(b.num_batches_tracked[u]) == 0 for b in bns)
    assert all(int(b.num_batches_tracked.sum()) > 0 for b in bns)
    m.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        z = m({"image": x})["logits"]
        assert torch.isfinite(z).all()
        torch.testing.assert_close(z, m.predict_loop(x), atol=1e-5, rtol=1e-4)
        # reference: write the mixed statistics into AU23's running buffers and switch the unseen path off
        mix = unseen_stat_mix(m.graph.raw(), u)
        assert mix[u, u] == 0 and torch.isclose(mix[u].sum(), torch.tensor(1.0))
        ref = copy.deepcopy(m)
        for b in [mod for mod in ref.modules() if isinstance(mod, AUConditionalBatchNorm2d)]:
            mean = mix @ b.running_mean
            var = mix @ (b.running_var + b.running_mean ** 2) - mean ** 2
            b.running_mean.copy_(mean)
            b.running_var.copy_(var)
        ref.unseen = None
        torch.testing.assert_close(ref.predict_batched(x), z, atol=1e-5, rtol=1e-4)
        # without the graph (identity), AU23 would use its own never-estimated statistics: different output
        assert (m.predict_batched(x)[:, u] - _unmixed(m, x)[:, u]).abs().max() > 1e-5


def _unmixed(m: RENet, x):
    m2 = copy.deepcopy(m)
    m2.unseen = None
    return m2.predict_batched(x)


def test_rare_au_duplication():
    """Table 8 'DA': frames positive for one of the paper's AUs (AU1, 2, 15, 23, 24; those of the task) are
    appended once more."""
    names = ["AU1", "AU2", "AU4", "AU15", "AU12", "AU24"]
    m = _model(variant="renet-dup", names=names, stats=_stats(6, rates=[0.3, 0.1, 0.5, 0.05, 0.6, 0.2]))
    assert m.rare.tolist() == [0, 1, 3, 5]  # the paper's list, not the occurrence rates
    y = torch.zeros(5, 6)
    y[1, 3] = 1  # AU15 positive
    y[2, 2] = 1  # AU4 positive only
    y[4, 5] = 1  # AU24 positive
    y[3, 0] = -1  # unknown is not positive
    x = torch.arange(5.0)[:, None, None, None].expand(5, 3, 2, 2)
    xd, yd = m.duplicate({"image": x, "target": y})
    assert xd[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 1, 4]
    torch.testing.assert_close(yd[5:], y[[1, 4]])
    m2 = _model(variant="renet", names=names)
    assert m2.duplicate({"image": x, "target": y})[0].shape[0] == 5  # off by default (Table 1 'Ours')


def _table8(variant: str, dup: bool):
    cfg = resolve(variant, "synth", "quick", overrides=deep_merge(TINY, {"duplicate": {"enabled": dup}}))
    torch.manual_seed(0)
    return build_model(cfg, TaskSpec("au", AUS), _stats(len(AUS)))


def test_table8_resnet18_pair_differs_only_in_duplication():
    """'ResNet18 w/o DA' and '+DA': the same class and loss; with duplication off and the same initial
    weights, training gives identical outputs (the old '+DA' row, RE-Net's class with a summed loss, diverged);
    with it on, the batches (and so the outputs) differ."""
    a, b = resolve("renet-baseline", "bp4d", "paper"), resolve("renet-baseline-dup", "bp4d", "paper")
    assert a["model"]["family"] == b["model"]["family"]
    diff = {k for k in set(_flat(a)) | set(_flat(b)) if _flat(a).get(k) != _flat(b).get(k)}
    assert diff == {"model.name", "model.paper_row", "duplicate.enabled"}

    def run(variant, dup):
        m = _table8(variant, dup)
        m.load_state_dict(ref_state)
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        m.train()
        for _ in range(3):
            y = (torch.rand(8, len(AUS), generator=g) < 0.3).float()
            batch = {"image": torch.randn(8, 3, 16, 16, generator=g), "target": y}
            loss, _ = m.compute_loss(m(batch), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            return m({"image": torch.randn(4, 3, 16, 16, generator=g)})["logits"]

    ref_state = copy.deepcopy(_table8("renet-baseline", False).state_dict())
    plain = run("renet-baseline", False)
    torch.testing.assert_close(run("renet-baseline-dup", False), plain, rtol=0, atol=0)
    assert (run("renet-baseline-dup", True) - plain).abs().max() > 1e-4


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_one_loss_reduction_for_every_family():
    """RE-Net's loss is the base class's supervised loss (mean over the known entries of the conditioned AUs),
    the baseline's is the same function: no second reduction (the summed one made 'Ours' 12x 'ResNet18')."""
    torch.manual_seed(0)
    m = _model(extra={"renet": {"strategy": "all"}}).train()
    base = _table8("renet-baseline", False).train()
    y = (torch.rand(8, len(AUS)) < 0.5).float()
    y[0, 2] = -1
    batch = {"image": torch.randn(8, 3, 16, 16), "target": y}
    out = m(batch)
    loss, _ = m.compute_loss(out, batch)
    torch.testing.assert_close(loss, base.supervised_loss(out["logits"][:, :, 0], y))
    pw = torch.tensor(_stats(len(AUS)).n_neg, dtype=torch.float32) / torch.tensor(_stats(len(AUS)).n_pos,
                                                                                 dtype=torch.float32)
    known = y >= 0
    ref = nn.functional.binary_cross_entropy_with_logits(out["logits"][:, :, 0], y.clamp_min(0), pos_weight=pw,
                                                         reduction="none")[known].mean()
    torch.testing.assert_close(loss, ref)


def test_unseen_au_is_left_out_of_model_selection():
    """Table 6: validation F1 (checkpoint selection, early stopping) over the trained AUs only; test over all."""
    m = _model(variant="renet-unseen")
    u = AUS.index("AU23")
    assert m.val_metrics.names == [a for a in AUS if a != "AU23"] and m.test_metrics.names == AUS
    m.eval()
    x = torch.randn(6, 3, 16, 16)
    y = (torch.rand(6, len(AUS)) < 0.5).float()
    m.validation_step({"image": x, "target": y}, 0)
    v1 = copy.deepcopy(m.val_metrics.compute())
    m.val_metrics.reset()
    y2 = y.clone()
    y2[:, u] = 1 - y2[:, u]  # the withheld AU's validation labels must not move the monitor
    m.validation_step({"image": x, "target": y2}, 0)
    v2 = m.val_metrics.compute()
    mon = m.val_metrics.monitor
    assert v1[mon] == pytest.approx(v2[mon])
    m.test_step({"image": x, "target": y, "sample": torch.arange(6), "source": torch.zeros(6),
                 "subject": torch.zeros(6)}, 0)
    assert m.test_metrics.compute()[mon] is not None


def test_second_unseen_au_run_registered():
    m = _model(variant="renet-unseen-au24", names=["AU1", "AU2", "AU23", "AU24"])
    assert m.unseen == 3 and 3 not in m.train_conditions.tolist()


def test_learnable_graph_gets_gradient_and_keeps_unit_diagonal():
    m = _model(variant="renet-learnable", extra={"renet": {"strategy": "all"}}).train()
    assert isinstance(m.graph.off, nn.Parameter)
    torch.testing.assert_close(m.graph.raw().diagonal(), torch.ones(len(AUS)))
    batch = {"image": torch.randn(6, 3, 16, 16), "target": (torch.rand(6, len(AUS)) < 0.5).float()}
    m.compute_loss(m(batch), batch)[0].backward()
    assert m.graph.off.grad.abs().sum() > 0
    fixed = _model()
    assert "graph.off" not in dict(fixed.named_parameters())
    torch.testing.assert_close(fixed.graph.raw(), torch.as_tensor(_corr(len(AUS)), dtype=torch.float32))


def test_paper_size_parameter_count():
    """ResNet-18 without fc: 11,176,512 parameters (11,689,512 - 512*1000 - 1000); its BNs hold
    64 + 4*64 + (4*128 + 128) + (4*256 + 256) + (4*512 + 512) = 4,800 channels. RE-Net adds (C - 1) extra
    (gamma, beta) pairs per channel and a shared 512 -> 1 classifier."""
    names = [f"AU{i}" for i in range(12)]
    from aurecog.models.backbones import no_pretrained

    cfg = resolve("renet", "synth", "paper")
    with no_pretrained():  # sizes only: no ImageNet file needed
        m = build_model(cfg, TaskSpec("au", names), _stats(12, corr=np.eye(12)))
    n = sum(p.numel() for p in m.parameters())
    assert n == 11_176_512 + 11 * 2 * 4_800 + 513
    assert len(m.converted) == 20  # every BatchNorm2d of ResNet-18 (17 + 3 downsample)
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


def test_end_to_end_fit_and_test(tmp_path):
    import lightning as L
    from helpers import dataset_config, make_prepared

    from aurecog.data.datamodule import AUDataModule

    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=8, size=24)
    dm = AUDataModule(dataset_config(), fold=0, data_root=str(tmp_path), input_size=20, batch_size=8,
                      progress=False)
    dm.setup()
    cfg = resolve("renet", "synth", "quick", overrides=TINY)
    model = build_model(cfg, dm.task_spec, dm.stats)
    tr = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   num_sanity_val_steps=0, enable_model_summary=False)
    tr.fit(model, datamodule=dm)
    tr.test(model, datamodule=dm, verbose=False)
    met = model.test_results["metrics"]
    assert 0.0 <= float(met["f1"]) <= 1.0
    assert model.test_results["predictions"]["scores"].shape[1] == 12


# --------------------------------------------------------------------------------------- ICC(3,1)
def _icc31_textbook(y: np.ndarray) -> float:
    """Shrout & Fleiss (1979) ICC(3,1) from the two-way ANOVA of an n targets x k judges table, written out."""
    n, k = y.shape
    grand = y.mean()
    ss_total = ((y - grand) ** 2).sum()
    ss_targets = k * ((y.mean(1) - grand) ** 2).sum()
    ss_judges = n * ((y.mean(0) - grand) ** 2).sum()
    ss_resid = ss_total - ss_targets - ss_judges
    bms = ss_targets / (n - 1)
    ems = ss_resid / ((n - 1) * (k - 1))
    return (bms - ems) / (bms + (k - 1) * ems)


def test_icc31_textbook_and_published_example():
    # Shrout & Fleiss (1979) Table 2: 6 targets x 4 judges; published ICC(3,1) = .71 (BMS 11.24, EMS 1.02)
    sf = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], float)
    assert round(_icc31_textbook(sf), 2) == 0.71
    rng = np.random.default_rng(0)
    t = rng.integers(0, 6, size=(40, 3)).astype(float)
    p = t * 0.7 + rng.normal(0, 0.8, size=t.shape) + 0.5
    ours = icc31(torch.tensor(p), torch.tensor(t)).numpy()
    ref = [_icc31_textbook(np.stack([p[:, j], t[:, j]], 1)) for j in range(3)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
    # hand example, two raters: targets (1,2),(2,2),(3,4): BMS = 13/6, EMS = 1/6 -> (12/6) / (14/6) = 6/7
    assert float(icc31(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 2, 4]))[0]) == pytest.approx(6 / 7)


def test_bn_momentum_from_config():
    """Quick profile: per-AU statistics momentum 0.5 (each AU is drawn on ~1/C of the steps); null keeps 0.1."""
    bns = [mod for mod in _model().modules() if isinstance(mod, AUConditionalBatchNorm2d)]
    assert bns and all(b.momentum == 0.5 for b in bns)
    bns = [mod for mod in _model(extra={"renet": {"bn_momentum": None}}).modules()
           if isinstance(mod, AUConditionalBatchNorm2d)]
    assert all(b.momentum == pytest.approx(0.1) for b in bns)
