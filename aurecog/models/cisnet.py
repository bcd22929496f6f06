"""CISNet: Causal Intervention for Subject-deconfounded AU recognition (Chen et al., AAAI 2022).

Architecture (paper section 'CISNet Architecture', Fig. 3; authors' ``net/CISNet.py``)::

    image -> timm ResNet (global pooled) -> projector Linear(d_backbone -> d_in) = f_cur
          -> CIS:  y = W_X f_cur + W_S r_cur                                             (Eq. 3)
                   r_cur = sum_i alpha_i s_i P(s_i)                                       (Eq. 4)
                   alpha = softmax_i((W_Q f_cur)^T (W_K s_i) / sqrt(d_m))                (Eq. 5)
          -> classifier Linear(d_in -> 64) -> LeakyReLU -> Linear(64 -> C)

The projector exists in the authors' code (``projector = Linear(512 -> 512)``); its output is the feature f_cur
that the memory banks store (reference notes, section 4). For ResNet-50 it maps 2048 -> 512.

Confounder dictionary S = [s_1..s_N] (one prototype per training subject, or per source dataset when the task's
confounder is the dataset): during every training epoch each training sample's f_cur is accumulated per confounder
in a :class:`~aurecog.models.causal.FeatureBank`. When the next training epoch starts (``on_train_epoch_start``,
after the bank is all-reduced across DDP ranks) s_i = mean feature of confounder i over that epoch and P(s_i) = its
share of the epoch's training samples (the authors rebuild K_s, V_s, P_s after each epoch). S and P are buffers
(saved in checkpoints, used at validation/test) and the bank is reset.

Epoch schedule. "In the first epoch, we stop the back-propagation step to initialize our confounder dictionary"
(Implementation Details): the first ``bank_only_epochs`` (1) epochs only run the feature extractor (train mode,
no gradient) and fill the banks; ``training_step`` returns a constant then, which :meth:`CISNet.backward` does
not back-propagate; :meth:`CISNet.optimizer_step` leaves the optimiser alone (no weight decay, no momentum) and
:meth:`CISNet.lr_scheduler_step` holds the schedule (Lightning still counts those batches in ``global_step``).
Batch-norm running statistics do adapt in that epoch, as in the authors' code (their forward runs in train mode).
Every other step is the base class's (:meth:`AUModel.training_step`: logging; the Trainer clips and steps the
schedule). The LR schedule is sized by the steps actually taken (:meth:`CISNet.schedule_span`: the epochs after
the bank-only ones), so a cosine schedule ends at its final factor. Design choices documented here:

* Validation during a bank-only epoch is skipped: there is no dictionary yet and the model has had no update.
  The monitored metric is logged as :data:`BANK_ONLY_MONITOR_VALUE` (below every real score, finite so early
  stopping does not abort), so checkpoint selection never picks an untrained epoch.
* The dictionary is rebuilt when the next epoch starts, not at the end of an epoch: ModelCheckpoint saves at the
  end of the training epoch (after the module's ``on_train_epoch_end``), so the checkpoint of epoch e holds the
  dictionary that epoch e trained and validated with (built from epoch e-1). The last epoch's bank is unused.
* A forward before any dictionary exists (e.g. ``trainer.test`` on a fresh model) uses r_cur = 0.
* Confounders absent from the last epoch (possible only with ``limit_train_batches``) are left out of the
  attention rather than attended with a zero prototype.
* The bank is deliberately NOT a registered submodule: DDP (``broadcast_buffers=True``) copies rank 0's buffers
  to every rank before a grad-enabled forward, which would overwrite the other ranks' running sums.
  Unregistered, the bank is all-reduced only by :meth:`CISNet.build_dictionary`. It is moved to the feature
  device on use and reset every epoch, so nothing of it needs checkpointing.

``cis.enabled: false`` removes the CIS module (f_cur goes straight to the classifier) and the memory banks:
the 'w/o CIS' rows of Table 3, identical otherwise (network, loss, recipe), as in Ablation A2. They keep the
update-free first epoch (our choice, the paper does not say): both rows then take the same optimiser steps under
the same schedule, and the only difference left is the CIS module (without it, w/o CIS would take 15/14 as many
steps, a bias against CIS).

Loss: Eq. 6, L = -sum_i [(1 - mu_i) p_i log p^_i + mu_i (1 - p_i) log(1 - p^_i)], mu_i the AU's training
occurrence rate (``stats.label_rate``), unknown labels masked, averaged over known entries (``loss.reduction:
mean``, the authors' / (C N) normalisation). The authors' code passes the weights under a wrong keyword and so
trains unweighted; we implement the paper. ``loss.au_weighting: none`` drops Eq. 6's weights; only then may
``loss.pos_weight: balanced`` (the base class's imbalance-aware BCE) be set; with Eq. 6 on, it is refused.
Expression tasks: softmax head + cross-entropy; intensity: per-AU 6-level head + cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aurecog.models.backbones import create_backbone
from aurecog.models.base import AUModel
from aurecog.models.causal import FeatureBank, PrototypeAttention
from aurecog.models.heads import TaskHead
from aurecog.models.losses import cisnet_coefficients
from aurecog.models.registry import backbone_keys, register_family

# Paper, Implementation Details: "In the first epoch, we stop the back-propagation step to initialize our
# confounder dictionary".
PAPER_BANK_ONLY_EPOCHS = 1
AU_WEIGHTINGS = ("cisnet", "none")  # Eq. 6 coefficients, or none (then loss.pos_weight may apply)
# Logged for the monitored validation metric of a bank-only epoch: below any F1/accuracy (>= 0) and ICC (>= -1).
BANK_ONLY_MONITOR_VALUE = -1.0


@register_family("cisnet")
class CISNet(AUModel):
    # dotted config keys read (registry.check_config); Eq. 6 replaces the base loss, so no loss.pos_weight
    config_keys = (AUModel.config_keys - {"loss.pos_weight"}) | backbone_keys() | {
        "cis.feature_dim", "cis.enabled", "cis.d_m", "head.hidden", "head.dropout", "bank_only_epochs",
        "loss.reduction", "loss.au_weighting"}

    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        b = dict(cfg.get("backbone", {}))
        self.backbone, feat_dim = create_backbone(**b)
        c = cfg.get("cis", {})
        d_in = int(c.get("feature_dim", 512))
        self.projector = nn.Linear(feat_dim, d_in)
        # cis.enabled: false gives the 'w/o CIS' rows of Table 3: the same network, loss and recipe without the
        # CIS module (Ablation A2: the two models "only differ in terms of CIS module"); no memory banks then.
        self.use_cis = bool(c.get("enabled", True))
        self.cis = PrototypeAttention(d_in, int(c.get("d_m", 256)), d_in) if self.use_cis else None
        h = cfg.get("head", {})
        self.head = TaskHead(d_in, self.task, hidden=h.get("hidden", 64), dropout=h.get("dropout", 0.0))
        # w/o CIS keeps the update-free first epoch: the Table 3 pair takes the same steps and schedule
        self.bank_only_epochs = int(cfg.get("bank_only_epochs", PAPER_BANK_ONLY_EPOCHS))
        if self.use_cis and self.bank_only_epochs < 1:  # training needs a dictionary (W_Q/W_K grads for DDP)
            raise ValueError("CISNet: bank_only_epochs must be >= 1 (the first epoch builds the dictionary)")

        if self.stats.confounder == "subject":
            self.group_key, n_groups = "train_subject", self.stats.n_subjects
        elif self.stats.confounder == "dataset":
            self.group_key, n_groups = "confounder", self.stats.n_confounders
        else:
            raise ValueError(f"CISNet: unknown confounder kind {self.stats.confounder!r} (subject, dataset)")
        if n_groups < 1:
            raise ValueError("CISNet needs at least one training confounder (subject/dataset)")
        # Confounder dictionary (Eq. 4): prototypes s_i, priors P(s_i), and whether it has been built.
        self.register_buffer("prototypes", torch.zeros(n_groups, d_in))
        self.register_buffer("priors", torch.zeros(n_groups))
        self.register_buffer("dictionary_ready", torch.zeros((), dtype=torch.bool))
        self.bank = FeatureBank(n_groups, d_in)  # a plain object, not a module: DDP never broadcasts it

        loss_cfg = cfg.get("loss", {}) or {}
        self.loss_reduction = loss_cfg.get("reduction", "mean")
        weighting = loss_cfg.get("au_weighting", "cisnet")
        if weighting not in AU_WEIGHTINGS:
            raise ValueError(f"CISNet: loss.au_weighting={weighting!r}; use one of {AU_WEIGHTINGS}")
        if weighting == "cisnet" and loss_cfg.get("pos_weight") is not None:
            raise ValueError("CISNet: loss.pos_weight is not used with loss.au_weighting: cisnet (Eq. 6 weights "
                             "already); remove loss.pos_weight, or set loss.au_weighting=none to use it")
        if self.task.kind == "au" and weighting == "cisnet":
            pos, neg = cisnet_coefficients(torch.tensor(self.stats.label_rate, dtype=torch.float32))
        else:
            pos = neg = torch.ones(self.task.num_outputs)
        self.register_buffer("pos_coef", pos, persistent=False)
        self.register_buffer("neg_coef", neg, persistent=False)

    # ------------------------------------------------------------------ model
    def features(self, image: Tensor) -> Tensor:
        """f_cur: projected, globally pooled backbone feature (B, d_in); what the memory banks store."""
        return self.projector(self.backbone(image))

    def intervene(self, f: Tensor) -> tuple[Tensor, Tensor | None]:
        """CIS module, Eqs. 3-5: W_X f + W_S sum_i alpha_i P(s_i) s_i; attention (B, N') or None."""
        if self.cis is None:
            return f, None
        if not bool(self.dictionary_ready):
            return self.cis.w_x(f) + self.cis.w_s(torch.zeros_like(f)), None
        present = self.priors > 0
        keys, priors = self.prototypes[present], self.priors[present]
        return self.cis(f, keys, priors[:, None] * keys)

    def forward(self, batch: dict) -> dict:
        """Logits, f_cur and the CIS attention. In training mode f_cur is also banked per confounder."""
        f = self.features(batch["image"])
        if self.training and self.use_cis and self.group_key in batch:
            self.update_bank(f.detach(), batch[self.group_key])
        y, attn = self.intervene(f)
        return {"logits": self.head(y), "feature": f, "attention": attn}

    # ------------------------------------------------------------------ loss (Eq. 6)
    def compute_loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 6 (AU occurrence) or the task's cross-entropy, through the base class's :meth:`supervised_loss`."""
        logits, target = out["logits"], batch["target"]
        if self.task.kind != "au":
            return self.supervised_loss(logits, target), {}
        pos = self.balanced_pos_weight(logits)  # only with loss.au_weighting: none (refused otherwise)
        return self.supervised_loss(logits, target, pos_coef=self.pos_coef if pos is None else pos,
                                    neg_coef=self.neg_coef, reduction=self.loss_reduction), {}

    # ------------------------------------------------------------------ confounder dictionary
    def bank_only(self) -> bool:
        return self.current_epoch < self.bank_only_epochs

    @torch.no_grad()
    def update_bank(self, features: Tensor, groups: Tensor) -> None:
        if self.bank.sums.device != features.device:
            self.bank.to(features.device)
        self.bank.update(features, groups.to(features.device))

    @torch.no_grad()
    def build_dictionary(self) -> None:
        """s_i = mean banked feature, P(s_i) = sample share (all ranks' banks summed); then reset the bank."""
        self.bank.to(self.prototypes.device)
        self.bank.sync()
        if self.bank.counts.sum() > 0:
            self.prototypes.copy_(self.bank.means())
            self.priors.copy_(self.bank.priors())
            self.dictionary_ready.fill_(True)
        self.bank.reset()

    def on_train_epoch_start(self) -> None:
        """Build the dictionary from the previous epoch's bank (no-op at the start of training); see the module
        docstring for why this happens here and not at the end of that epoch."""
        if self.use_cis:
            self.build_dictionary()

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Bank-only epochs: fill the banks without gradient and return a constant zero (Lightning refuses a
        skipped step under DDP), which :meth:`backward` and :meth:`optimizer_step` then leave alone. Otherwise the
        base class's step (the forward banks f_cur)."""
        if self.bank_only():
            with torch.no_grad():
                f = self.features(batch["image"])
            if self.use_cis:
                self.update_bank(f, batch[self.group_key])
            return torch.zeros((), device=f.device)
        return super().training_step(batch, batch_idx)

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        if not self.bank_only():
            super().backward(loss, *args, **kwargs)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Bank-only epochs run the training step (the closure) without touching the optimiser, whatever it is.
        Lightning still counts these batches in ``global_step``; the schedule and the weights do not move."""
        if self.bank_only():
            if optimizer_closure is not None:
                optimizer_closure()
            return
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Hold the schedule during bank-only epochs (Lightning steps it after every batch, update or not)."""
        if not self.bank_only():
            super().lr_scheduler_step(scheduler, metric)

    def schedule_span(self) -> tuple[int, int]:
        """The steps and epochs after the bank-only ones: the schedule ends where training ends."""
        total, epochs = super().schedule_span()
        skip = min(self.bank_only_epochs, epochs - 1)
        return max(1, total - skip * (total // epochs)), epochs - skip

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self._skip_validation():
            return
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self._skip_validation():
            self.val_metrics.reset()
            if not self.trainer.sanity_checking:
                self.log(self.monitor, BANK_ONLY_MONITOR_VALUE, prog_bar=True)  # same args as the base
            return
        super().on_validation_epoch_end()

    def _skip_validation(self) -> bool:
        return self.trainer.state.fn == "fit" and self.bank_only() and not bool(self.dictionary_ready)
