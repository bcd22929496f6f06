"""AC²D: adaptively constraining self-attention and causally deconfounding the sample (Shao et al., IJCV 2024,
arXiv 2410.01251; ``/work/shared/papers/001_d59e3c623a7acfb0.txt``; authors' code ``ZhiwenShao/AC2D`` as read in
``shared/notes/reference-implementations.md`` section 1).

Architecture (paper 3.1, Fig. 2; notes 1.1-1.3)
    simplified ResTv2-tiny: ConvStem (first 3x3 conv stride 1, second stride 2) -> stage 1 (n1 blocks, 1 head,
    spatial reduction 4) -> patch embedding -> stage 2 (n2 blocks, 2 heads, sr 2) = the *shared rich feature*
    (c x l/4 x l/4). Then one branch per AU: its own patch embedding + stage 3 (n3 blocks, 4 heads, sr 1) ->
    LayerNorm -> average pooling -> f^(j) in R^c -> causal intervention module -> 1-logit linear head.
    All widths are c = 64; every block is pre-norm EMSAv2 attention (with the upsample module of Eq. 2:
    depth-wise conv + pixel shuffle on V, layer-normed and added to A V before the output projection) + MLP
    (ratio 4); stochastic depth linearly 0 -> 0.1 over the n1 + n2 + n3 blocks.

    The m AU branches are computed as one batched network: every branch weight carries a leading AU dimension
    (linear layers are batched matmuls, convolutions are grouped convolutions, layer norms have per-branch
    affine parameters), activations are laid out (m, B, N, c). Branch j depends only on its own slice of every
    branch parameter (``tests/test_ac2d.py`` checks this with autograd).

Adaptive attention constraint (Eqs. 3-7; notes 1.4)
    Block n3 - 1 of every branch returns its attention weights A^(j) (heads x queries x keys, post-softmax).
    A^avg(j) is their mean over heads and queries (Eq. 6), a distribution over the l/8 x l/8 key grid. The
    ground truth (Eqs. 3-5) is a Gaussian (std ``sigma`` grid cells) around each of the AU's two sub-centres
    (:data:`AU_SUBCENTRES`, computed from 49-point landmarks after crop and flip), combined by max and normalised
    to sum 1. L_a is Eq. 7 (mean over the batch): sum_{j,s,t} (A^gt log A^gt - A^gt log A^avg) / (m (l/8)^2).
    This is the authors' effective reduction (their ``KLDivLoss(reduction='batchmean', size_average=True, ...)``
    falls back to an element-wise mean, notes 1.4.3), so lambda_a = 1.28e4 keeps its meaning.
    A^e (Table 8) constrains every channel (head, query) of A^(j) instead: the mean over channels of
    KL(A^gt || A^(j)_s).

    Grid coordinates: landmarks are in pixel-index units (pixel k covers [k - 1/2, k + 1/2]; a flip maps x to
    l - 1 - x, as in albumentations and the authors' ``land_transform``), so pixel x maps to grid coordinate
    (x + 1/2) l'/l - 1/2 (cell centres at integers). This keeps ground-truth maps exactly mirror-symmetric under
    a horizontal flip. The authors round floor(x l'/l + 1/2) (``util.render_gaussian_heatmap``), a shift of up to
    half a cell; ``attention.center: authors`` reproduces that.

Causal intervention per AU (Eqs. 8-13; notes 1.5)
    y^(j) = W_X f^(j) + W_Z E_z[g(z)], E_z[g(z)] = Softmax(Q K^T / sqrt(8c)) f_bar^(j) with Q = W_Q f^(j),
    K = W_K f_bar^(j) (:class:`aurecog.models.causal.PrototypeAttention`, one per AU, d_m = 8c). Eq. 12a averages
    the sample prototypes into ONE key, so the softmax is over a single element and is identically 1: E_z[g(z)]
    = f_bar^(j) and W_Q, W_K receive no gradient. We implement the equations as written (the projections are
    kept: they give the paper's parameter count, 74,880 per AU at c = 64) and say so here.
    Prototype f_bar^(j), against the paper's wording (Table 8 caption, 4.3): the paper says C^e(d) computes
    f_s^(j) "at each mini-batch during training" and C^e(s) "at the end of each training epoch" "using current
    model parameters". The authors' train.py (notes 1.5) accumulates the per-AU features of every training
    mini-batch and at the end of the epoch sets K = their mean, V = K / N (N = training-set size; P(z_s) = 1/N of
    Eq. 11); epoch 0 trains without the causal layer (``data_infos=None``, the feature goes straight to the head)
    and every later epoch, and the evaluation after it, uses the latest K/V. We follow the code:
      * C^e(d) (AC²D, ``causal.mode: branch_dynamic``): the mean of the previous training epoch's mini-batch
        features (a :class:`FeatureBank` filled by the training forwards), i.e. features computed "at each
        mini-batch", averaged once per epoch.
      * C^e(s) (``branch_static``): at the end of each training epoch a pass over every training sample with the
        current weights (eval mode) gives the mean (:meth:`AC2D._static_pass`), the paper's description.
      * C^s(d) (``shared_dynamic``): one module on the shared rich feature, applied token-wise, whose prototype
        is the previous epoch's mean feature map (one key per spatial position); branches then have no causal
        module.
    Schedule (all modes): epoch 0 runs without the causal layer, in training and validation. From epoch 1 on,
    training uses the prototype of the previous epoch (refreshed at ``on_train_epoch_start``) and the validation
    of epoch e the one of epoch e itself (refreshed at ``on_validation_epoch_start``; the authors' evaluation),
    which is also the one the checkpoint saved after that validation holds. Test uses the stored prototype, so
    predictions are independent of batch composition; a model that has never finished an epoch has none and
    runs without the causal layer, and a fit from epoch 0 drops a prototype copied from another model (DISFA
    from BP4D: the authors carry the network over, not its K/V). ``causal.value: prior`` (default) is the
    authors' V = f_bar / N; ``mean`` is Eq. 13's f_bar.

Loss (Eqs. 14-15)
    L_u: weighted BCE with w_j the normalised inverse occurrence rate and v_j = negatives / positives
    (:func:`aurecog.models.losses.ac2d_coefficients`), unknown labels masked; L = L_u + lambda_a L_a.
    Intensity (per-AU 6-level head) and expression (one branch per class) use the masked cross-entropy.

Expression tasks: one branch per class; the attention prior of a class is the max over the sub-centre
Gaussians of its prototypical AUs (:data:`EXPRESSION_PROTOTYPE_AUS`, EMFACS-style; e.g. happiness = AU6 + AU12).
``attention.expression_prior: false`` switches the constraint off for expression tasks. Outputs without any
sub-centre (e.g. neutral, or an AU absent from both tables) are left out of L_a (logged once).

Complexity (Table 6: 9.6G FLOPs, 3.6M parameters for 12 AUs at 176 x 176)
    :func:`complexity` counts parameters and multiply-accumulates (``FlopCounterMode`` flops / 2). This
    implementation has 3.63M parameters and about 4.5G MACs (= 9.0 GFLOPs at 2 FLOPs per MAC; FlopCounterMode
    does not count softmax/norm/activation element-wise operations). Table 6 therefore most likely counts two
    FLOPs per multiply-add; we report MACs and do not tune the architecture toward the FLOP figure.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from aurecog.data.landmarks import N_POINTS, to_intraface49
from aurecog.models.backbones import PretrainedUnavailable, loading_skipped, missing_file_message, resolve_file
from aurecog.models.base import AUModel
from aurecog.models.causal import FeatureBank, PrototypeAttention
from aurecog.models.losses import ac2d_coefficients
from aurecog.models.registry import register_family

log = logging.getLogger(__name__)

LN_EPS = 1e-6  # ResTv2 layer norms (notes 1.2)
INIT_STD = 0.02  # ResTv2 _init_weights: trunc_normal(std 0.02) for conv/linear weights
CAUSAL_DM_FACTOR = 8  # Eqs. 10, 12: W_Q, W_K, in R^{8c x c}; the authors' causal_dim = 512 = 8 * 64

#: AU sub-centres (paper Fig. 3; authors' ``util.prepare_coord``; notes 1.6). Per AU: the two 49-point IntraFace
#: landmark indices (0-based) and the vertical offset in units of the ruler r = |x22 - x25| (inner eye corners),
#: image y pointing down (negative = above the landmark).
AU_SUBCENTRES: dict[int, tuple[int, int, float]] = {
    1: (4, 5, -1 / 2),
    2: (1, 8, -1 / 3),
    4: (2, 7, 1 / 3),
    6: (24, 29, 1.0),
    7: (21, 26, 0.0),
    9: (15, 17, -1 / 2),
    10: (43, 45, 0.0),
    12: (31, 37, 0.0),
    14: (31, 37, 0.0),
    15: (31, 37, 0.0),
    17: (39, 41, 1 / 2),
    23: (34, 40, 0.0),
    24: (34, 40, 0.0),
    25: (34, 40, 0.0),
    26: (39, 41, 1 / 2),
}
#: Our choice for AUs the authors never used: the sub-centres of the AU with the nearest FACS region
#: (landmark semantics of notes 1.6). AU5 upper lid raiser / AU43 eyes closed / AU45 blink -> the upper-lid
#: points of AU7; AU11 nasolabial deepener -> AU10; AU13 cheek puffer, AU20 lip stretcher -> lip corners (AU12);
#: AU16 lower lip depressor -> lower-lip points of AU17 without the chin offset; AU18 lip pucker, AU22 lip funneler
#: -> lip centre (AU23); AU27 mouth stretch -> AU26.
AU_SUBCENTRE_PROXY: dict[int, tuple[int, int, float]] = {
    5: AU_SUBCENTRES[7],
    43: AU_SUBCENTRES[7],
    45: AU_SUBCENTRES[7],
    11: AU_SUBCENTRES[10],
    13: AU_SUBCENTRES[12],
    20: AU_SUBCENTRES[12],
    16: (39, 41, 0.0),
    18: AU_SUBCENTRES[23],
    22: AU_SUBCENTRES[23],
    27: AU_SUBCENTRES[26],
}
#: Prototypical AUs of the basic emotions (EMFACS-style, Ekman & Friesen), used as the attention prior of an
#: expression branch. Neutral has none (no attention constraint).
EXPRESSION_PROTOTYPE_AUS: dict[str, tuple[int, ...]] = {
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15),
    "fear": (1, 2, 4, 5, 20, 26),
    "happiness": (6, 12),
    "sadness": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "contempt": (12, 14),
    "neutral": (),
}
RULER = (22, 25)  # 49-point inner eye corners; r = |x22 - x25|
_LAYOUT_BY_POINTS = {n: name for name, n in N_POINTS.items()}


def au_number(name: str) -> int | None:
    s = str(name).upper().replace("AU", "").strip()
    return int(s) if s.isdigit() else None


def output_aus(names: list[str], kind: str) -> list[tuple[int, ...]]:
    """The AUs whose sub-centres define each output's attention prior."""
    if kind == "expression":
        return [tuple(EXPRESSION_PROTOTYPE_AUS.get(str(n).lower(), ())) for n in names]
    out = []
    for n in names:
        a = au_number(n)
        out.append((a,) if a is not None and (a in AU_SUBCENTRES or a in AU_SUBCENTRE_PROXY) else ())
    return out


def subcentre_table(names: list[str], kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(landmark index (P,), ruler offset (P,), output -> point index (C, K) padded with -1)."""
    per_out = output_aus(names, kind)
    idx, dy, rows = [], [], []
    for aus in per_out:
        row = []
        for a in aus:
            i1, i2, off = AU_SUBCENTRES.get(a) or AU_SUBCENTRE_PROXY[a]
            for i in (i1, i2):
                row.append(len(idx))
                idx.append(i)
                dy.append(off)
        rows.append(row)
    k = max([len(r) for r in rows] + [1])
    table = torch.full((len(rows), k), -1, dtype=torch.long)
    for j, r in enumerate(rows):
        table[j, : len(r)] = torch.tensor(r, dtype=torch.long)
    return torch.tensor(idx, dtype=torch.long), torch.tensor(dy, dtype=torch.float32), table


def landmarks49(landmarks: Tensor) -> Tensor:
    layout = _LAYOUT_BY_POINTS.get(landmarks.shape[-2])
    if layout is None:
        raise ValueError(f"cannot infer the landmark layout of {landmarks.shape[-2]} points")
    return to_intraface49(landmarks, layout)


def subcentres(landmarks: Tensor, lm_idx: Tensor, lm_dy: Tensor) -> Tensor:
    """Sub-centre pixel coordinates (B, P, 2) from landmarks (B, L, 2) of any supported layout."""
    lm = landmarks49(landmarks.float())
    ruler = (lm[:, RULER[0], 0] - lm[:, RULER[1], 0]).abs()  # B
    pts = lm[:, lm_idx.to(lm.device)].clone()  # B P 2
    pts[..., 1] = pts[..., 1] + lm_dy.to(lm.device) * ruler[:, None]
    return pts


def gaussian_attention_gt(points: Tensor, table: Tensor, image_size: int, grid: int, sigma: float,
                          center: str = "cell") -> tuple[Tensor, Tensor]:
    """Ground-truth attention (Eqs. 3-5): (B, C, grid*grid) rows summing to 1, and a (C,) mask of outputs that
    have sub-centres. ``points``: (B, P, 2) pixel (x, y) in the ``image_size`` input."""
    if center == "authors":
        g = torch.floor(points * (grid / image_size) + 0.5)
    elif center == "cell":
        g = (points + 0.5) * (grid / image_size) - 0.5
    else:
        raise ValueError(f"attention.center must be 'cell' or 'authors', got {center!r}")
    ax = torch.arange(grid, device=points.device, dtype=points.dtype)
    gx = torch.exp(-((ax[None, None, :] - g[..., 0:1]) ** 2) / (2 * sigma**2))  # B P G (columns, x)
    gy = torch.exp(-((ax[None, None, :] - g[..., 1:2]) ** 2) / (2 * sigma**2))  # B P G (rows, y)
    maps = gy[..., :, None] * gx[..., None, :]  # B P G G  (Eq. 3, row-major like the token order)
    valid = table >= 0  # C K
    tab = table.clamp_min(0).to(points.device)
    per_out = maps[:, tab]  # B C K G G
    per_out = per_out * valid.to(points.device)[None, :, :, None, None]
    combined = per_out.amax(2).flatten(2)  # Eq. 4: max over sub-centres
    has = valid.any(1).to(points.device)
    gt = combined / combined.sum(-1, keepdim=True).clamp_min(1e-30)  # Eq. 5
    return gt, has


def attention_kl(gt: Tensor, log_pred: Tensor, mask: Tensor | None = None) -> Tensor:
    """Eq. 7 averaged over the batch: sum_{j,cells} (gt log gt - gt log_pred) / (m * cells), with m the number of
    constrained outputs. ``gt``, ``log_pred``: (B, C, cells); ``mask``: (C,) bool."""
    kl = torch.xlogy(gt, gt) - gt * log_pred  # B C cells
    if mask is not None:
        kl = kl * mask[None, :, None]
        m = mask.sum().clamp_min(1)
    else:
        m = gt.shape[1]
    return kl.sum((1, 2)).mean() / (m * gt.shape[-1])


# ---------------------------------------------------------------------------------------------------------------
# Batched ("multi-branch") building blocks. Activations are (m, B, N, C); m = 1 for the shared trunk.
# ---------------------------------------------------------------------------------------------------------------
class BLinear(nn.Module):
    """m independent linear layers: (m, ..., in) -> (m, ..., out)."""

    def __init__(self, m: int, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(m, d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(m, d_out)) if bias else None
        trunc_normal_(self.weight, std=INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        m, shape = x.shape[0], x.shape[1:-1]
        x2 = x.reshape(m, -1, x.shape[-1])
        if self.bias is None:
            y = torch.bmm(x2, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias[:, None, :], x2, self.weight.transpose(1, 2))
        return y.reshape(m, *shape, -1)


class BLayerNorm(nn.Module):
    """m layer norms over the last dim with per-branch affine parameters."""

    def __init__(self, m: int, dim: int, eps: float = LN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(m, dim))
        self.bias = nn.Parameter(torch.zeros(m, dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        view = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return y * self.weight.view(view) + self.bias.view(view)


def to_maps(x: Tensor, h: int, w: int) -> Tensor:
    """(m, B, N, C) -> (B, m*C, h, w) (branch-major channels, for grouped convolutions)."""
    m, b, _, c = x.shape
    return x.permute(1, 0, 3, 2).reshape(b, m * c, h, w)


def to_tokens(x: Tensor, m: int) -> Tensor:
    """(B, m*C, h, w) -> (m, B, h*w, C)."""
    b, mc, h, w = x.shape
    return x.reshape(b, m, mc // m, h * w).permute(1, 0, 3, 2)


class BDropPath(nn.Module):
    """Stochastic depth drawn independently per branch and sample (separate DropPath modules in the authors' code)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[:2] + (1,) * (x.ndim - 2)).bernoulli_(keep)
        return x * mask / keep


class BPA(nn.Module):
    """Pixel attention x * sigmoid(dwconv3x3(x)) on branch-major maps."""

    def __init__(self, channels: int):
        super().__init__()
        self.pa_conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.pa_conv(x))


class ConvStem(nn.Module):
    """AC²D stem (notes 1.1): conv3x3 3->c/2 stride 1, BN, ReLU; conv3x3 c/2->c stride 2, BN, ReLU; conv1x1; PA; LN.
    Output (1, B, (l/2)^2, c)."""

    def __init__(self, in_ch: int, dim: int, first_stride: int = 1):
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_ch, half, 3, stride=first_stride, padding=1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, dim, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1))
        self.pos = BPA(dim)
        self.norm = BLayerNorm(1, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.pos(self.proj(x))
        h, w = x.shape[-2:]
        return self.norm(to_tokens(x, 1)), h, w


class BPatchEmbed(nn.Module):
    """ResTv2 PatchEmbed (conv k=3 s=2 p=1, PA, LN) for m branches. ``shared_input``: every branch reads the same
    (B, C_in, H, W) map (one conv with m*C_out outputs); otherwise the input is branch-major (B, m*C_in, H, W)."""

    def __init__(self, m: int, d_in: int, d_out: int, shared_input: bool):
        super().__init__()
        self.m = m
        self.proj = nn.Conv2d(d_in if shared_input else m * d_in, m * d_out, 3, stride=2, padding=1,
                              groups=1 if shared_input else m)
        self.pos = BPA(m * d_out)
        self.norm = BLayerNorm(m, d_out)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.pos(self.proj(x))
        h, w = x.shape[-2:]
        return self.norm(to_tokens(x, self.m)), h, w


class BAttention(nn.Module):
    """EMSAv2 (ResTv2 ``Attention``; paper Eqs. 1-2) for m branches.

    ``forward(x, h, w, stats)`` with ``stats`` in {None, 'avg', 'each'}: 'avg' also returns A^avg (Eq. 6), the
    mean of the attention weights over heads and queries, (m, B, N'); 'each' also returns the mean over heads
    and queries of log A (for the per-channel constraint of A^e-Net) and A^avg."""

    def __init__(self, m: int, dim: int, heads: int, sr: int):
        super().__init__()
        self.m, self.heads, self.sr = m, heads, sr
        self.scale = (dim // heads) ** -0.5
        self.q = BLinear(m, dim, dim)
        self.kv = BLinear(m, dim, 2 * dim)
        if sr > 1:
            self.sr_conv = nn.Conv2d(m * dim, m * dim, sr + 1, stride=sr, padding=sr // 2, groups=m * dim)
            self.sr_norm = BLayerNorm(m, dim)
        self.up = nn.Sequential(nn.Conv2d(m * dim, m * sr * sr * dim, 3, padding=1, groups=m * dim),
                                nn.PixelShuffle(sr))
        self.up_norm = BLayerNorm(m, dim)
        self.proj = BLinear(m, dim, dim)

    def forward(self, x: Tensor, h: int, w: int, stats: str | None = None, return_full: bool = False):
        m, b, n, c = x.shape
        nh, d = self.heads, c // self.heads
        q = self.q(x).reshape(m * b, n, nh, d).transpose(1, 2)  # mB h N d
        src, hs, ws = x, h, w
        if self.sr > 1:
            red = self.sr_conv(to_maps(x, h, w))
            hs, ws = red.shape[-2:]
            src = self.sr_norm(to_tokens(red, m))
        n2 = hs * ws
        kv = self.kv(src).reshape(m * b, n2, 2, nh, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # mB h N' d
        extra = None
        if stats is None and not return_full:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            attn = logits.softmax(-1)  # Eq. 1
            out = attn @ v
            avg = attn.mean((1, 2)).reshape(m, b, n2)  # Eq. 6: over heads and queries
            extra = {"avg": avg}
            if stats == "each":
                extra["mean_log"] = logits.log_softmax(-1).mean((1, 2)).reshape(m, b, n2)
            if return_full:
                extra["full"] = attn.reshape(m, b, nh, n, n2)
        out = out.transpose(1, 2).reshape(m, b, n, c)
        # upsample module on V (Eq. 2): V (mB, h, N', d) -> (B, m*C, h', w') -> dwconv -> pixel shuffle -> LN
        vmap = v.transpose(-1, -2).reshape(m, b, c, hs, ws).permute(1, 0, 2, 3, 4).reshape(b, m * c, hs, ws)
        up = self.up(vmap)
        up = self.up_norm(to_tokens(up, m))
        y = self.proj(out + up)
        return y, extra


class BBlock(nn.Module):
    """Pre-norm transformer block (ResTv2 ``Block``): x + DP(Attn(LN(x))), x + DP(MLP(LN(x)))."""

    def __init__(self, m: int, dim: int, heads: int, sr: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = BLayerNorm(m, dim)
        self.attn = BAttention(m, dim, heads, sr)
        self.norm2 = BLayerNorm(m, dim)
        self.fc1 = BLinear(m, dim, mlp_ratio * dim)
        self.fc2 = BLinear(m, mlp_ratio * dim, dim)
        self.drop_path = BDropPath(drop_path)

    def forward(self, x: Tensor, h: int, w: int, stats: str | None = None, return_full: bool = False):
        a, extra = self.attn(self.norm1(x), h, w, stats, return_full)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))
        return x, extra


class AC2DNet(nn.Module):
    """Simplified ResTv2 trunk + m batched AU branches (features only; heads/causal modules live in :class:`AC2D`).

    ``forward(image, stats)`` returns the shared map (B, c, l/4, l/4), branch features (m, B, c), the stage-3 grid
    size and the restrict block's attention statistics."""

    def __init__(self, m: int, width: int = 64, depths=(1, 6, 3), heads=(1, 2, 4), sr_ratios=(4, 2, 1),
                 mlp_ratio: int = 4, drop_path: float = 0.1, first_stride: int = 1, in_ch: int = 3,
                 restrict_block: int | None = None):
        super().__init__()
        self.m = m
        dpr = torch.linspace(0, drop_path, sum(depths)).tolist()
        n1, n2, n3 = depths
        self.stem = ConvStem(in_ch, width, first_stride)
        self.stage1 = nn.ModuleList([BBlock(1, width, heads[0], sr_ratios[0], mlp_ratio, dpr[i]) for i in range(n1)])
        self.patch2 = BPatchEmbed(1, width, width, shared_input=True)
        self.stage2 = nn.ModuleList([BBlock(1, width, heads[1], sr_ratios[1], mlp_ratio, dpr[n1 + i])
                                     for i in range(n2)])
        self.patch3 = BPatchEmbed(m, width, width, shared_input=True)
        self.stage3 = nn.ModuleList([BBlock(m, width, heads[2], sr_ratios[2], mlp_ratio, dpr[n1 + n2 + i])
                                     for i in range(n3)])
        self.norm = BLayerNorm(m, width)
        # the (n3 - 1)-th block of stage 3 (1-based), i.e. index n3 - 2 (paper 3.1; block 2 of 3 in the code)
        self.restrict_block = max(n3 - 2, 0) if restrict_block is None else restrict_block
        self.apply(_init_conv_bn)

    def trunk(self, image: Tensor) -> Tensor:
        x, h, w = self.stem(image)
        for blk in self.stage1:
            x, _ = blk(x, h, w)
        x, h, w = self.patch2(to_maps(x, h, w))
        for blk in self.stage2:
            x, _ = blk(x, h, w)
        return to_maps(x, h, w)  # B c l/4 l/4: the shared rich feature

    def branches(self, shared: Tensor, stats: str | None = None, return_full: bool = False):
        x, h, w = self.patch3(shared)
        extra = None
        for i, blk in enumerate(self.stage3):
            sel = i == self.restrict_block
            x, e = blk(x, h, w, stats if sel else None, return_full and sel)
            if sel:
                extra = e
        f = self.norm(x).mean(2)  # LN -> average pooling: (m, B, c)
        return f, h, extra


def load_pretrained_net(net: AC2DNet, path) -> None:
    """Initialise ``net`` (m branches) from a single-branch :class:`AC2DNet` state dict (``m = 1``; written by
    :mod:`aurecog.pretrain`, which trains one stage-3 branch for all AUs of ``synth-pretrain``).

    The stem and stages 1-2 are copied; every AU branch (stage-3 patch embedding, stage 3, final norm) starts as
    a copy of the one pretrained branch: its tensors are branch-major along dim 0 (batched linears and norms
    ``(m, ...)``, grouped convolutions ``(m * c, ...)``), so the branch's block is tiled m times. Why one branch
    for all: it works for any label set (12 BP4D AUs, 8 DISFA AUs, expressions), and the per-AU specialisation
    the paper's branches are for is then learnt in fine-tuning from a shared, already useful start. Every tensor
    of ``net`` must come from the file (same names, per-branch shapes), and nothing may be left over."""
    from aurecog.models.backbones import read_state_dict

    sd = read_state_dict(path)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    out, shape = {}, []
    for k, t in own.items():
        if k not in sd:
            continue
        s = sd[k]
        if any(k.startswith(p[len("net."):]) for p in AC2D.BRANCH_PREFIXES if p.startswith("net.")) and t.ndim:
            if s.shape[0] * net.m != t.shape[0] or s.shape[1:] != t.shape[1:]:
                shape.append(k)
                continue
            s = s.repeat(net.m, *([1] * (s.ndim - 1)))
        elif s.shape != t.shape:
            shape.append(k)
            continue
        out[k] = s.to(t.dtype)
    if missing or unexpected or shape:
        raise ValueError(f"{path}: does not fit the AC2D network ({len(missing)} missing, e.g. {missing[:3]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}; {len(shape)} of another shape, e.g. "
                         f"{shape[:3]}); ac2d.pretrained_file must be a one-branch AC2DNet state dict of the same "
                         "width/depths/heads (make pretrain)")
    net.load_state_dict(out)


def _init_conv_bn(mod: nn.Module) -> None:
    if isinstance(mod, nn.Conv2d):
        trunc_normal_(mod.weight, std=INIT_STD)
        if mod.bias is not None:
            nn.init.zeros_(mod.bias)
    elif isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
        nn.init.ones_(mod.weight)
        nn.init.zeros_(mod.bias)
    elif isinstance(mod, nn.Linear):
        trunc_normal_(mod.weight, std=INIT_STD)
        if mod.bias is not None:
            nn.init.zeros_(mod.bias)


CAUSAL_MODES = ("none", "branch_dynamic", "branch_static", "shared_dynamic")
ATTENTION_MODES = ("none", "avg", "each")


@register_family("ac2d")
class AC2D(AUModel):
    """AC²D and its Table 7/8 variants (``ac2d.attention.mode`` x ``ac2d.causal.mode``)."""

    #: per-AU parameters, for initialising from a model trained on another AU set (DISFA from BP4D, paper
    #: 4.1.3; :mod:`aurecog.models.transfer`): the AU branches (stage-3 patch embedding, stage 3, norm) and the
    #: heads are label-major along dim 0 (so are the prototypes of the per-branch causal modes, see
    #: :attr:`LABEL_BLOCK_PREFIXES`); the per-branch causal modules are a list by AU.
    BRANCH_PREFIXES = ("net.patch3.", "net.stage3.", "net.norm.", "head.")
    LABEL_LIST_PREFIXES = ("causal",)

    @property
    def LABEL_BLOCK_PREFIXES(self) -> tuple[str, ...]:  # noqa: N802 - the attribute name transfer.py reads
        per_branch = getattr(self, "causal_mode", "").startswith("branch")
        return self.BRANCH_PREFIXES + (("prototype",) if per_branch else ())

    # dotted config keys read (registry.check_config); Eq. 14 replaces the base loss, so no loss.pos_weight
    config_keys = (AUModel.config_keys - {"loss.pos_weight"}) | {
        f"ac2d.{k}" for k in ("width", "depths", "heads", "sr_ratios", "mlp_ratio", "drop_path", "first_stride",
                              "attention.mode", "attention.lambda", "attention.sigma", "attention.center",
                              "attention.expression_prior", "causal.mode", "causal.value", "causal.detach_prototype",
                              "pretrained_file")}

    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        a = cfg.get("ac2d", {})
        m = self.task.num_outputs
        self.width = int(a.get("width", 64))
        self.net = AC2DNet(m, self.width, tuple(a.get("depths", (1, 6, 3))), tuple(a.get("heads", (1, 2, 4))),
                           tuple(a.get("sr_ratios", (4, 2, 1))), int(a.get("mlp_ratio", 4)),
                           float(a.get("drop_path", 0.1)), int(a.get("first_stride", 1)))
        if a.get("pretrained_file") and not loading_skipped():
            path = resolve_file(a["pretrained_file"])
            if not path.is_file():
                raise PretrainedUnavailable(missing_file_message("ac2d.pretrained_file", path))
            load_pretrained_net(self.net, path)
            log.info("AC2D trunk and branches initialised from %s", path)
        att = a.get("attention", {}) or {}
        self.att_mode = att.get("mode", "avg")
        if self.att_mode not in ATTENTION_MODES:
            raise ValueError(f"ac2d.attention.mode must be one of {ATTENTION_MODES}")
        if self.task.kind == "expression" and not att.get("expression_prior", True):
            self.att_mode = "none"
        self.lambda_a = float(att.get("lambda", 1.28e4))
        self.sigma = float(att.get("sigma", 3.0))
        self.center = att.get("center", "cell")
        idx, dy, table = subcentre_table(self.task.names, self.task.kind)
        self.register_buffer("lm_idx", idx, persistent=False)
        self.register_buffer("lm_dy", dy, persistent=False)
        self.register_buffer("sub_table", table, persistent=False)
        missing = [n for n, ok in zip(self.task.names, (table >= 0).any(1).tolist()) if not ok]
        if missing and self.att_mode != "none":
            log.warning("AC2D: no AU sub-centres for %s; these outputs are left out of the attention loss", missing)

        c = a.get("causal", {}) or {}
        self.causal_mode = c.get("mode", "branch_dynamic")
        if self.causal_mode not in CAUSAL_MODES:
            raise ValueError(f"ac2d.causal.mode must be one of {CAUSAL_MODES}")
        self.causal_value = c.get("value", "prior")
        if self.causal_value not in ("prior", "mean"):
            raise ValueError(f"ac2d.causal.value must be 'prior' (authors: f_bar / N) or 'mean' (Eq. 13), "
                             f"got {self.causal_value!r}")
        if "detach_prototype" in c:
            raise ValueError("ac2d.causal.detach_prototype was removed: prototypes are epoch means (constants); "
                             "delete the key")
        d_m = CAUSAL_DM_FACTOR * self.width
        if self.causal_mode.startswith("branch"):
            self.causal = nn.ModuleList([PrototypeAttention(self.width, d_m, self.width) for _ in range(m)])
            self.causal.apply(_init_conv_bn)
            self.bank = FeatureBank(m, self.width)
            self.register_buffer("prototype", torch.zeros(m, self.width))
        elif self.causal_mode == "shared_dynamic":
            self.causal = PrototypeAttention(self.width, d_m, self.width)
            self.causal.apply(_init_conv_bn)
            side = shared_grid_size(int(cfg.get("data", {}).get("input_size", 176)), int(a.get("first_stride", 1)))
            self.bank = FeatureBank(1, side * side * self.width)
            self.register_buffer("prototype", torch.zeros(side * side, self.width))
        self.register_buffer("prototype_ready", torch.zeros((), dtype=torch.bool))
        self._static_step = -1  # global step of the last C^e(s) pass
        levels = self.task.levels if self.task.kind == "intensity" else 1
        self.head = BLinear(m, self.width, levels)
        if self.task.kind == "au":
            w, v = ac2d_coefficients(torch.tensor(self.stats.label_rate, dtype=torch.float32))
            self.register_buffer("au_weight", w, persistent=False)
            self.register_buffer("pos_weight", v, persistent=False)

    # ------------------------------------------------------------------ prototypes
    def _value_scale(self) -> float:
        return 1.0 / max(self.stats.n_train, 1) if self.causal_value == "prior" else 1.0

    def param_groups(self) -> list[dict]:
        """The base class's groups with the branch-batched LayerNorm gains (m, c) counted as norm gains: with
        ``optim.no_decay_norm_bias`` they are not decayed, as the authors' per-branch 1-d gains (ResT
        ``get_parameter_groups``: no decay on biases and 1-d parameters; 3,558,560 decayed elements for 12 AUs)."""
        groups = super().param_groups()
        if not self.cfg.get("optim", {}).get("no_decay_norm_bias", False):
            return groups
        gains = {id(mod.weight) for mod in self.modules() if isinstance(mod, BLayerNorm)}
        decay = [p for p in groups[0]["params"] if id(p) not in gains]
        moved = [p for p in groups[0]["params"] if id(p) in gains]
        no_decay = (groups[1]["params"] if len(groups) > 1 else []) + moved
        return [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])

    def _refresh_prototype(self) -> None:
        """Set the ``prototype`` buffer: the mean feature of the training epoch just finished (the bank filled by
        the training forwards), or for ``branch_static`` a pass over the training set with the current weights."""
        bank = getattr(self, "bank", None)
        if bank is None:
            return
        if self.causal_mode == "branch_static" and self._trainer is not None:
            if self.current_epoch < 1 or self._static_step == self.global_step:
                return  # nothing trained yet, or already computed with these weights
            bank.reset()
            self._static_pass()
            self._static_step = self.global_step
        if bank.counts.sum() == 0:
            return
        bank.sync()
        self.prototype.copy_(bank.means().reshape(self.prototype.shape))
        self.prototype_ready.fill_(True)
        bank.reset()

    @torch.no_grad()
    def _static_pass(self) -> None:
        """C^e(s): bank the eval-mode features of every training sample once (this rank's share under DDP), as the
        training transform presents them; in order, nothing dropped (unlike the shuffled training loader)."""
        from torch.utils.data import DataLoader

        dm = self.trainer.datamodule
        ds = dm.dataset("train")
        sampler = None
        if self.trainer.world_size > 1:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(ds, num_replicas=self.trainer.world_size,
                                                   rank=self.trainer.global_rank, shuffle=False)
        loader = DataLoader(ds, batch_size=dm.eval_batch_size, shuffle=False, sampler=sampler,
                            num_workers=dm.num_workers)
        was_training = self.training
        self.eval()
        try:
            for batch in loader:
                f, _, _ = self.net.branches(self.net.trunk(batch["image"].to(self.device)))
                m, b = f.shape[:2]
                self.bank.update(f.reshape(m * b, -1), torch.arange(m, device=f.device).repeat_interleave(b))
        finally:
            self.train(was_training)

    def on_train_start(self) -> None:
        """A fit from epoch 0 starts without the causal layer even when initialised from another model (DISFA from
        BP4D: the authors load the network, not its K/V, and their epoch 0 has ``data_infos=None``)."""
        super().on_train_start()
        if self.current_epoch == 0:
            self.prototype_ready.fill_(False)
            if getattr(self, "bank", None) is not None:
                self.bank.reset()

    def on_train_epoch_start(self) -> None:
        """A new epoch trains with the previous epoch's prototype (authors: K/V rebuilt after each epoch); if no
        validation has refreshed it yet (epoch 1, or no validation), refresh it now from the bank."""
        self._refresh_prototype()

    def on_validation_epoch_start(self) -> None:
        """From epoch 1 on (once the causal layer is in use) validation uses the latest prototype, that of the
        epoch just trained (authors' evaluation); the checkpoint saved after it holds that prototype. Epoch 0's
        validation, like its training, runs without the causal layer."""
        if bool(self.prototype_ready) and not (self._trainer is not None and self.trainer.sanity_checking):
            self._refresh_prototype()

    def _prototype(self) -> Tensor | None:
        """The prototype f_bar, per branch (m, c) or a shared map (N, c); None (no causal layer) until the first
        training epoch has finished (the authors' epoch 0 runs without it: ``data_infos=None``)."""
        return self.prototype if bool(self.prototype_ready) else None

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict, return_attention: bool = False) -> dict:
        image = batch["image"]
        stats = None
        if return_attention:
            stats = "avg"
        if self.att_mode != "none" and self.training:
            stats = self.att_mode
        shared = self.net.trunk(image)
        if self.causal_mode == "shared_dynamic":
            b, c, h, w = shared.shape
            tok = shared.flatten(2).transpose(1, 2)  # B N c
            proto = self._prototype()  # N c
            if self.training:
                self.bank.update(tok.detach().reshape(b, -1), torch.zeros(b, dtype=torch.long, device=tok.device))
            if proto is not None:
                keys = proto.to(tok.dtype)[None].expand(b, -1, -1).reshape(b * h * w, 1, c)
                y, _ = self.causal(tok.reshape(b * h * w, c), keys, keys * self._value_scale())
                shared = y.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        f, grid, extra = self.net.branches(shared, stats)
        out: dict = {"feature": f.transpose(0, 1), "grid": grid}
        if self.causal_mode.startswith("branch"):
            proto = self._prototype()  # m c
            if self.training and self.causal_mode == "branch_dynamic":
                m, b = f.shape[:2]
                groups = torch.arange(m, device=f.device).repeat_interleave(b)
                self.bank.update(f.detach().reshape(m * b, -1), groups)
            if proto is not None:
                proto, scale = proto.to(f.dtype), self._value_scale()
                f = torch.stack([mod(f[j], proto[j:j + 1], proto[j:j + 1] * scale)[0]
                                 for j, mod in enumerate(self.causal)])  # Eqs. 10-13
        logits = self.head(f)  # m B levels
        if self.task.kind == "intensity":
            out["logits"] = logits.permute(1, 0, 2)
        else:
            out["logits"] = logits[..., 0].transpose(0, 1)
        if extra is not None:
            out["attention"] = extra["avg"].transpose(0, 1)  # B m N'
            if "mean_log" in extra:
                out["attention_mean_log"] = extra["mean_log"].transpose(0, 1)
        return out

    # ------------------------------------------------------------------ loss
    def attention_target(self, batch: dict, grid: int) -> tuple[Tensor, Tensor]:
        pts = subcentres(batch["landmarks"], self.lm_idx, self.lm_dy)
        return gaussian_attention_gt(pts, self.sub_table, batch["image"].shape[-1], grid, self.sigma, self.center)

    def compute_loss(self, out: dict, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        kind = self.task.kind
        coefficients = {"au_weight": self.au_weight, "pos_coef": self.pos_weight} if kind == "au" else {}
        l_u = self.supervised_loss(out["logits"], batch["target"], **coefficients)  # Eq. 14 (au) or the task's CE
        parts = {"loss_au": l_u}
        loss = l_u
        if self.att_mode != "none" and "attention" in out:
            gt, has = self.attention_target(batch, out["grid"])
            if self.att_mode == "avg":
                log_pred = out["attention"].clamp_min(torch.finfo(out["attention"].dtype).tiny).log()
            else:  # A^e: mean over channels s of KL(gt || A_s) = sum gt log gt - sum gt * mean_s log A_s
                log_pred = out["attention_mean_log"]
            l_a = attention_kl(gt.float(), log_pred.float(), has)
            parts["loss_attention"] = l_a
            loss = loss + self.lambda_a * l_a  # Eq. 15
        return loss, parts


# ---------------------------------------------------------------------------------------------------------------
def complexity(num_aus: int = 12, image_size: int = 176, cfg: dict | None = None) -> dict:
    """Parameters and multiply-accumulates of the AC²D network for one image.

    MACs come from :class:`aurecog.models.complexity.FlopCounter` (FLOPs / 2), which counts attention with
    explicit formulas and fails on any uncounted compute-heavy op, so the figure is the same on every torch
    release (torch 2.14.1's own FlopCounterMode misses the CPU attention kernel and gives 2.2G instead of 4.5G).
    """
    from aurecog.models.complexity import FlopCounter
    from aurecog.tasks import TaskSpec, TrainStats

    names = [f"AU{a}" for a in (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24, 25, 26, 9)[:num_aus]]
    task = TaskSpec("au", names)
    stats = TrainStats(n_train=1, label_rate=[0.5] * num_aus, n_pos=[1] * num_aus, n_neg=[1] * num_aus,
                       label_corr=[[1.0]], subjects=["s"], subject_counts=[1])
    model = AC2D(task, stats, cfg or {"ac2d": {}}).eval()
    model.prototype_ready.fill_(True)  # count the causal modules (a fresh model skips them until epoch 1)
    params = sum(p.numel() for p in model.parameters())
    batch = {"image": torch.zeros(1, 3, image_size, image_size)}
    with torch.no_grad(), FlopCounter() as fc:
        model(batch)
    flops = fc.flops
    return {"params": params, "macs": flops / 2, "flops": flops,
            "params_trunk": sum(p.numel() for p in model.net.stem.parameters())
            + sum(p.numel() for p in model.net.stage1.parameters())
            + sum(p.numel() for p in model.net.patch2.parameters())
            + sum(p.numel() for p in model.net.stage2.parameters())}


def shared_grid_size(image_size: int, first_stride: int = 1) -> int:
    """Side of the shared rich feature map (l/4): 3x3 convs with padding 1 give ceil(n / stride)."""
    s = math.ceil(image_size / first_stride)
    s = math.ceil(s / 2)  # stem, second conv
    return math.ceil(s / 2)  # patch embedding 2


def grid_size(image_size: int, first_stride: int = 1) -> int:
    """Side of the stage-3 token grid (l/8), the grid of the ground-truth attention."""
    return math.ceil(shared_grid_size(image_size, first_stride) / 2)
