"""The LightningModule every model derives from.

A subclass implements :meth:`AUModel.forward` (batch dict -> output dict holding at least ``logits``) and may
override :meth:`AUModel.compute_loss`, :meth:`AUModel.param_groups` and Lightning hooks. The base class owns
what must be identical across models for a fair comparison: the metrics (validation for model selection, test
for the leaderboard), per-sample prediction capture, optimiser and schedule construction from config.

Logits by task kind: ``au`` B x C; ``intensity`` B x C x 6 (levels 0-5); ``expression`` B x K.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from aurecog.metrics import PerSubjectPCCSimilarity, TaskMetrics
from aurecog.models.backbones import no_pretrained
from aurecog.models.losses import intensity_scores, task_loss
from aurecog.tasks import TaskSpec, TrainStats


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

    def __init__(self, task: TaskSpec | dict, stats: TrainStats | dict, cfg: dict):
        super().__init__()
        self.task = task if isinstance(task, TaskSpec) else TaskSpec(**task)
        self.stats = stats if isinstance(stats, TrainStats) else TrainStats.from_dict(stats)
        self.cfg = cfg
        self.save_hyperparameters({"task": self.task.to_dict(), "stats": self.stats.to_dict(), "cfg": cfg})
        names, thr = self.task.names, self.task.positive_threshold
        self.val_metrics = TaskMetrics(self.task.kind, names, thr)
        self.test_metrics = TaskMetrics(self.task.kind, names, thr)
        self.test_pcc = PerSubjectPCCSimilarity() if self.task.kind == "au" else None
        self.test_predictions = PredictionCollector()
        self.test_results: dict | None = None

    @classmethod
    def load_from_checkpoint(cls, *args, **kwargs):
        """Lightning's, with the network built without ImageNet weights (the checkpoint's replace them)."""
        with no_pretrained():
            return super().load_from_checkpoint(*args, **kwargs)

    # ------------------------------------------------------------------ model API
    def forward(self, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def compute_loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Default: the task's loss (:meth:`supervised_loss`). Models override with their paper's loss."""
        return self.supervised_loss(out["logits"], batch["target"]), {}

    def supervised_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """The task's plain loss (masked BCE / CE), positives weighted by :meth:`balanced_pos_weight` for AU tasks."""
        pos = self.balanced_pos_weight(logits)
        return task_loss(self.task.kind, logits, target, **({} if pos is None else {"pos_coef": pos}))

    def balanced_pos_weight(self, like: Tensor) -> Tensor | None:
        """Per-AU positive weights (C,) of ``loss.pos_weight: balanced``: each AU's training negatives/positives
        ratio (the usual imbalance-aware BCE; AC2D Eq. 14's v_j without the per-AU weights w_j). None when the
        option is off or the task is not AU occurrence."""
        if self.task.kind != "au" or self.cfg.get("loss", {}).get("pos_weight") != "balanced":
            return None
        n_pos = torch.as_tensor(self.stats.n_pos, dtype=like.dtype, device=like.device)
        n_neg = torch.as_tensor(self.stats.n_neg, dtype=like.dtype, device=like.device)
        return n_neg / n_pos.clamp_min(1)

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

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        self.val_metrics.update(self.scores(out), batch["target"])

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
        self.log_dict({f"test/{k}": v for k, v in metrics.items()})
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


def build_schedule(opt: torch.optim.Optimizer, module: L.LightningModule, s: dict):
    name = (s or {}).get("name", "constant")
    if name == "constant":
        return None
    total, epochs = module.schedule_span()
    warmup = int(round(float(s.get("warmup_epochs", 0)) * total / epochs))
    final = float(s.get("final_factor", 0.0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        if name == "cosine":
            return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if name == "linear":
            return final + (1 - final) * max(0.0, 1 - t)
        raise ValueError(f"unknown schedule {name!r} (constant, cosine, linear)")

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
