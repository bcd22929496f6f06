"""IERN: Interventional Emotion Recognition Network (Chen, Yang, Cham, Cai; ACM MM 2022).

Components (paper Sec. 3.3, Fig. 3, appendix Table 5; authors' ``donydchen/causal_emotion``):

* ``f_b`` (:class:`FeatureBackbone`): timm ResNet trunk kept spatial (``forward_features``) + Conv2d 1x1
  2048 -> 512, i.e. 512 x 7 x 7 at a 224 input.
* ``g_e`` / ``g_c`` (:func:`generator`): Conv3x3 + 2 residual blocks each, separate weights.
* ``d_e`` / ``d_c`` (:class:`Discriminator`): Conv4x4 s2 + LeakyReLU, 1x1 convs 512 -> 256 -> 128 -> 64 with
  LeakyReLU, final conv without bias to N_e / N_c outputs. Table 5 prints a 3x3 final kernel for the 7x7
  map (7 -> 3 -> 1); we use the kernel that reduces the map to 1x1 (3 at 7x7, like the authors' size argument),
  so smaller quick-profile maps work too.
* ``g_r`` (:class:`Reconstructor`): concat(emotion, context) 1024 -> Conv3x3 512 + 3 residual blocks.
* ``C`` (``self.centers``): learnable confounder features C_1..C_Nc of shape 512 x 7 x 7 (Eq. 6).
* ``f_c``: AdaptiveAvgPool + Linear 512 -> N_e.

Losses:

* Eq. 3/4, discriminator terms: CE(d_e(g_e(f_b x)), y_e) and CE(d_c(g_c(f_b x)), y_c) on detached features
  (averaged, as in the authors' ``backward_Dis``).
* Eq. 3/4, generator terms: MSE(softmax(d_c(g_e(f_b x))), 1/N_c) and MSE(softmax(d_e(g_c(f_b x))), 1/N_e)
  (averaged, authors' ``L_Gen``); minimal exactly at the uniform output.
* Eq. 5: MSE(g_r(g_e(f_b x), g_c(f_b x)), f_b x).
* Eq. 6 (center loss, KaiyangZhou's implementation used by the authors): (1/B) sum_i ||g_c(f_b x_i) - C_{y_i}||^2
  weighted by lambda_2 = 5e-4 (Appendix B). The authors rescale the centres' gradient by 1/lambda_2 after
  backward, so the centres learn with weight 1 while g_c sees lambda_2; we write the same thing as
  lambda_2 ||g_c - sg(C)||^2 + ||sg(g_c) - C||^2 (``center_grad_unscale``; sg = stop-gradient).
* Eq. 7 (backdoor adjustment, P(D=d) = 1/N_c): CE((1/N_c) sum_i f_c(g_r(g_e(f_b x), C_i)), y_e). The N_c
  strata run as one batched forward (the batch is expanded over strata, stratum-major); g_r's BatchNorms
  (:class:`StrataBatchNorm2d`) then normalise each stratum with its own batch statistics and update their
  running statistics exactly as N_c sequential forwards would, so batched == loop also in training mode.
* Eq. 9 (test): only the top branch, f_b -> g_e -> g_r(., C_i) for every i -> f_c, logits averaged.

Multi-label AU tasks (our extension; the paper has only single-label emotions): d_e and f_c output one
logit per AU, trained with masked per-AU BCE; the context generator's confusion target becomes a sigmoid
output of 0.5 per AU (the uniform distribution of each binary AU). For ``intensity`` the per-AU 6-level
softmax is used, uniform target 1/6. The confounder label is ``batch["confounder"]`` (the dataset for the
CK+/MMI/Oulu mix, the subject for AU datasets); samples with confounder -1 do not enter d_c's CE or the
centre loss.

Training (Algorithm 1, appendix A.2), manual optimisation with three Adam optimisers (betas 0.5, 0.999):

1. ``optimizer_Dis`` (d_e, d_c), 2. ``optimizer_Feat`` (g_e, g_c, C, g_r), 3. ``optimizer_Cls`` (f_b at the
backbone lr, g_e, f_c; the authors add g_r with lr 0, we leave it out, which is the same update).

In-place safety. The authors' ``forward_Cls`` reuses the emotion features computed before
``optimizer_Feat.step()`` changed g_e's weights in place, and back-propagates through g_e's old graph; only
PyTorch 1.4 (no version-counter check on optimiser updates) lets that run, and its gradient mixes old
activations with new weights. Here no backward pass uses activations of weights already changed:

* step 1 runs f_b once; g_e, g_c run on ``f_b(x).detach()``. The Feat loss never reaches f_b (the authors
  zero f_b's gradients from it before the Cls step, so this gives the same updates without retaining f_b's
  graph);
* the Dis step uses detached features; the Feat step's forward through d_e/d_c runs after the Dis step, with
  the updated discriminator weights (as in the authors' ``backward_Feat``);
* the Cls step recomputes g_e(f_b(x)) on the non-detached backbone map with g_e's *updated* weights (its
  BatchNorm running statistics are not updated a second time) and g_r with its updated weights and the
  updated centres C (detached), then backpropagates into f_b, g_e, f_c.

Gradients are cleared (set to None) before each of the three backward passes, and each optimiser only
holds its own parameters, so each step changes exactly its parameter group. Under DDP the three backward
passes touch different parameter subsets: use ``strategy: ddp_find_unused_parameters_true`` (set in the
``paper`` profile; :meth:`IERN.setup` checks it).

Variants (``iern.mode``): ``iern``; ``disentangle`` (Table 2 'Disentanglement': f_c(g_e(f_b x)), no
confounder builder, Dis and Feat steps without the centre loss); ``nwgm`` (Table 3 'NWGM-based', appendix C
Eq. 13: logits = W_1 x + W_2 sum_d softmax(q k_d) P(d) s_d with x the pooled f_b feature and s_d a
dictionary of per-confounder mean features; the dictionary is the previous epoch's means (FeatureBank), zero
during the first epoch); ``resample`` (Table 3 'Re-sampling': f_c(f_b x) with each sample's loss weighted by
the inverse training frequency of its (confounder, class) cell, i.e. the expectation of class/confounder-
balanced re-sampling; per (confounder, AU, state) for multi-label tasks). ``nwgm`` and ``resample`` use
automatic optimisation with one Adam (backbone lr for f_b).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurecog.models.backbones import create_backbone
from aurecog.models.base import AUModel, lr_factor, schedule_steps
from aurecog.models.causal import FeatureBank, PrototypeAttention
from aurecog.models.losses import weighted_bce
from aurecog.models.registry import backbone_keys, register_family

MODES = ("iern", "disentangle", "nwgm", "resample")
MANUAL_MODES = ("iern", "disentangle")


# ---------------------------------------------------------------------------------------------- building blocks
class StrataBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, with ``self.strata = N > 1`` in training mode, treats its input (N*B, C, H, W)
    (stratum-major) as N separate batches: each stratum is normalised with its own batch statistics and the
    running statistics receive the N sequential momentum updates r <- (1-m) r + m s_i (i = 1..N), exactly as
    N separate forwards. With ``strata = 1`` or in eval mode it is a plain BatchNorm2d."""

    strata: int = 1

    def forward(self, x: Tensor) -> Tensor:
        n = self.strata
        if n <= 1 or not self.training:
            return super().forward(x)
        nb, c, h, w = x.shape
        xs = x.view(n, nb // n, c, h, w)
        mean = xs.mean(dim=(1, 3, 4), keepdim=True)  # N,1,C,1,1
        var = xs.var(dim=(1, 3, 4), unbiased=False, keepdim=True)
        y = (xs - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, c, 1, 1) + self.bias.view(1, 1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                cnt = (nb // n) * h * w
                m = self.momentum if self.momentum is not None else 0.1
                # r_N = (1-m)^N r_0 + sum_i m (1-m)^(N-i) s_i
                decay = (1 - m) ** torch.arange(n - 1, -1, -1, device=x.device, dtype=x.dtype)  # (1-m)^(N-i)
                ubvar = var.view(n, c) * cnt / max(cnt - 1, 1)
                self.running_mean.mul_((1 - m) ** n).add_(m * (decay[:, None] * mean.view(n, c)).sum(0))
                self.running_var.mul_((1 - m) ** n).add_(m * (decay[:, None] * ubvar).sum(0))
                self.num_batches_tracked.add_(n)
        return y.view(nb, c, h, w)


class ResidualBlock(nn.Module):
    """[conv3x3 (no bias), BN, ReLU, conv3x3 (no bias), BN] + identity, no ReLU after the add (authors'
    ``ResnetBlock``; Table 5 'Residual Block')."""

    def __init__(self, dim: int, norm=nn.BatchNorm2d):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=False), norm(dim), nn.ReLU(inplace=True),
                                  nn.Conv2d(dim, dim, 3, 1, 1, bias=False), norm(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def generator(dim: int, n_blocks: int) -> nn.Sequential:
    """g_e / g_c (Table 5): Conv2d(dim, dim, 3x3, p1) + ``n_blocks`` residual blocks."""
    return nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1), *[ResidualBlock(dim) for _ in range(n_blocks)])


class Reconstructor(nn.Module):
    """g_r (Table 5): concat(emotion, context) 2*dim -> Conv3x3 dim + ``n_blocks`` residual blocks."""

    def __init__(self, dim: int, n_blocks: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, 1, 1),
                                 *[ResidualBlock(dim, norm=StrataBatchNorm2d) for _ in range(n_blocks)])

    def forward(self, emo: Tensor, con: Tensor, strata: int = 1) -> Tensor:
        for m in self.net.modules():
            if isinstance(m, StrataBatchNorm2d):
                m.strata = strata
        try:
            return self.net(torch.cat([emo, con], 1))
        finally:
            for m in self.net.modules():
                if isinstance(m, StrataBatchNorm2d):
                    m.strata = 1


class Discriminator(nn.Module):
    """d_e / d_c (Table 5): Conv4x4 s2 p1 + LeakyReLU, 1x1 convs with LeakyReLU, final conv (no bias) whose
    kernel reduces the map to 1x1 (3 for the paper's 7x7 map), squeezed to (B, n_out)."""

    def __init__(self, dim: int, n_out: int, size: int, channels: list[int], slope: float):
        super().__init__()
        chans = [dim, *channels]
        layers: list[nn.Module] = [nn.Conv2d(chans[0], chans[1], 4, 2, 1), nn.LeakyReLU(slope)]
        for a, b in zip(chans[1:-1], chans[2:]):
            layers += [nn.Conv2d(a, b, 1), nn.LeakyReLU(slope)]
        reduced = (size + 2 - 4) // 2 + 1
        layers.append(nn.Conv2d(chans[-1], n_out, reduced, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)


class FeatureBackbone(nn.Module):
    """f_b: timm trunk (spatial ``forward_features``) + Conv2d 1x1 to ``dim`` (Table 5)."""

    def __init__(self, backbone_cfg: dict, dim: int):
        super().__init__()
        self.trunk, width = create_backbone(**backbone_cfg)
        self.proj = nn.Conv2d(width, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.trunk.forward_features(x))


def init_normal(module: nn.Module, std: float) -> None:
    """Authors' ``init_net`` ('normal', gain 0.02): conv/linear weights N(0, std), biases 0; BN weights
    N(1, std), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


@contextmanager
def frozen_bn_stats(module: nn.Module):
    """Forward without updating BatchNorm running statistics (momentum 0 leaves them unchanged)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


@contextmanager
def trainable_only(module: nn.Module, params: list[nn.Parameter]):
    """Set ``requires_grad`` False on every parameter of ``module`` not in ``params`` (the authors'
    ``set_requires_grad``), restoring the previous flags afterwards."""
    keep = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        if id(p) not in keep:
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def confusion_loss(logits: Tensor, kind: str) -> Tensor:
    """MSE of a discriminator's output distribution to the uniform one (Eqs. 3-4, generator terms).

    ``expression`` / confounder: softmax over the last dim vs 1/K. ``au``: per-AU sigmoid vs 0.5.
    ``intensity``: per-AU softmax over levels (logits B x C x L) vs 1/L."""
    if kind == "au":
        p, target = torch.sigmoid(logits), 0.5
    else:
        p = logits.softmax(-1)
        target = 1.0 / logits.shape[-1]
    return F.mse_loss(p, torch.full_like(p, target))


def center_loss(feat: Tensor, centers: Tensor, labels: Tensor, lam: float, unscale: bool = True) -> Tensor:
    """lambda_2 * L_CB (Eq. 6) in the authors' form (KaiyangZhou center loss): (1/B) sum_i ||x_i - c_{y_i}||^2
    over samples with a known label, per-sample distances clamped to [1e-12, 1e12] as in that code.

    With ``unscale`` the centres get the gradient of the unweighted loss (the authors multiply the centres'
    gradients by 1/lambda_2 after backward) and the features that of lambda_2 * L_CB; the value returned is
    lambda_2 * L_CB either way."""
    keep = labels >= 0
    x = feat.flatten(1)[keep]
    if x.shape[0] == 0:
        return feat.sum() * 0.0 + centers.sum() * 0.0
    c = centers.flatten(1)[labels[keep].long()]

    def dist(a: Tensor, b: Tensor) -> Tensor:
        return ((a - b) ** 2).sum(1).clamp(1e-12, 1e12).sum() / x.shape[0]

    if not unscale:
        return lam * dist(x, c)
    d_feat = dist(x, c.detach())
    d_cent = dist(x.detach(), c)
    # value lam * d, gradients: lam * d/dx to the features, 1 * d/dc to the centres
    return lam * d_feat + (d_cent - d_cent.detach())


def warmup_hold_linear(step: int, warmup: int, hold: int, total: int, final: float = 0.0) -> float:
    """LR factor of the authors' ``lr_policy='warmup'``: linear warm-up from 0 over ``warmup`` steps
    (GradualWarmupScheduler, multiplier 1), constant for ``hold`` steps, then linear decay to ``final`` at
    ``total``: the base class's ``linear`` schedule (:func:`aurecog.models.base.lr_factor`), shared with
    ``iern-baseline``."""
    return lr_factor("linear", step, warmup, hold, total, final)


# ---------------------------------------------------------------------------------------------- the model
@register_family("iern")
class IERN(AUModel):
    config_keys = AUModel.config_keys | backbone_keys() | {"optim.backbone_lr"} | {
        f"iern.{k}" for k in ("mode", "feat_dim", "gen_blocks", "recon_blocks", "dis_channels", "leaky_slope",
                              "lambda_1", "lambda_2", "lambda_3", "center_grad_unscale", "init_std", "nwgm_dim",
                              "clip_grad")}

    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        m = cfg.get("iern", {})
        self.mode = m.get("mode", "iern")
        if self.mode not in MODES:
            raise ValueError(f"iern.mode must be one of {MODES}, got {self.mode!r}")
        self.automatic_optimization = self.mode not in MANUAL_MODES
        dim = int(m.get("feat_dim", 512))
        self.dim = dim
        self.n_conf = max(1, self.stats.n_confounders)
        k = self.task.kind
        self.out_dim = self.task.num_outputs * (self.task.levels if k == "intensity" else 1)
        self.lambda_1 = float(m.get("lambda_1", 1.0))
        self.lambda_2 = float(m.get("lambda_2", 5e-4))
        self.lambda_3 = float(m.get("lambda_3", 1.0))
        self.center_grad_unscale = bool(m.get("center_grad_unscale", True))
        self.clip_grad = m.get("clip_grad")

        self.backbone = FeatureBackbone(cfg.get("backbone", {}), dim)
        self.size = self._feature_size(int(cfg.get("data", {}).get("input_size", 224)))
        std = float(m.get("init_std", 0.02))
        nwgm_dim = int(m.get("nwgm_dim", dim))  # NWGM attention width (mode nwgm only)
        heads: list[nn.Module] = []
        if self.mode in MANUAL_MODES:
            self.g_e = generator(dim, int(m.get("gen_blocks", 2)))
            self.g_c = generator(dim, int(m.get("gen_blocks", 2)))
            self.g_r = Reconstructor(dim, int(m.get("recon_blocks", 3)))
            dis_ch = list(m.get("dis_channels", [512, 256, 128, 64]))
            slope = float(m.get("leaky_slope", 0.01))
            self.d_e = Discriminator(dim, self.out_dim, self.size, dis_ch, slope)
            self.d_c = Discriminator(dim, self.n_conf, self.size, dis_ch, slope)
            heads += [self.g_e, self.g_c, self.g_r, self.d_e, self.d_c]
            if self.mode == "iern":  # Eq. 6: C_1..C_Nc, randn as in the center-loss code
                self.centers = nn.Parameter(torch.randn(self.n_conf, dim, self.size, self.size))
        if self.mode == "nwgm":
            self.bank = FeatureBank(self.n_conf, dim)
            self.register_buffer("dictionary", torch.zeros(self.n_conf, dim))
            self.register_buffer("prior", torch.full((self.n_conf,), 1.0 / self.n_conf))
            self.attention = PrototypeAttention(dim, nwgm_dim, self.out_dim)
            self._bank_dirty = False
        else:
            self.f_c = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(dim, self.out_dim))
            heads.append(self.f_c)
        for h in heads:
            init_normal(h, std)
        if self.mode == "resample":
            shape = (self.n_conf, self.out_dim) if k == "expression" else (self.n_conf, self.task.num_outputs, 2)
            self.register_buffer("cell_weight", torch.ones(shape))

    def _feature_size(self, input_size: int) -> int:
        was = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            s = self.backbone(torch.zeros(1, 3, input_size, input_size)).shape[-1]
        self.backbone.train(was)
        return int(s)

    # ------------------------------------------------------------------ forward
    def _shape(self, logits: Tensor) -> Tensor:
        if self.task.kind == "intensity":
            return logits.view(*logits.shape[:-1], self.task.num_outputs, self.task.levels)
        return logits

    def deconfounded_logits(self, emo: Tensor, centers: Tensor) -> Tensor:
        """(1/N_c) sum_i f_c(g_r(emo, C_i)) (Eqs. 7 and 9) as one batched forward over the N_c strata."""
        n, b = centers.shape[0], emo.shape[0]
        emo_rep = emo.unsqueeze(0).expand(n, *emo.shape).reshape(n * b, *emo.shape[1:])
        con_rep = centers.unsqueeze(1).expand(n, b, *centers.shape[1:]).reshape(n * b, *centers.shape[1:])
        logits = self.f_c(self.g_r(emo_rep, con_rep, strata=n))
        return logits.view(n, b, -1).mean(0)

    def deconfounded_logits_loop(self, emo: Tensor, centers: Tensor) -> Tensor:
        """Reference of :meth:`deconfounded_logits`: the explicit loop over strata of Algorithm 1, lines 5-6."""
        out = [self.f_c(self.g_r(emo, c.unsqueeze(0).expand_as(emo))) for c in centers]
        return torch.stack(out).mean(0)

    def reconstruct(self, emo: Tensor, con: Tensor) -> Tensor:
        """g_r(g_e(f_b x), g_c(f_b x)) of Eq. 5 (training only)."""
        return self.g_r(emo, con)

    def head_logits(self, base: Tensor, emo: Tensor | None = None) -> Tensor:
        """The classifier branch on a backbone map (the 'top branch' of Fig. 3 for IERN)."""
        if self.mode == "iern":
            return self.deconfounded_logits(self.g_e(base) if emo is None else emo, self.centers.detach())
        if self.mode == "disentangle":
            return self.f_c(self.g_e(base) if emo is None else emo)
        if self.mode == "resample":
            return self.f_c(base)
        pooled = base.mean((2, 3))  # nwgm, Eq. 13: W_1 x + W_2 E_d[g(d)] with attention over the dictionary
        y, _ = self.attention(pooled, self.dictionary, self.prior[:, None] * self.dictionary)
        return y

    def forward(self, batch: dict) -> dict:
        base = self.backbone(batch["image"])
        return {"logits": self._shape(self.head_logits(base)), "feature": base}

    # ------------------------------------------------------------------ losses
    def _dis_target_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.supervised_loss(self._shape(logits), target)

    def _conf_ce(self, logits: Tensor, conf: Tensor) -> Tensor:
        if (conf >= 0).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits, conf.long(), ignore_index=-1)

    def _kind(self) -> str:
        return self.task.kind

    def compute_loss(self, out: dict, batch: dict):
        """Loss of the automatic-optimisation variants (``nwgm``, ``resample``); for IERN/Disentanglement it
        is the classification loss L_Cls only (the other losses live in the three optimiser steps)."""
        logits, target = out["logits"], batch["target"]
        if self.mode == "nwgm" and self.training:
            self.bank.update(out["feature"].mean((2, 3)), batch["confounder"])
        if self.mode != "resample":
            return self.supervised_loss(logits, target), {}
        return self.resample_loss(logits, target, batch["confounder"]), {}

    def resample_loss(self, logits: Tensor, target: Tensor, conf: Tensor) -> Tensor:
        """Per-sample loss weighted by the inverse training frequency of its (confounder, class) cell."""
        c = conf.long().clamp_min(0)
        known_conf = (conf >= 0).to(logits.dtype)
        if self.task.kind == "expression":
            t = target.long()
            w = self.cell_weight[c, t.clamp_min(0)] * known_conf + (1 - known_conf)
            ce = F.cross_entropy(logits, t.clamp_min(0), reduction="none") * (t >= 0)
            return (w * ce).sum() / (t >= 0).sum().clamp_min(1)
        state = (target >= self.task.positive_threshold) if self.task.kind == "intensity" else (target > 0)
        j = torch.arange(target.shape[1], device=target.device)
        w = self.cell_weight[c[:, None], j[None, :], state.long()]
        w = w * known_conf[:, None] + (1 - known_conf[:, None])
        if self.task.kind == "au":
            return weighted_bce(logits, target, au_weight=w)
        known = target >= 0
        ce = F.cross_entropy(logits.flatten(0, 1), target.long().clamp_min(0).flatten(), reduction="none")
        ce = ce.view_as(target) * known * w
        return ce.sum() / known.sum().clamp_min(1)

    @torch.no_grad()
    def set_cell_weights(self, target: Tensor, conf: Tensor) -> None:
        """Inverse (confounder, class) frequencies from the training labels, normalised so the weights
        average 1 over the training samples: w(c, y) = n / (n_cells * n(c, y)) over non-empty cells."""
        conf = conf.long()
        ok_c = conf >= 0
        if self.task.kind == "expression":
            t = target.long()
            ok = ok_c & (t >= 0)
            counts = torch.zeros(self.n_conf, self.out_dim, dtype=torch.float64)
            counts.index_put_((conf[ok], t[ok]), torch.ones(int(ok.sum()), dtype=torch.float64), accumulate=True)
            nz = counts > 0
            w = torch.where(nz, counts.sum() / (nz.sum() * counts.clamp_min(1)), torch.ones_like(counts))
        else:
            state = (target >= self.task.positive_threshold) if self.task.kind == "intensity" else (target > 0)
            n_au = target.shape[1]
            counts = torch.zeros(self.n_conf, n_au, 2, dtype=torch.float64)
            for j in range(n_au):  # one-off, at fit start
                ok = ok_c & (target[:, j] >= 0)
                counts[:, j].index_put_((conf[ok], state[ok, j].long()), torch.ones(int(ok.sum()),
                                        dtype=torch.float64), accumulate=True)
            nz = counts > 0
            per_au = counts.sum((0, 2)) / (nz.sum((0, 2)).clamp_min(1))  # n_known(j) / n_cells(j)
            w = torch.where(nz, per_au[None, :, None] / counts.clamp_min(1), torch.ones_like(counts))
        self.cell_weight.copy_(w.to(self.cell_weight))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.mode in MANUAL_MODES and stage == "fit":
            from lightning.pytorch.strategies import DDPStrategy

            strat = self.trainer.strategy
            if isinstance(strat, DDPStrategy) and strat.world_size > 1 and not getattr(
                    strat, "_ddp_kwargs", {}).get("find_unused_parameters", False):
                raise RuntimeError("IERN's three backward passes each reach a different parameter subset; under "
                                   "DDP use trainer.strategy: ddp_find_unused_parameters_true")

    def on_fit_start(self) -> None:
        if self.mode != "resample":
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "split_arrays"):
            raise RuntimeError("iern-resample needs the AUDataModule to read the training (confounder, label) "
                               "counts")
        rows = dm.split_rows["train"]
        arr = dm.split_arrays["train"]
        self.set_cell_weights(torch.as_tensor(arr["target"][rows]), torch.as_tensor(arr["confounder"][rows]))

    def on_train_epoch_start(self) -> None:
        if self.mode == "nwgm":
            self.bank.reset()
            self._bank_dirty = True

    def _refresh_dictionary(self) -> None:
        """NWGM: the pre-computed dictionary = per-confounder mean pooled f_b feature of the epoch just seen."""
        if self.mode != "nwgm" or not self._bank_dirty:
            return
        self._bank_dirty = False
        self.bank.sync()
        seen = self.bank.counts > 0
        if bool(seen.any()):
            self.dictionary.copy_(torch.where(seen[:, None], self.bank.means(), self.dictionary))
            self.prior.copy_(self.bank.priors())
        self.bank.reset()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._refresh_dictionary()

    def on_train_epoch_end(self) -> None:
        self._refresh_dictionary()

    # ------------------------------------------------------------------ optimisation
    def optimizer_params(self) -> dict[str, list]:
        """Parameter sets of the three optimisers of Algorithm 1 (appendix A.2)."""
        if self.mode not in MANUAL_MODES:
            return {}
        dis = [*self.d_e.parameters(), *self.d_c.parameters()]
        feat = [*self.g_e.parameters(), *self.g_c.parameters(), *self.g_r.parameters()]
        if self.mode == "iern":
            feat.append(self.centers)
        cls_heads = [*self.g_e.parameters(), *self.f_c.parameters()]
        return {"dis": dis, "feat": feat, "cls_backbone": list(self.backbone.parameters()), "cls_heads": cls_heads}

    def build_optimizers(self) -> list[torch.optim.Optimizer]:
        o = self.cfg.get("optim", {})
        lr = float(o.get("lr", 2e-4))
        blr = float(o.get("backbone_lr", lr))
        kw = dict(betas=tuple(o.get("betas", (0.5, 0.999))), weight_decay=float(o.get("weight_decay", 0.0)))
        if self.mode in MANUAL_MODES:
            p = self.optimizer_params()
            return [torch.optim.Adam(p["dis"], lr=lr, **kw),
                    torch.optim.Adam(p["feat"], lr=lr, **kw),
                    torch.optim.Adam([{"params": p["cls_backbone"], "lr": blr}, {"params": p["cls_heads"]}],
                                     lr=lr, **kw)]
        bb = {id(q) for q in self.backbone.parameters()}
        rest = [q for q in self.parameters() if id(q) not in bb]
        return [torch.optim.Adam([{"params": list(self.backbone.parameters()), "lr": blr}, {"params": rest}],
                                 lr=lr, **kw)]

    def _scheduler(self, opt: torch.optim.Optimizer):
        s = self.cfg.get("schedule", {}) or {}
        name = s.get("name", "linear")
        if name == "constant":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        if name != "linear":
            raise ValueError(f"iern schedule: 'linear' (warm-up, hold, linear decay) or 'constant', not {name!r}")
        warmup, hold, total = schedule_steps(self, s)
        final = float(s.get("final_factor", 0.0))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_hold_linear(step, warmup, hold, total,
                                                                                       final))

    def configure_optimizers(self):
        opts = self.build_optimizers()
        scheds = [self._scheduler(o) for o in opts]
        if self.automatic_optimization:
            return {"optimizer": opts[0], "lr_scheduler": {"scheduler": scheds[0], "interval": "step"}}
        return opts, [{"scheduler": s, "interval": "step"} for s in scheds]

    # ------------------------------------------------------------------ the three steps of Algorithm 1
    def _backward_step(self, opt, loss: Tensor) -> None:
        if getattr(self, "_trainer", None) is not None:
            self.manual_backward(loss)
            if self.clip_grad:
                self.clip_gradients(opt, gradient_clip_val=float(self.clip_grad), gradient_clip_algorithm="norm")
        else:  # unit tests drive the steps without a Trainer
            loss.backward()
        opt.step()

    def disentangle_features(self, base: Tensor) -> tuple[Tensor, Tensor]:
        """Algorithm 1 line 2: g_e, g_c on the (detached) backbone map."""
        return self.g_e(base), self.g_c(base)

    def discriminator_step(self, opt, emo: Tensor, con: Tensor, batch: dict) -> Tensor:
        """Algorithm 1 line 3: first terms of Eqs. 3 and 4 on detached features; updates d_e, d_c."""
        self.zero_grad(set_to_none=True)
        with trainable_only(self, self.optimizer_params()["dis"]):
            l_de = self._dis_target_loss(self.d_e(emo.detach()), batch["target"])
            l_dc = self._conf_ce(self.d_c(con.detach()), batch["confounder"])
            loss = self.lambda_1 * (l_de + l_dc) / 2
            self._backward_step(opt, loss)
        return loss.detach()

    def feature_step(self, opt, base: Tensor, emo: Tensor, con: Tensor, batch: dict) -> dict[str, Tensor]:
        """Algorithm 1 line 4: generator terms of Eqs. 3-4, Eq. 5 and (IERN) Eq. 6; updates g_e, g_c, g_r, C.
        ``base`` is the detached backbone map (reconstruction target)."""
        self.zero_grad(set_to_none=True)
        with trainable_only(self, self.optimizer_params()["feat"]):
            l_gen_e = confusion_loss(self.d_c(emo), "expression")  # Eq. 3: d_c(g_e) -> 1/N_c
            l_gen_c = confusion_loss(self._shape(self.d_e(con)), self._kind())  # Eq. 4: d_e(g_c) -> 1/N_e
            l_gen = (l_gen_e + l_gen_c) / 2
            l_rec = F.mse_loss(self.reconstruct(emo, con), base)
            loss = self.lambda_1 * (l_gen + l_rec)
            parts = {"gen": l_gen.detach(), "recon": l_rec.detach()}
            if self.mode == "iern":
                l_cb = center_loss(con, self.centers, batch["confounder"], self.lambda_2, self.center_grad_unscale)
                loss = loss + l_cb
                parts["center"] = l_cb.detach()
            self._backward_step(opt, loss)
        return parts

    def classifier_step(self, opt, base: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
        """Algorithm 1 lines 5-7: Eq. 7 with the updated C; updates f_b, g_e, f_c (g_r is not updated).
        g_e runs again on the non-detached map with its updated weights (see module docstring)."""
        self.zero_grad(set_to_none=True)
        p = self.optimizer_params()
        with trainable_only(self, p["cls_backbone"] + p["cls_heads"]):
            with frozen_bn_stats(self.g_e):
                emo = self.g_e(base)
            logits = self._shape(self.head_logits(base, emo))
            loss = self.lambda_3 * self.supervised_loss(logits, batch["target"])
            self._backward_step(opt, loss)
        return loss.detach(), logits.detach()

    def training_step(self, batch: dict, batch_idx: int):
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        opt_dis, opt_feat, opt_cls = self.optimizers()
        base = self.backbone(batch["image"])
        base_d = base.detach()
        emo, con = self.disentangle_features(base_d)
        l_dis = self.discriminator_step(opt_dis, emo, con, batch)
        parts = self.feature_step(opt_feat, base_d, emo, con, batch)
        l_cls, _ = self.classifier_step(opt_cls, base, batch)
        for s in self.lr_schedulers():
            s.step()
        bs = batch["image"].shape[0]
        self.log("train/loss", l_cls, prog_bar=True, batch_size=bs)
        self.log("train/dis", l_dis, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return None
