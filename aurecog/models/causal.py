"""Causal-intervention building blocks shared by CISNet, AC2D and IERN's NWGM variant.

:class:`PrototypeAttention` is the backdoor-adjustment approximation both papers use (NWGM, attention over a
confounder dictionary):

    r(x) = sum_i softmax_i( (W_Q x)^T (W_K k_i) / sqrt(d_m) ) v_i          (CISNet Eqs. 4-5; AC2D Eqs. 10-12)
    y    = W_X x + W_S r(x)                                                  (CISNet Eq. 3; AC2D Eq. 13)

with keys k_i = the confounder prototypes s_i and values v_i = P(s_i) s_i (the prior-weighted prototypes).

:class:`FeatureBank` accumulates per-group feature sums and counts over an epoch (CISNet's subject memory
banks, AC2D's C^e(s) epoch prototypes, IERN's pre-computed confounder dictionary) and reduces them across DDP
ranks, so every rank ends the epoch with the same dictionary (it holds no module buffers, which DDP would
overwrite from rank 0).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn


class PrototypeAttention(nn.Module):
    """``forward(x, keys, values) -> (y, attention)``.

    x: (B, d_in); keys/values: (N, d_in) shared by the batch or (B, N, d_in) per sample. attention: (B, N),
    rows sum to 1. With a single key (N = 1) the softmax is identically 1 and r(x) = v_1 (the AC2D notes
    point this out); the projections are kept so the parameter count matches the paper.
    """

    def __init__(self, d_in: int, d_m: int, d_out: int | None = None):
        super().__init__()
        d_out = d_out or d_in
        self.d_m = d_m
        self.w_q = nn.Linear(d_in, d_m)
        self.w_k = nn.Linear(d_in, d_m)
        self.w_x = nn.Linear(d_in, d_out)
        self.w_s = nn.Linear(d_in, d_out)

    def context(self, x: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        q = self.w_q(x)  # B, d_m
        k = self.w_k(keys)  # (N | B N), d_m
        if k.ndim == 2:
            logits = q @ k.T
        else:
            logits = torch.einsum("bd,bnd->bn", q, k)
        attn = (logits / math.sqrt(self.d_m)).softmax(-1)
        r = attn @ values if values.ndim == 2 else torch.einsum("bn,bnd->bd", attn, values)
        return r, attn

    def forward(self, x: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        r, attn = self.context(x, keys, values)
        return self.w_x(x) + self.w_s(r), attn


class FeatureBank:
    """Per-group running sums of features; ``means()``/``priors()`` give the dictionary (S, P(S)).

    Deliberately *not* an ``nn.Module`` with buffers: DDP broadcasts module buffers from rank 0 at every forward
    pass, which would overwrite each rank's partial sums before :meth:`sync`. The bank is epoch-local scratch
    space; models copy the synced dictionary into their own buffers (which checkpoints keep). Its tensors follow
    the device of the features given to :meth:`update`. :meth:`sync` all-reduces across DDP ranks (call it once
    per epoch on every rank, before reading the dictionary).
    """

    def __init__(self, n_groups: int, dim: int):
        self.sums = torch.zeros(n_groups, dim, dtype=torch.float64)
        self.counts = torch.zeros(n_groups, dtype=torch.float64)

    def to(self, device) -> FeatureBank:
        self.sums, self.counts = self.sums.to(device), self.counts.to(device)
        return self

    @torch.no_grad()
    def update(self, features: Tensor, groups: Tensor) -> None:
        if self.sums.device != features.device:
            self.to(features.device)
        keep = groups >= 0
        if not keep.any():
            return
        g, f = groups[keep].long(), features[keep].detach().to(self.sums.dtype)
        self.sums.index_add_(0, g, f)
        self.counts.index_add_(0, g, torch.ones_like(g, dtype=self.counts.dtype))

    @torch.no_grad()
    def sync(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.counts)

    @torch.no_grad()
    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    def means(self) -> Tensor:
        return (self.sums / self.counts.clamp_min(1)[:, None]).float()

    def priors(self) -> Tensor:
        return (self.counts / self.counts.sum().clamp_min(1)).float()
