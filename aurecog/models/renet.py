"""RE-Net: a relation embedded deep model for AU occurrence and intensity estimation (Yang & Yin, ACCV 2020).

Multi-label AU detection is cast as domain adaptation with one *domain per AU*. A ResNet-18 keeps its
convolutions shared by all AUs, and every BatchNorm becomes an AU-conditional BN (paper Sec. 3.2-3.4):

    BN^(x, c)    = gamma_c   (x - mu_c) / sqrt(sigma_c^2 + eps) + beta_c                     (Eq. 2-3)
    BN^(x, c, G) = gamma_c^G (x - mu_c) / sqrt(sigma_c^2 + eps) + beta_c^G                   (Eq. 4)
    gamma_c^G    = sum_k w_ck gamma_k / sum_k w_ck,  beta_c^G likewise                        (Eq. 5)

with mu_c, sigma_c the statistics of the input *conditioned on AU c* (per-AU running statistics; in training
the statistics of the samples conditioned on c), gamma_k, beta_k per-AU parameters and w_ck the Pearson
correlation of AUs c and k on the training labels (``stats.label_corr``), w_cc = 1. Running the network
conditioned on AU c gives the output for AU c: one logit (occurrence) or six level logits (intensity, paper
4.5) from a classifier *shared by all AUs* (the AU identity enters only through the BN parameters, which is what
makes the unseen-AU transfer of Table 6 possible; ``head.shared: false`` gives a C-way head whose column c is
read instead).

Implementation choices (documented in ``configs/models/renet.yaml``):

* **Denominator of Eq. 5.** PCCs can be negative, so sum_k w_ck can approach 0 (or go negative) and the literal
  Eq. 5 then amplifies (or flips) the parameters without bound. :func:`normalize_graph` offers ``signed`` (the
  literal Eq. 5, guarded only against an exact zero), ``abs`` (divide by sum_k |w_ck|: bounded, but the
  weights no longer sum to 1, so equal parameters are not preserved) and the default ``shrink``: the literal
  Eq. 5 wherever sum_k w_ck >= tau (``min_denominator``); in a row whose denominator would fall below tau the
  off-diagonal weights are scaled down until it equals tau. Rows keep summing to 1 (an affine combination, so
  equal gamma/beta reproduce a plain BN), the amplification is bounded by (1 + sum_k |w_ck|) / tau, and on a
  graph whose rows satisfy the bound (BP4D's PCC graph, paper Fig. 2) it is exactly Eq. 5.
  :func:`near_singular_rows` detects the rows concerned; the model logs them at construction.
* **Training strategies (Sec. 3.4).** ``random`` (the paper's choice): one AU drawn per batch, the whole batch
  conditioned on it, loss = Eq. 6 for that AU (unknown labels masked). ``all``: the batch expanded over the AUs
  in one pass (B*C samples, per-AU batch statistics), loss = Eq. 6 summed over AUs. The AU draw uses a private
  generator seeded from the global seed, so every DDP rank conditions on the same AU.
* **Evaluation** conditions on every AU. ``renet.eval_path: auto`` (default) takes the *folded* path
  (:mod:`aurecog.models.renet_folded`, :meth:`RENet.predict_folded`) when autograd is off and the backbone is a
  plain timm ResNet: the stem computed and max/min-pooled once, each conditional BN folded into its convolution
  (weights cached per AU), then per-AU passes; an exact rewrite, 4x faster than the loop at the quick width on
  the 2-core CPU (results/perf/renet_batched_inference.md). Otherwise (``batched``, or autograd on) *one
  batched pass*: the batch is expanded to B*C samples (lazily, at the first conditional BN: everything before it
  is AU-independent), each sample's BN scale/shift gathered by its AU index; the B x C (x 6) logits are read off
  the conditioned outputs. :meth:`RENet.predict_loop` is the paper's C separate passes, kept as the reference.
* **Unseen AU (Table 6).** ``unseen_au: <name>``: that AU is never drawn in training (its labels are never
  used); its gamma/beta at test come from Eq. 5 (its own gamma/beta only ever receive gradient through the other
  AUs' graph combinations), and since no statistics were ever estimated for it, its running mean/variance are
  the moment-matched mixture of the other AUs' statistics weighted by the positive part of its graph row (the
  AdaGraph ``set_bn_from_edges`` idea, reference notes section 5). The graph itself is taken as prior
  knowledge (the training-label PCC including that AU, as the paper's Eq. 4-5 at test requires).
* **Rare-AU duplication (Table 8).** ``duplicate.enabled`` (the base class's in-batch duplication, shared with
  the baseline): within each training batch, every frame with a positive label for one of ``duplicate.aus``
  (the paper's list, AU1, AU2, AU15, AU23, AU24) is appended once more (``copies``), the in-batch form of the
  paper's "duplicate the AUs ... one time if a positive label is observed". The Table 8 'ResNet18' rows are the
  baseline class with and without it, the 'Ours' rows this class with and without it.
* **Unseen-AU model selection (Table 6).** Validation F1 (checkpoint selection, early stopping) is computed
  over the trained AUs only (:meth:`AUModel.set_validation_labels`); the test metrics cover every AU.
* **Loss.** Eq. 6 through the base class's :meth:`AUModel.supervised_loss` (one reduction for every family:
  the mean over the known (sample, conditioned AU) entries), on the conditioned AU(s) only.
* **Expression tasks.** Class-conditional BN with the graph from the one-hot label correlation
  (``stats.label_corr``); the conditioned output for class k is one logit, the eval logits are B x K and the
  base class applies a softmax over them. Training loss: one-vs-rest Eq. 6 for the drawn class (``random``), or
  with ``all`` either that summed over classes (``expression_loss: ovr``) or softmax cross-entropy over the
  assembled B x K logits (``expression_loss: softmax``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aurecog.models.backbones import create_backbone
from aurecog.models.base import DUPLICATE_KEYS, AUModel
from aurecog.models.registry import backbone_keys, register_family

log = logging.getLogger(__name__)

EVAL_PATHS = ("auto", "folded", "batched")
GRAPH_NORMS = ("shrink", "signed", "abs")
SIGNED_EPS = 1e-6  # the literal Eq. 5 is only protected against an exactly zero denominator
STRATEGIES = ("random", "all")


# ---------------------------------------------------------------------------------------------------- graph
def near_singular_rows(w: Tensor, min_denominator: float) -> Tensor:
    """Rows c whose Eq. 5 denominator sum_k w_ck is below ``min_denominator`` (bool, (C,))."""
    return w.sum(-1) < min_denominator


def normalize_graph(w: Tensor, mode: str = "shrink", min_denominator: float = 0.5) -> Tensor:
    """Row-normalised graph A with gamma^G = A @ gamma (Eq. 5); see the module docstring for the modes."""
    if mode == "signed":
        den = w.sum(-1, keepdim=True)
        den = torch.where(den.abs() < SIGNED_EPS, torch.full_like(den, SIGNED_EPS), den)
        return w / den
    if mode == "abs":
        return w / w.abs().sum(-1, keepdim=True).clamp_min(SIGNED_EPS)
    if mode == "shrink":
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        diag = (w * eye).sum(-1, keepdim=True)
        off = w * (1 - eye)
        off_sum = off.sum(-1, keepdim=True)
        # alpha scales the off-diagonal weights so that diag + alpha * off_sum >= tau
        need = off_sum < (min_denominator - diag)
        alpha = torch.where(need, (min_denominator - diag) / torch.where(need, off_sum, -torch.ones_like(off_sum)),
                            torch.ones_like(off_sum))
        w2 = diag * eye + alpha * off
        return w2 / w2.sum(-1, keepdim=True)
    raise ValueError(f"unknown graph normalisation {mode!r}; expected one of {GRAPH_NORMS}")


class RelationGraph(nn.Module):
    """The AU relation graph W (C x C, w_cc = 1): fixed PCC (buffer), identity, or learnable (Table 7)."""

    def __init__(self, corr: Tensor, learnable: bool = False, init: str = "pcc", random_range: float = 1.0,
                 norm: str = "shrink", min_denominator: float = 0.5):
        super().__init__()
        c = corr.shape[0]
        if norm not in GRAPH_NORMS:
            raise ValueError(f"unknown graph normalisation {norm!r}; expected one of {GRAPH_NORMS}")
        self.norm, self.min_denominator = norm, float(min_denominator)
        eye = torch.eye(c)
        if init == "pcc":
            w = torch.nan_to_num(corr.float(), nan=0.0)
        elif init == "identity":
            w = eye.clone()
        elif init == "random":  # 'Ours+learnable': w_ij randomly initialised (paper 4.6)
            w = (torch.rand(c, c) * 2 - 1) * random_range
        else:
            raise ValueError(f"unknown graph init {init!r} (pcc, identity, random)")
        w = w * (1 - eye) + eye  # w_cc = 1 (Eq. 5)
        self.register_buffer("eye", eye, persistent=False)
        if learnable:
            self.off = nn.Parameter(w * (1 - eye))
        else:
            self.register_buffer("off", w * (1 - eye))

    def raw(self) -> Tensor:
        return self.off * (1 - self.eye) + self.eye

    def forward(self) -> Tensor:
        return normalize_graph(self.raw(), self.norm, self.min_denominator)


# ---------------------------------------------------------------------------------------------------- BN
class Condition:
    """What every conditional BN of one network reads during a forward pass (set by :class:`RENet`).

    ``index``: (N,) AU index of each sample (N = B * number of conditioned AUs in a batched pass);
    ``single``: the AU when the whole batch is conditioned on one AU (fast path), else None;
    ``weights``: the normalised graph A (C x C) of Eq. 5; ``stat_mix``: optional C x C matrix mixing the running
    statistics at eval (unseen AU), rows of the seen AUs being the identity.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.index: Tensor | None = None
        self.single: int | None = None
        self.weights: Tensor | None = None
        self.stat_mix: Tensor | None = None


class AUConditionalBatchNorm2d(nn.Module):
    """BN^(x, c, G) of Eq. 4: per-AU statistics mu_c, sigma_c (Eq. 2) and graph-combined per-AU affine
    parameters gamma_c^G, beta_c^G (Eq. 5). Initialised from ``source`` (a BatchNorm2d, pretrained or not):
    every AU starts with its affine parameters and running statistics."""

    def __init__(self, num_features: int, num_conditions: int, ctx: Condition, eps: float = 1e-5,
                 momentum: float | None = 0.1, source: nn.BatchNorm2d | None = None):
        super().__init__()
        self.num_features, self.num_conditions = num_features, num_conditions
        self.eps, self.momentum, self.ctx = eps, momentum, ctx
        c, f = num_conditions, num_features
        g = torch.ones(c, f)
        b = torch.zeros(c, f)
        rm, rv = torch.zeros(c, f), torch.ones(c, f)
        if source is not None:
            if source.affine:
                g = source.weight.detach().clone()[None].repeat(c, 1)
                b = source.bias.detach().clone()[None].repeat(c, 1)
            if source.track_running_stats and source.running_mean is not None:
                rm = source.running_mean.detach().clone()[None].repeat(c, 1)
                rv = source.running_var.detach().clone()[None].repeat(c, 1)
        self.weight = nn.Parameter(g)  # gamma_c, (C, F)
        self.bias = nn.Parameter(b)  # beta_c, (C, F)
        self.register_buffer("running_mean", rm)
        self.register_buffer("running_var", rv)
        self.register_buffer("num_batches_tracked", torch.zeros(c, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"{self.num_features}, conditions={self.num_conditions}, eps={self.eps}, momentum={self.momentum}"

    def graph_params(self) -> tuple[Tensor, Tensor]:
        """(gamma^G, beta^G), each (C, F), of Eq. 5."""
        a = self.ctx.weights
        if a is None:
            return self.weight, self.bias
        a = a.to(self.weight.dtype)
        with torch.autocast(self.weight.device.type, enabled=False):  # parameters stay in their own precision
            return a @ self.weight, a @ self.bias

    @torch.no_grad()
    def _update_running(self, which: Tensor, mean: Tensor, var_unbiased: Tensor) -> None:
        self.num_batches_tracked[which] += 1
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d(momentum=None)
            m = (1.0 / self.num_batches_tracked[which].to(mean.dtype))[:, None]
        else:
            m = torch.full((len(which), 1), float(self.momentum), dtype=mean.dtype, device=mean.device)
        self.running_mean[which] = (1 - m) * self.running_mean[which] + m * mean.detach()
        self.running_var[which] = (1 - m) * self.running_var[which] + m * var_unbiased.detach()

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # mixed precision: normalise in float32 (statistics, graph combination) as autocast does for
            # nn.BatchNorm2d, and hand the next layer the input's dtype
            with torch.autocast(x.device.type, enabled=False):
                return self._normalise(x.float()).to(x.dtype)
        return self._normalise(x)

    def _normalise(self, x: Tensor) -> Tensor:
        idx = self.ctx.index
        if idx is None:
            raise RuntimeError("AUConditionalBatchNorm2d needs a condition: run the network through RENet")
        n = idx.shape[0]
        if x.shape[0] != n:  # lazy expansion: everything before the first conditional BN is AU-independent
            if n % x.shape[0]:
                raise RuntimeError(f"condition of {n} samples for a batch of {x.shape[0]}")
            x = x.repeat_interleave(n // x.shape[0], dim=0)
        gamma, beta = self.graph_params()  # (C, F)
        if self.training:
            if self.ctx.single is not None:
                # the whole batch conditioned on AU c: the fused BN kernel on copies of AU c's running statistics
                c = self.ctx.single
                rm, rv = self.running_mean[c].clone(), self.running_var[c].clone()
                self.num_batches_tracked[c] += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked[c])
                out = F.batch_norm(x, rm, rv, gamma[c], beta[c], True, m, self.eps)
                self.running_mean[c] = rm
                self.running_var[c] = rv
                return out
            # per-AU batch statistics (Eq. 2) of a batch expanded over several AUs, two-pass, vectorised
            onehot = F.one_hot(idx, self.num_conditions).to(x.dtype)  # N, C
            counts = onehot.sum(0)  # C
            m_n = x.mean(dim=(2, 3))  # N, F
            mean_c = (onehot.T @ m_n) / counts.clamp_min(1)[:, None]  # C, F
            mu = mean_c[idx]  # N, F
            v_n = (x - mu[:, :, None, None]).pow(2).mean(dim=(2, 3))
            var_c = (onehot.T @ v_n) / counts.clamp_min(1)[:, None]
            scale = gamma[idx] * torch.rsqrt(var_c[idx] + self.eps)
            shift = beta[idx] - mu * scale
            present = torch.nonzero(counts > 0).flatten()
            cnt = (counts[present] * x.shape[2] * x.shape[3])[:, None]
            self._update_running(present, mean_c[present], var_c[present] * cnt / (cnt - 1).clamp_min(1))
            return x * scale[:, :, None, None] + shift[:, :, None, None]
        scale_c, shift_c = self.eval_affine(gamma, beta)
        return x * scale_c[idx][:, :, None, None] + shift_c[idx][:, :, None, None]

    def eval_affine(self, gamma: Tensor | None = None, beta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The evaluation-mode BN as a per-AU affine map x -> scale_c * x + shift_c: (scale, shift), each (C, F),
        from the graph-combined parameters (Eq. 5) and the running statistics (mixed for an unseen AU)."""
        if gamma is None or beta is None:
            gamma, beta = self.graph_params()
        rm, rv = self.running_mean, self.running_var
        mix = self.ctx.stat_mix
        if mix is not None:  # unseen AU: moment-matched mixture of the other AUs' statistics
            mix = mix.to(rm.dtype)
            m2 = mix @ (rv + rm * rm)
            rm = mix @ rm
            rv = (m2 - rm * rm).clamp_min(0)
        scale = gamma * torch.rsqrt(rv + self.eps)  # C, F
        return scale, beta - rm * scale


def convert_batchnorms(module: nn.Module, num_conditions: int, ctx: Condition) -> list[str]:
    """Replace every BatchNorm2d of ``module`` (walking named modules) by an AU-conditional BN initialised from
    it; returns the replaced names."""
    targets = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)]
    for name, bn in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = AUConditionalBatchNorm2d(bn.num_features, num_conditions, ctx, eps=bn.eps, momentum=bn.momentum,
                                       source=bn)
        setattr(parent, attr, new)
    return [n for n, _ in targets]


def unseen_stat_mix(w: Tensor, unseen: int) -> Tensor:
    """C x C mixing matrix: identity rows, except row ``unseen`` = the positive part of its graph row over the
    other AUs, normalised (uniform over the others if none is positive)."""
    c = w.shape[0]
    mix = torch.eye(c, dtype=w.dtype, device=w.device)
    row = w[unseen].clamp_min(0).clone()
    row[unseen] = 0
    if row.sum() <= 0:
        row = torch.ones_like(row)
        row[unseen] = 0
    mix[unseen] = row / row.sum()
    return mix


# ---------------------------------------------------------------------------------------------------- model
@register_family("renet")
class RENet(AUModel):
    config_keys = AUModel.config_keys | backbone_keys() | DUPLICATE_KEYS | {
        "head.shared", "head.dropout",
        "renet.strategy", "renet.expression_loss", "renet.eval_path", "renet.eval_max_expanded",
        "renet.bn_momentum", "renet.unseen_au", "renet.graph.init", "renet.graph.learnable",
        "renet.graph.random_range", "renet.graph.norm", "renet.graph.min_denominator"}

    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        r = cfg.get("renet", {})
        self.num_conditions = c = self.task.num_outputs
        self.strategy = r.get("strategy", "random")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"renet.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        self.expression_loss = r.get("expression_loss", "ovr")
        if self.expression_loss == "softmax" and self.strategy != "all":
            raise ValueError("renet.expression_loss=softmax needs renet.strategy=all (all class outputs per sample)")
        self.max_expanded = r.get("eval_max_expanded")
        self.eval_path = r.get("eval_path", "auto")
        if self.eval_path not in EVAL_PATHS:
            raise ValueError(f"renet.eval_path must be one of {EVAL_PATHS}, got {self.eval_path!r}")
        self._folded_cache: tuple[tuple, object] | None = None

        b = cfg.get("backbone", {})
        self.backbone, dim = create_backbone(**b)
        self.ctx = Condition()
        self.converted = convert_batchnorms(self.backbone, c, self.ctx)
        if not self.converted:
            raise ValueError(f"backbone {b.get('name')!r} has no BatchNorm2d to condition")
        if r.get("bn_momentum") is not None:  # per-AU running statistics are updated only when the AU is drawn
            for mod in self.backbone.modules():
                if isinstance(mod, AUConditionalBatchNorm2d):
                    mod.momentum = float(r["bn_momentum"])

        g = r.get("graph", {})
        corr = torch.as_tensor(self.stats.corr_array())
        self.graph = RelationGraph(corr, learnable=bool(g.get("learnable", False)), init=g.get("init", "pcc"),
                                   random_range=float(g.get("random_range", 1.0)), norm=g.get("norm", "shrink"),
                                   min_denominator=float(g.get("min_denominator", 0.5)))
        bad = near_singular_rows(self.graph.raw().detach(), self.graph.min_denominator)
        if bad.any():
            log.warning("RE-Net graph: Eq. 5 denominators below %.2f for %s (normalisation %r)",
                        self.graph.min_denominator, [self.task.names[i] for i in torch.nonzero(bad).flatten()],
                        self.graph.norm)

        self.out_per_condition = self.task.levels if self.task.kind == "intensity" else 1
        h = cfg.get("head", {})
        self.shared_head = bool(h.get("shared", True))
        n_out = self.out_per_condition * (1 if self.shared_head else c)
        drop = float(h.get("dropout", 0.0))
        self.head = nn.Sequential(nn.Dropout(drop), nn.Linear(dim, n_out)) if drop > 0 else nn.Linear(dim, n_out)

        unseen = r.get("unseen_au")
        if isinstance(unseen, (list, tuple)):  # candidates: the first one that is a label of this task
            present = [a for a in unseen if a in self.task.names]
            if not present:
                raise ValueError(f"renet.unseen_au: none of {unseen} is a label of this task ({self.task.names})")
            unseen = present[0]
        if unseen is not None:
            if unseen not in self.task.names:
                raise ValueError(f"renet.unseen_au {unseen!r} is not a label of this task ({self.task.names})")
            if not self.shared_head:
                raise ValueError("renet.unseen_au needs a shared head (head.shared: true)")
        self.unseen = self.task.names.index(unseen) if unseen is not None else None
        self.fold_unsupported = self._fold_check()
        trained = [i for i in range(c) if i != self.unseen]
        self.register_buffer("train_conditions", torch.tensor(trained, dtype=torch.long), persistent=False)
        if self.unseen is not None:  # Table 6: the withheld AU must not select the checkpoint either
            self.set_validation_labels(trained)
        self.init_duplication(cfg.get("duplicate"))
        self._au_gen: torch.Generator | None = None

    # ------------------------------------------------------------------ helpers

    def _draw_condition(self) -> int:
        if self._au_gen is None:  # same seed on every DDP rank -> same AU everywhere
            self._au_gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63))
        j = int(torch.randint(len(self.train_conditions), (1,), generator=self._au_gen))
        return int(self.train_conditions[j])

    def stat_mix(self) -> Tensor | None:
        if self.unseen is None:
            return None
        return unseen_stat_mix(self.graph.raw().detach(), self.unseen)

    def features(self, x: Tensor, index: Tensor, single: int | None = None) -> Tensor:
        """Backbone features (N, D) with each sample conditioned on ``index`` (N = B * k; the input batch of
        B is expanded at the first conditional BN)."""
        self.ctx.index, self.ctx.single = index, single
        self.ctx.weights = self.graph()
        self.ctx.stat_mix = None if self.training else self.stat_mix()
        try:
            return self.backbone(x)
        finally:
            self.ctx.clear()

    def _read(self, out: Tensor, cond: Tensor, b: int) -> Tensor:
        """Head output of (B*k) samples conditioned on ``cond`` (k,) -> (B, k, o)."""
        k, o = cond.numel(), self.out_per_condition
        if self.shared_head:
            return out.view(b, k, o)
        out = out.view(b, k, self.num_conditions, o)
        return out[:, torch.arange(k, device=out.device), cond]

    def conditioned_logits(self, x: Tensor, cond: Tensor) -> Tensor:
        """One batched pass over the B x k (sample, condition) pairs -> (B, k, o)."""
        b = x.shape[0]
        index = cond.repeat(b)  # sample-major: sample i, condition j at i * k + j
        return self._read(self.head(self.features(x, index)), cond, b)

    def _assemble(self, z: Tensor) -> Tensor:
        """(B, C, o) -> task logits: B x C (au), B x C x 6 (intensity), B x K (expression)."""
        return z if self.task.kind == "intensity" else z.squeeze(-1)

    def predict_batched(self, x: Tensor) -> Tensor:
        """Evaluation: every AU in one batched pass (chunked over samples when ``eval_max_expanded`` is set)."""
        cond = torch.arange(self.num_conditions, device=x.device)
        step = x.shape[0]
        if self.max_expanded:
            step = max(1, int(self.max_expanded) // self.num_conditions)
        parts = [self.conditioned_logits(x[i:i + step], cond) for i in range(0, x.shape[0], step)]
        return self._assemble(torch.cat(parts))

    def _fold_check(self) -> str | None:
        """Why the folded evaluation path cannot serve this model (None: it can)."""
        from aurecog.models.renet_folded import unsupported_reason

        reason = unsupported_reason(self.backbone)
        if reason and self.eval_path == "folded":
            raise ValueError(f"renet.eval_path=folded: {reason}; use eval_path auto or batched")
        return reason

    def _fold_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in
                     (*self.backbone.parameters(), *self.backbone.buffers(), *self.graph.parameters(),
                      *self.graph.buffers()))

    def folded(self):
        """The :class:`~aurecog.models.renet_folded.FoldedResNet` of the current parameters: built on first use,
        kept until a parameter or buffer changes (training steps, ``load_state_dict``, ``.to()``)."""
        from aurecog.models.renet_folded import FoldedResNet

        key = self._fold_key()
        if self._folded_cache is None or self._folded_cache[0] != key:
            self._folded_cache = None  # free the old weights before building the new ones
            device = self.backbone.conv1.weight.device.type
            try:
                with torch.no_grad(), torch.autocast(device, enabled=False):  # full-precision folded weights
                    self.ctx.weights, self.ctx.stat_mix = self.graph(), self.stat_mix()
                    self._folded_cache = (key, FoldedResNet(self.backbone))
            finally:
                self.ctx.clear()
        return self._folded_cache[1]

    def predict_folded(self, x: Tensor) -> Tensor:
        """Evaluation with the folded network (exact rewrite, see :mod:`aurecog.models.renet_folded`): shared
        stem, every conditional BN folded into its convolution, per-AU passes over the batch."""
        if self.training:
            raise RuntimeError("predict_folded is an evaluation path: call model.eval() first")
        feats = self.folded()(x)  # B, C, D
        b, c = feats.shape[:2]
        cond = torch.arange(c, device=x.device)
        return self._assemble(self._read(self.head(feats.reshape(b * c, -1)), cond, b))

    def predict(self, x: Tensor) -> Tensor:
        """Evaluation logits for every AU, by ``renet.eval_path``: ``auto`` takes the folded path when the
        backbone supports it and autograd is off (its cached weights carry no gradient), else the batched pass."""
        use_folded = (self.eval_path != "batched" and self.fold_unsupported is None
                      and not torch.is_grad_enabled())
        return self.predict_folded(x) if use_folded else self.predict_batched(x)

    def train(self, mode: bool = True):
        if mode:
            self._folded_cache = None  # training changes the weights: free the folded copy now
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._folded_cache = None  # device / dtype moves
        return super()._apply(fn, *args, **kwargs)

    def predict_loop(self, x: Tensor) -> Tensor:
        """Reference: the paper's C separate passes, one per AU (same result as :meth:`predict_batched`)."""
        outs = []
        for c in range(self.num_conditions):
            index = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
            feat = self.features(x, index, single=c)
            outs.append(self._read(self.head(feat), torch.tensor([c], device=x.device), x.shape[0]))
        return self._assemble(torch.cat(outs, dim=1))

    # ------------------------------------------------------------------ API
    def forward(self, batch: dict) -> dict:
        if not self.training:
            return {"logits": self.predict(batch["image"])}
        x, y = self.duplicate(batch)
        if self.strategy == "random":
            c = self._draw_condition()
            index = torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)
            z = self._read(self.head(self.features(x, index, single=c)), torch.tensor([c], device=x.device),
                           x.shape[0])
            return {"logits": z[:, 0], "cond": c, "target": y, "mode": "random"}
        cond = self.train_conditions
        z = self.conditioned_logits(x, cond)  # B, k, o
        return {"logits": z, "cond": cond, "target": y, "mode": "all"}

    def _binary_target(self, y: Tensor, c: Tensor | int) -> Tensor:
        """Occurrence labels of condition(s) ``c`` (-1 unknown); one-vs-rest for expression."""
        if self.task.kind == "expression":
            cond = torch.as_tensor(c, device=y.device).reshape(-1)
            t = (y[:, None] == cond[None]).float()
            return torch.where((y >= 0)[:, None], t, torch.full_like(t, -1.0))
        return y[:, c]

    def compute_loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 6 (masked) for the conditioned AU(s), through :meth:`AUModel.supervised_loss` (mean over the known
        (sample, AU) entries; positives weighted when ``loss.pos_weight: balanced``)."""
        mode = out.get("mode")
        if mode is None:  # an eval-style output (B x C logits)
            return super().compute_loss(out, batch)
        y, z, kind = out["target"], out["logits"], self.task.kind
        cond = torch.as_tensor(out["cond"], device=z.device).reshape(-1)  # (k,) conditioned labels
        if mode == "random":
            z = z[:, None]  # B, 1, o
        if kind != "intensity":
            z = z.squeeze(-1)  # B, k
        if kind == "intensity":  # per-AU 6-level CE
            return self.supervised_loss(z, y[:, cond]), {}
        if kind == "expression":
            if self.expression_loss == "softmax":  # strategy 'all': CE over the K class outputs
                return self.supervised_loss(z, y), {}
            return self.supervised_loss(z, self._binary_target(y, cond), kind="au"), {}  # one-vs-rest Eq. 6
        return self.supervised_loss(z, y[:, cond], labels=cond), {}
