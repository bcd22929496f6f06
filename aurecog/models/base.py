"""The LightningModule every model derives from.

A subclass implements :meth:`AUModel.forward` (batch dict -> output dict holding at least ``logits``) and may
override :meth:`AUModel.compute_loss`, :meth:`AUModel.param_groups` and Lightning hooks. The base class owns
what must be identical across models for a fair comparison: the metrics (validation for model selection, test
for the leaderboard), per-sample prediction capture, the one supervised loss of each task
(:meth:`AUModel.supervised_loss`), in-batch duplication of rare-label positives, optimiser and schedule
construction from config.

Every class declares the dotted config keys it reads in ``config_keys`` (extending its parent's);
:func:`aurecog.models.registry.check_config` rejects any other key of a cell's config.

Logits by task kind: ``au`` B x C; ``intensity`` B x C x 6 (levels 0-5); ``expression`` B x K.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from aurecog.metrics import PerSubjectPCCSimilarity, TaskMetrics
from aurecog.models.backbones import no_pretrained
from aurecog.models.losses import intensity_scores, task_loss
from aurecog.tasks import TaskSpec, TrainStats

#: config keys read by the base class (optimiser, schedule, the supervised loss); the runner's common keys
#: (trainer.*, data.*, init.*, ...) come from configs/profiles/*.yaml, see aurecog.models.registry.allowed_keys
BASE_KEYS = frozenset({
    "optim.name", "optim.lr", "optim.lr_scale_batch", "optim.weight_decay", "optim.momentum", "optim.nesterov",
    "optim.betas", "optim.no_decay_norm_bias",
    "schedule.name", "schedule.warmup_epochs", "schedule.hold_epochs", "schedule.final_factor",
    "loss.pos_weight",
})
#: keys of the in-batch duplication of rare-label positives (RE-Net Table 8), for the classes that support it
DUPLICATE_KEYS = frozenset({"duplicate.enabled", "duplicate.aus", "duplicate.copies"})
POS_WEIGHT_MODES = (None, "balanced")


class PredictionCollector(Metric):
    """Per-sample test outputs, gathered across DDP ranks (cat states handle unequal per-rank counts)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("sample", "source", "subject", "scores", "target"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, sample: Tensor, source: Tensor, subject: Tensor, scores: Tensor, target: Tensor) -> None:
        self.sample.append(sample.long())
        self.source.append(source.long())
        self.subject.append(subject.long())
        self.scores.append(scores.detach().float())
        self.target.append(target.detach().float())

    def compute(self) -> dict[str, Tensor]:
        return {k: dim_zero_cat(getattr(self, k)).cpu() for k in ("sample", "source", "subject", "scores", "target")}


class AUModel(L.LightningModule):
    """Base class. ``task``/``stats`` may be given as dicts (that is how checkpoints store them)."""

    #: dotted config keys this class reads besides the runner's common keys (subclasses extend it)
    config_keys: frozenset[str] = BASE_KEYS

    def __init__(self, task: TaskSpec | dict, stats: TrainStats | dict, cfg: dict):
        super().__init__()
        self.task = task if isinstance(task, TaskSpec) else TaskSpec(**task)
        self.stats = stats if isinstance(stats, TrainStats) else TrainStats.from_dict(stats)
        self.cfg = cfg
        self.save_hyperparameters({"task": self.task.to_dict(), "stats": self.stats.to_dict(), "cfg": cfg})
        self.pos_weight_mode = (cfg.get("loss") or {}).get("pos_weight")
        if self.pos_weight_mode not in POS_WEIGHT_MODES:
            raise ValueError(f"loss.pos_weight must be one of {POS_WEIGHT_MODES}, got {self.pos_weight_mode!r}")
        names, thr = self.task.names, self.task.positive_threshold
        self.val_labels: list[int] | None = None  # validation over all labels; see set_validation_labels
        self.val_metrics = TaskMetrics(self.task.kind, names, thr)
        self.test_metrics = TaskMetrics(self.task.kind, names, thr)
        self.test_pcc = PerSubjectPCCSimilarity() if self.task.kind == "au" else None
        self.test_predictions = PredictionCollector()
        self.test_results: dict | None = None
        #: logged metric prefix of a test pass ("test"; "test_id" for a protocol's in-distribution test set)
        self.test_log_prefix = "test"

    @classmethod
    def load_from_checkpoint(cls, *args, **kwargs):
        """Lightning's, with the network built without ImageNet weights (the checkpoint's replace them)."""
        with no_pretrained():
            return super().load_from_checkpoint(*args, **kwargs)

    # ------------------------------------------------------------------ model API
    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Default: the task's loss (:meth:`supervised_loss`) on ``out["target"]`` (the batch after in-batch
        duplication) or the batch's targets. Models with a paper-specific loss override this."""
        return self.supervised_loss(out["logits"], out.get("target", batch["target"])), {}

    def supervised_loss(self, logits: Tensor, target: Tensor, labels: Tensor | None = None, kind: str | None = None,
                        **coefficients) -> Tensor:
        """The one supervised loss of every family, averaged over the known (``target >= 0``) entries:
        masked BCE for AU occurrence (``kind='au'``), 6-level cross-entropy per AU for intensity, cross-entropy
        for expression.

        ``labels`` (k,): which task labels the last logit dimension holds (RE-Net's conditioned AUs; default
        all). ``kind`` overrides the task kind (``'au'``: binary one-vs-rest targets of an expression task).
        ``coefficients``: ``au_weight``/``pos_coef``/``neg_coef`` of a paper's weighted BCE (CISNet Eq. 6, AC2D
        Eq. 14) and its ``reduction`` (:func:`aurecog.models.losses.weighted_bce`; CISNet's ``loss.reduction``);
        without ``pos_coef`` the positives are weighted by :meth:`balanced_pos_weight` when configured."""
        kind = kind or self.task.kind
        if kind == "au" and "pos_coef" not in coefficients:
            pos = self.balanced_pos_weight(logits)
            if pos is not None:
                coefficients["pos_coef"] = pos if labels is None else pos[labels]
        return task_loss(kind, logits, target, **coefficients)

    def balanced_pos_weight(self, like: Tensor) -> Tensor | None:
        """Per-AU positive weights (C,) of ``loss.pos_weight: balanced``: each AU's training negatives/positives
        ratio (the usual imbalance-aware BCE; AC2D Eq. 14's v_j without the per-AU weights w_j). None when the
        option is off or the task is not AU occurrence."""
        if self.task.kind != "au" or self.pos_weight_mode != "balanced":
            return None
        n_pos = torch.as_tensor(self.stats.n_pos, dtype=like.dtype, device=like.device)
        n_neg = torch.as_tensor(self.stats.n_neg, dtype=like.dtype, device=like.device)
        return n_neg / n_pos.clamp_min(1)

    # ------------------------------------------------------------------ rare-label duplication (RE-Net Table 8)
    def init_duplication(self, d: dict | None) -> None:
        """``duplicate``: frames with a positive label for one of ``aus`` are appended ``copies`` more times to
        their training batch (the in-batch form of RE-Net 4.6's "duplicate the AUs (AU1, AU2, AU15, AU23 and
        AU24) one time if a positive label is observed"). Listed AUs that are not labels of this task are
        skipped with a warning; none present is an error."""
        d = d or {}
        copies, enabled = int(d.get("copies", 1)), bool(d.get("enabled", False))
        self.dup_copies = copies if enabled else 0
        aus = list(d.get("aus") or [])
        names = self.task.names
        present = [a for a in aus if a in names]
        if self.dup_copies and not present:
            raise ValueError(f"duplicate.aus {aus} has no label of this task ({names}); set duplicate.aus")
        if self.dup_copies and len(present) < len(aus):
            import logging

            logging.getLogger(__name__).warning("duplicate.aus: %s are not labels of this task; duplicating %s",
                                                [a for a in aus if a not in names], present)
        self.register_buffer("rare", torch.tensor([names.index(a) for a in present], dtype=torch.long),
                             persistent=False)

    def positives(self, target: Tensor) -> Tensor:
        """B x C bool: positive labels (occurrence, intensity >= threshold, or the expression class)."""
        if self.task.kind == "expression":
            return F.one_hot(target.long().clamp_min(0), self.task.num_outputs).bool() & (target >= 0)[:, None]
        if self.task.kind == "intensity":
            return target >= self.task.positive_threshold
        return target > 0.5

    def duplicate(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(image, target) with the frames positive for a rare label appended ``copies`` more times."""
        x, y = batch["image"], batch["target"]
        if not getattr(self, "dup_copies", 0) or self.rare.numel() == 0:
            return x, y
        pos = self.positives(y)[:, self.rare].any(1)
        extra = torch.nonzero(pos).flatten().repeat(self.dup_copies)
        if extra.numel() == 0:
            return x, y
        idx = torch.cat([torch.arange(x.shape[0], device=x.device), extra])
        return x[idx], y[idx]

    def scores(self, out: dict) -> Tensor:
        """Probabilities (au), expected intensities (intensity) or class probabilities (expression)."""
        logits = out["logits"]
        if self.task.kind == "au":
            return torch.sigmoid(logits)
        if self.task.kind == "intensity":
            return intensity_scores(logits)
        return logits.softmax(-1)

    @property
    def monitor(self) -> str:
        return f"val/{self.val_metrics.monitor}"

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self(batch)
        loss, parts = self.compute_loss(out, batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def on_train_start(self) -> None:
        self.val_metrics.reset()  # discard the sanity check's state

    # ------------------------------------------------------------------ memory format (trainer.channels_last)
    @property
    def channels_last(self) -> bool:
        """``trainer.channels_last`` (resolved by the runner; ``auto`` is chosen by measurement there): weights
        and images in NHWC, which CPU and GPU convolution kernels run faster on for some models and machines."""
        return (self.cfg.get("trainer") or {}).get("channels_last") is True

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.channels_last and isinstance(batch, dict) and getattr(batch.get("image"), "ndim", 0) == 4:
            batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
        return batch

    def set_validation_labels(self, keep: list[int]) -> None:
        """Model selection and early stopping on the labels ``keep`` only (RE-Net Table 6: the withheld AU
        must not select the checkpoint). Test metrics stay over every label."""
        self.val_labels = list(keep)
        names = [self.task.names[i] for i in self.val_labels]
        self.val_metrics = TaskMetrics(self.task.kind, names, self.task.positive_threshold)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        s, t = self.scores(out), batch["target"]
        if self.val_labels is not None:
            s, t = s[:, self.val_labels], t[:, self.val_labels]
        self.val_metrics.update(s, t)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            mon = self.val_metrics.monitor
            self.log_dict({f"val/{k}": v for k, v in metrics.items() if k != mon})
            self.log(self.monitor, metrics[mon], prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        s = self.scores(out)
        self.test_metrics.update(s, batch["target"])
        if self.test_pcc is not None:
            self.test_pcc.update((s >= 0.5).float(), batch["target"], batch["subject"])
        self.test_predictions.update(batch["sample"], batch["source"], batch["subject"], s, batch["target"])

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metrics.compute()
        self.test_metrics.reset()
        pcc = self.test_pcc.compute() if self.test_pcc is not None else {}
        if self.test_pcc is not None:
            self.test_pcc.reset()
        preds = self.test_predictions.compute()
        self.test_predictions.reset()
        self.log_dict({f"{self.test_log_prefix}/{k}": v for k, v in metrics.items()})
        self.test_results = {"metrics": metrics, "pcc_similarity": pcc, "predictions": preds}

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.scores(self(batch))

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict]:
        """Parameter groups; by default biases and norm weights get no weight decay when
        ``optim.no_decay_norm_bias`` is set (the AdamW convention of ResT/AC2D). Override for lr multipliers."""
        decay, no_decay = [], []
        skip = bool(self.cfg.get("optim", {}).get("no_decay_norm_bias", False))
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if skip and (p.ndim <= 1 or name.endswith(".bias")) else decay).append(p)
        groups = [{"params": decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        return build_optimizer(self, self.param_groups(), self.cfg)

    def schedule_span(self) -> tuple[int, int]:
        """(optimiser steps, epochs) the per-step LR schedule is sized for: the trainer's estimate over all epochs.
        A model that takes no step in some epochs (CISNet's bank-only first epoch) overrides it."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 1000, 1
        return max(1, int(trainer.estimated_stepping_batches)), max(1, trainer.max_epochs or 1)


def build_optimizer(module: L.LightningModule, groups: list[dict], cfg: dict):
    """Optimiser + per-step LR schedule from ``cfg['optim']`` and ``cfg['schedule']``."""
    o = dict(cfg.get("optim", {}))
    name = o.get("name", "adamw").lower()
    lr = float(o.get("lr", 1e-3))
    if o.get("lr_scale_batch"):  # e.g. AC2D: lr = base_lr * batch / 256
        lr = lr * cfg.get("data", {}).get("batch_size", 256) / float(o["lr_scale_batch"])
    wd = float(o.get("weight_decay", 0.0))
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=float(o.get("momentum", 0.9)), weight_decay=wd,
                              nesterov=bool(o.get("nesterov", False)))
    elif name == "adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))), weight_decay=wd)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(o.get("betas", (0.9, 0.999))), weight_decay=wd)
    else:
        raise ValueError(f"unknown optimizer {name!r} (sgd, adam, adamw)")
    sched = build_schedule(opt, module, cfg.get("schedule", {}))
    if sched is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(name: str, step: int, warmup: int, hold: int, total: int, final: float = 0.0) -> float:
    """LR factor at optimiser step ``step``: linear warm-up from 0 over ``warmup`` steps, constant for ``hold``
    steps, then cosine or linear decay to ``final`` at ``total`` (IERN's authors' ``lr_policy='warmup'`` is
    ``linear`` with 5 warm-up and 15 hold epochs)."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    t = (step - warmup - hold) / max(1, total - warmup - hold)
    if name == "cosine":
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    if name == "linear":
        return final + (1 - final) * max(0.0, 1 - t)
    raise ValueError(f"unknown schedule {name!r} {SCHEDULES}")


def schedule_steps(module: L.LightningModule, s: dict) -> tuple[int, int, int]:
    """(warm-up, hold, total) optimiser steps of ``schedule.warmup_epochs``/``hold_epochs`` over the steps the
    module actually takes (:meth:`AUModel.schedule_span`; 1000 total steps without a trainer)."""
    total, epochs = module.schedule_span()
    warmup = int(round(float(s.get("warmup_epochs", 0)) * total / epochs))
    hold = int(round(float(s.get("hold_epochs", 0)) * total / epochs))
    return warmup, hold, total


def build_schedule(opt: torch.optim.Optimizer, module: L.LightningModule, s: dict):
    s = s or {}
    name = s.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} {SCHEDULES}")
    if name == "constant":
        return None
    warmup, hold, total = schedule_steps(module, s)
    final = float(s.get("final_factor", 0.0))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(name, step, warmup, hold, total, final))
