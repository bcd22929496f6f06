"""Losses shared by the models. Unknown labels (-1) are always masked out.

The AU losses of CISNet (Eq. 6) and AC2D (Eq. 14) are both instances of one weighted binary cross-entropy

    l_j = - w_j [ a_j p_j log s(x_j) + b_j (1 - p_j) log(1 - s(x_j)) ]

* CISNet Eq. 6: w_j = 1, a_j = 1 - mu_j, b_j = mu_j with mu_j the AU's training occurrence rate
  (:func:`cisnet_coefficients`).
* AC2D Eq. 14: w_j = (N / N_occ(j)) / sum_s (N / N_occ(s)) (times m in the authors' code so the weights
  average 1), a_j = v_j = (N - N_occ(j)) / N_occ(j), b_j = 1 (:func:`ac2d_coefficients`).
* plain BCE: w = a = b = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

UNKNOWN = -1
RATE_EPS = 1e-6  # guards an AU that never (or always) occurs in the training labels


def weighted_bce(
    logits: Tensor,
    target: Tensor,
    au_weight: Tensor | None = None,
    pos_coef: Tensor | None = None,
    neg_coef: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Masked weighted BCE on logits (B, C); entries with ``target < 0`` contribute nothing.

    ``reduction="mean"`` averages over known entries; ``"sum_au_mean_batch"`` sums over AUs and averages over
    the batch (the form of Eq. 6/14 written per sample).
    """
    known = target >= 0
    t = target.clamp_min(0).to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    a = pos_coef if pos_coef is not None else 1.0
    b = neg_coef if neg_coef is not None else 1.0
    loss = -(a * t * log_p + b * (1 - t) * log_not_p)
    if au_weight is not None:
        loss = loss * au_weight
    loss = loss * known
    if reduction == "mean":
        return loss.sum() / known.sum().clamp_min(1)
    if reduction == "sum_au_mean_batch":
        return loss.sum() / max(logits.shape[0], 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def cisnet_coefficients(au_rate: Tensor) -> tuple[Tensor, Tensor]:
    """(pos_coef, neg_coef) = (1 - mu, mu) of CISNet Eq. 6."""
    mu = au_rate.clamp(RATE_EPS, 1 - RATE_EPS)
    return 1 - mu, mu


def ac2d_coefficients(au_rate: Tensor) -> tuple[Tensor, Tensor]:
    """(w, v) of AC2D Eq. 14 from occurrence rates r_j = N_occ(j)/N.

    w_j = (1/r_j) / sum_s (1/r_s) * m (normalised to mean 1 as in the authors' write_AU_weight.py),
    v_j = (1 - r_j) / r_j (negatives over positives).
    """
    r = au_rate.clamp(RATE_EPS, 1 - RATE_EPS)
    inv = 1.0 / r
    w = inv / inv.sum() * r.numel()
    v = (1 - r) / r
    return w, v


def masked_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy over classes (last dim of ``logits``) ignoring ``target < 0``; 0 when nothing is known."""
    target = target.long()
    if (target >= 0).sum() == 0:
        return logits.sum() * 0.0
    flat_logits = logits.reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat_logits, target.reshape(-1), weight=weight, ignore_index=UNKNOWN)


def task_loss(kind: str, logits: Tensor, target: Tensor, **bce_kwargs) -> Tensor:
    """Default loss of a task: masked (weighted) BCE for ``au``, per-AU 6-level CE for ``intensity``
    (logits B x C x L), CE for ``expression``."""
    if kind == "au":
        return weighted_bce(logits, target, **bce_kwargs)
    if kind in ("intensity", "expression"):
        return masked_cross_entropy(logits, target)
    raise ValueError(f"unknown task kind {kind!r}")


def intensity_scores(logits: Tensor) -> Tensor:
    """Expected intensity sum_l l * softmax(logits)_l from (B, C, L) level logits."""
    levels = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return (logits.softmax(-1) * levels).sum(-1)
