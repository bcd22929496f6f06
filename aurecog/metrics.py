"""Evaluation metrics, built on torchmetrics so that they reduce correctly under DDP.

* AU occurrence: per-AU F1 on the positive class at threshold 0.5 and its unweighted mean; per-AU accuracy.
  Unknown labels (-1) are excluded per AU (``ignore_index``), as JAA-Net and ME-GraphAU do.
* AU intensity: ICC(3,1) (Shrout & Fleiss 1979, "two-way mixed, consistency, single rater") and MAE per AU.
* Expression: per-class accuracy (recall) and its mean, plus overall accuracy.
* CISNet Fig. 5 analysis: per test subject, the cosine similarity between the AU Pearson-correlation matrix
  of the predictions and that of the ground truth (:func:`pcc_similarity`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAccuracy,
    MultilabelF1Score,
)
from torchmetrics.utilities import dim_zero_cat

UNKNOWN = -1
AU_THRESHOLD = 0.5  # frame-based F1 at probability 0.5 (notes A.11; all four papers)


def icc31_ratings(x: Tensor) -> Tensor:
    """ICC(3,1) of an (N targets, k raters[, C]) table: (BMS - EMS) / (BMS + (k - 1) EMS).

    Shrout & Fleiss (1979), "two-way mixed, consistency, single rater": BMS is the between-targets mean square
    and EMS the residual mean square of the two-way ANOVA. Returns 0 where the denominator vanishes.
    """
    x = x.double()
    if x.ndim == 2:
        x = x[:, :, None]
    n, k = x.shape[0], x.shape[1]
    if n < 2:
        return torch.zeros(x.shape[2], dtype=torch.float64)
    grand = x.mean(dim=(0, 1))  # C
    ss_rows = k * ((x.mean(dim=1) - grand) ** 2).sum(0)
    ss_cols = n * ((x.mean(dim=0) - grand) ** 2).sum(0)
    ss_total = ((x - grand) ** 2).sum(dim=(0, 1))
    ss_err = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    denom = bms + (k - 1) * ems
    return torch.where(denom > 0, (bms - ems) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def icc31(pred: Tensor, target: Tensor) -> Tensor:
    """ICC(3,1) per column between predictions and labels, (N,) or (N, C): the two 'raters' of the AU
    intensity literature (FERA, RE-Net Table 4)."""
    if pred.ndim == 1:
        pred, target = pred[:, None], target[:, None]
    return icc31_ratings(torch.stack([pred, target], dim=1))


class MaskedIntensity(Metric):
    """ICC(3,1) and MAE per AU over samples whose intensity label is known (target >= 0)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_labels: int, **kwargs):
        super().__init__(**kwargs)
        self.num_labels = num_labels
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().float())

    def compute(self) -> dict[str, Tensor]:
        preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        icc, mae = [], []
        for c in range(self.num_labels):
            known = target[:, c] >= 0
            p, t = preds[known, c], target[known, c]
            icc.append(icc31(p, t)[0].float() if known.sum() > 1 else torch.tensor(0.0))
            mae.append((p - t).abs().mean() if known.any() else torch.tensor(float("nan")))
        return {"icc": torch.stack(icc), "mae": torch.stack(mae)}


def pearson_matrix(x: Tensor) -> Tensor:
    """C x C Pearson correlation of the columns of an (N, C) tensor; constant columns correlate 0."""
    x = x.double() - x.double().mean(0, keepdim=True)
    cov = x.T @ x
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = std[:, None] * std[None, :]
    return torch.where(denom > 0, cov / denom.clamp_min(1e-12), torch.zeros_like(cov))


def pcc_similarity(preds: Tensor, target: Tensor, known: Tensor | None = None) -> Tensor:
    """Cosine similarity between the AU correlation matrices of binary predictions and labels (CISNet Fig. 5).

    Rows with any unknown label are left out. Returns NaN when either matrix is all zeros.
    """
    if known is not None:
        keep = known.all(dim=1)
        preds, target = preds[keep], target[keep]
    a, b = pearson_matrix(preds).flatten(), pearson_matrix(target).flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return (a @ b) / (na * nb)


class PerSubjectPCCSimilarity(Metric):
    """Collects binary predictions, labels and subject ids; computes :func:`pcc_similarity` per subject."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("subject", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, subject: Tensor) -> None:
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().float())
        self.subject.append(subject.detach().long())

    def compute(self) -> dict[int, float]:
        preds, target, subject = dim_zero_cat(self.preds), dim_zero_cat(self.target), dim_zero_cat(self.subject)
        out = {}
        for s in torch.unique(subject).tolist():
            m = subject == s
            out[int(s)] = float(pcc_similarity(preds[m], target[m].clamp_min(0), known=target[m] >= 0))
        return out


class TaskMetrics(nn.Module):
    """The metric set of one task kind; ``update(scores, batch)`` then ``compute() -> {name: float}``.

    ``scores`` are what :meth:`aurecog.models.base.AUModel.scores` returns: probabilities (B, C) for ``au``,
    expected intensities (B, C) for ``intensity``, class probabilities (B, K) for ``expression``.
    Keys: ``f1`` (mean), ``f1/<AU>``, ``acc``, ``acc/<AU>``; ``icc``, ``mae`` and per-AU; for expression
    ``acc`` (mean per-class accuracy), ``acc/<class>``, ``acc_overall``.
    """

    def __init__(self, kind: str, names: list[str], positive_threshold: float = 2.0):
        super().__init__()
        self.kind, self.names = kind, list(names)
        self.positive_threshold = positive_threshold
        c = len(names)
        if kind == "au":
            self.f1 = MultilabelF1Score(c, threshold=AU_THRESHOLD, average=None, ignore_index=UNKNOWN)
            self.acc = MultilabelAccuracy(c, threshold=AU_THRESHOLD, average=None, ignore_index=UNKNOWN)
        elif kind == "intensity":
            self.intensity = MaskedIntensity(c)
            # occurrence F1 derived from intensity >= threshold on both sides
            self.f1 = MultilabelF1Score(c, threshold=0.5, average=None, ignore_index=UNKNOWN)
        elif kind == "expression":
            self.acc = MulticlassAccuracy(c, average=None, ignore_index=UNKNOWN)
            self.acc_overall = MulticlassAccuracy(c, average="micro", ignore_index=UNKNOWN)
        else:
            raise ValueError(f"unknown task kind {kind!r}")

    @property
    def monitor(self) -> str:
        return {"au": "f1", "intensity": "icc", "expression": "acc"}[self.kind]

    def update(self, scores: Tensor, target: Tensor) -> None:
        if self.kind == "au":
            t = target.long()
            self.f1.update(scores, t)
            self.acc.update(scores, t)
        elif self.kind == "intensity":
            self.intensity.update(scores, target)
            present = (target >= self.positive_threshold).float()
            occ_t = torch.where(target < 0, torch.full_like(target, UNKNOWN), present)
            self.f1.update((scores >= self.positive_threshold).float(), occ_t.long())
        else:
            self.acc.update(scores, target.long())
            self.acc_overall.update(scores, target.long())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}

        def per_label(key: str, values: Tensor) -> None:
            out[key] = float(torch.nanmean(values.float()))
            for name, v in zip(self.names, values.tolist()):
                out[f"{key}/{name}"] = float(v)

        if self.kind == "au":
            per_label("f1", self.f1.compute())
            per_label("acc", self.acc.compute())
        elif self.kind == "intensity":
            r = self.intensity.compute()
            per_label("icc", r["icc"])
            per_label("mae", r["mae"])
            per_label("f1", self.f1.compute())
        else:
            per_label("acc", self.acc.compute())
            out["acc_overall"] = float(self.acc_overall.compute())
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()
