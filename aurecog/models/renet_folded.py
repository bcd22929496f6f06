"""RE-Net's fast evaluation path: the C AU-conditioned passes of a timm ResNet, rewritten exactly for eval mode.

In evaluation every AU-conditional BN (renet.py, Eqs. 2-5 with running statistics) is a fixed per-AU affine map
x -> s_c * x + t_c. Two exact rewrites make conditioning on all C AUs cheaper than the paper's C full passes
(Sec. 4.7) and than one pass over the B*C expanded batch:

1. **BN folding.** A convolution followed by BN_c is one convolution with weights s_c * W (per output channel)
   and bias t_c. Every (conv, conditional BN) pair becomes C convolutions with their own weights, built once
   and cached by :class:`~aurecog.models.renet.RENet` until a parameter or buffer changes; the per-sample
   multiply-add of the expanded pass disappears.
2. **Shared stem.** The stem convolution precedes the first conditional BN, so it is computed once for all AUs.
   Its BN + ReLU + 3x3 max-pool is then applied *after* pooling: ReLU and x -> s*x + t are monotone (increasing
   for s >= 0, decreasing for s < 0, and float rounding is monotone too), so
   ``maxpool(relu(s*y + t)) = relu(s*maxpool(y) + t)`` for s >= 0 and ``relu(s*minpool(y) + t)`` for s < 0,
   exactly. The max- and min-pool of the shared map are taken once; each AU's first per-AU map is 4x smaller.

What remains per AU is every convolution after the stem: the arithmetic the conditioning costs (C times a
ResNet without its stem). The passes run AU by AU over the B samples, so memory is that of one plain pass,
plus the cached folded weights (C times the backbone's convolution weights: about 0.5 GB for a full ResNet-18
and 12 AUs).

Only the structure of timm's ResNet is supported (7x7 or deep stem ending in a conditional BN + ReLU, optional
3x3 max-pool, BasicBlock / Bottleneck stages without SE, anti-aliasing, drop-block or drop-path, downsample
``conv + BN``); :func:`unsupported_reason` says why another backbone is not, and the model then evaluates with the
expanded B*C pass. Gradients do not flow through the cached weights, so the model uses this path only when
autograd is off (``torch.no_grad`` / ``torch.inference_mode``, as in Lightning's validation and test loops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

from aurecog.models.renet import AUConditionalBatchNorm2d


def unsupported_reason(backbone: nn.Module) -> str | None:
    """None if :class:`FoldedResNet` reproduces ``backbone``'s conditioned passes, else the reason it cannot."""
    if not isinstance(backbone, ResNet):
        return f"{type(backbone).__name__} is not a timm ResNet"
    stem = list(backbone.conv1) if isinstance(backbone.conv1, nn.Sequential) else [backbone.conv1]
    if any(isinstance(m, AUConditionalBatchNorm2d) for m in stem):
        return "the stem has conditional BNs before its last one"
    if not all(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in stem):
        return "the stem has layers other than convolutions and ReLUs"
    if not isinstance(backbone.bn1, AUConditionalBatchNorm2d) or not isinstance(backbone.act1, nn.ReLU):
        return "the stem does not end in a conditional BN + ReLU"
    pool = backbone.maxpool
    if not isinstance(pool, nn.Identity) and not (
            isinstance(pool, nn.MaxPool2d) and not pool.ceil_mode and pool.dilation in (1, (1, 1))):
        return f"stem pooling {pool} is not a plain max-pool"
    for name, block in backbone.named_modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            if block.se is not None or block.drop_path is not None:
                return f"{name} has squeeze-excitation or drop-path"
            if any(not isinstance(getattr(block, a, nn.Identity()), nn.Identity) for a in ("drop_block", "aa")):
                return f"{name} has drop-block or anti-aliasing"
            acts = [block.act1, block.act2] + ([block.act3] if isinstance(block, Bottleneck) else [])
            if not all(isinstance(a, nn.ReLU) for a in acts):
                return f"{name} has activations other than ReLU"
            ds = block.downsample
            if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2
                                       and isinstance(ds[0], nn.Conv2d)
                                       and isinstance(ds[1], AUConditionalBatchNorm2d)):
                return f"{name}'s downsample is not conv + conditional BN"
    stages = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    if not all(isinstance(b, (BasicBlock, Bottleneck)) for s in stages for b in s):
        return "a stage holds blocks other than BasicBlock / Bottleneck"
    return None


@dataclass
class FoldedConv:
    """A convolution with the conditional BN after it folded in, for every AU: weight (C, F_out, F_in, k, k) and
    bias (C, F_out)."""

    weight: Tensor
    bias: Tensor
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int

    @classmethod
    def build(cls, conv: nn.Conv2d, bn: AUConditionalBatchNorm2d) -> FoldedConv:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot fold {conv}: only numeric zero padding is supported")
        scale, shift = bn.eval_affine()  # C, F_out
        weight = conv.weight[None] * scale[:, :, None, None, None]
        if conv.bias is not None:  # BN(conv(x) + b) = s * conv(x) + (s * b + t)
            shift = shift + scale * conv.bias
        return cls(weight.contiguous(), shift.contiguous(), conv.stride, conv.padding, conv.dilation, conv.groups)

    def __call__(self, x: Tensor, c: int) -> Tensor:
        return F.conv2d(x, self.weight[c], self.bias[c], self.stride, self.padding, self.dilation, self.groups)


class FoldedBlock:
    """A BasicBlock (conv-BN-ReLU, conv-BN) or Bottleneck (three convs) with its shortcut, per AU."""

    def __init__(self, block: BasicBlock | Bottleneck):
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if isinstance(block, Bottleneck):
            pairs.append((block.conv3, block.bn3))
        self.convs = [FoldedConv.build(conv, bn) for conv, bn in pairs]
        ds = block.downsample
        self.down = FoldedConv.build(ds[0], ds[1]) if ds is not None else None

    def __call__(self, x: Tensor, c: int) -> Tensor:
        h = x
        for i, conv in enumerate(self.convs):
            h = conv(h, c)
            if i < len(self.convs) - 1:
                h = torch.relu_(h)
        shortcut = self.down(x, c) if self.down is not None else x
        return torch.relu_(h.add_(shortcut))


class FoldedResNet:
    """The eval-mode conditioned passes of a timm ResNet whose BNs are AU-conditional (see the module docstring).

    Build it with the BNs' condition context holding the graph weights (and the unseen-AU statistics mix), as
    :meth:`~aurecog.models.renet.RENet.predict_folded` does; call it on images (B, 3, H, W) to get the features
    of every (sample, AU) pair, (B, C, D).
    """

    @torch.no_grad()
    def __init__(self, backbone: ResNet):
        reason = unsupported_reason(backbone)
        if reason:
            raise ValueError(f"cannot fold this backbone: {reason}")
        self.backbone = backbone
        self.stem_scale, self.stem_shift = (t[:, :, None, None].contiguous() for t in backbone.bn1.eval_affine())
        self.num_conditions = self.stem_scale.shape[0]
        self.negative = self.stem_scale < 0  # C, F, 1, 1: channels whose BN flips the order (min-pool)
        pool = backbone.maxpool
        self.pool = None if isinstance(pool, nn.Identity) else (pool.kernel_size, pool.stride, pool.padding)
        self.blocks = [FoldedBlock(b) for stage in (backbone.layer1, backbone.layer2, backbone.layer3,
                                                    backbone.layer4) for b in stage]

    def _stem_input(self, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """(max-pooled, min-pooled or None) shared stem map."""
        if self.pool is None:
            return y, None
        k, s, p = self.pool
        high = F.max_pool2d(y, k, s, p)
        low = -F.max_pool2d(-y, k, s, p) if bool(self.negative.any()) else None
        return high, low

    def __call__(self, x: Tensor) -> Tensor:
        bb = self.backbone
        y = bb.conv1(x)  # shared: everything before the first conditional BN is AU-independent
        high, low = self._stem_input(y)
        feats = []
        for c in range(self.num_conditions):
            z = high if low is None else torch.where(self.negative[c], low, high)
            z = torch.relu_(torch.addcmul(self.stem_shift[c], z, self.stem_scale[c]))
            for block in self.blocks:
                z = block(z, c)
            feats.append(bb.forward_head(z))
        return torch.stack(feats, dim=1)

    def nbytes(self) -> int:
        """Memory held by the folded weights."""
        tensors = [t for b in self.blocks for conv in [*b.convs, b.down] if conv is not None
                   for t in (conv.weight, conv.bias)]
        return sum(t.numel() * t.element_size() for t in tensors)
