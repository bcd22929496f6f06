"""Parameter and multiply-accumulate (MAC) counts that do not depend on which torch release counts them.

``torch.utils.flop_counter.FlopCounterMode`` only counts the ops in its registry, and the registry changes
between releases: torch 2.14.1 has no entry for the CPU kernel of ``scaled_dot_product_attention``
(``aten._scaled_dot_product_flash_attention_for_cpu``, added in 2.15), so AC²D's attention silently counted
zero there (2.20G instead of 4.48G MACs at 176 x 176). Other ops are uncounted in every release
(``mv``, ``dot``, ``addbmm``, the eval fast paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``,
the fused RNN kernels, ``cdist``).

:class:`FlopCounter` therefore

1. adds explicit formulas (:data:`FORMULAS`) for attention (every ``scaled_dot_product_attention`` kernel, forward
   and backward, and ``_native_multi_head_attention``) and for the matrix-vector products, overriding torch's own
   attention formulas so the count is the same whatever the release ships; and
2. watches every op that actually executes under the counter (below the counter's own decompositions) and
   raises :class:`UncountedOpError` when a compute-heavy op (:data:`HEAVY_OPS`, or a name matching
   :data:`HEAVY_NAME`) ran without a formula.

Convention (torch's): one multiply-add = 2 FLOPs, so MACs = FLOPs / 2; element-wise ops, norms, softmax and
pooling are not counted (they are not in torch's registry in any release, and papers' MAC figures omit them).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


class UncountedOpError(RuntimeError):
    """A compute-heavy op executed under :class:`FlopCounter` that no FLOP formula covers."""


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


# ------------------------------------------------------------------------------------------------- formulas
# Each formula receives the op's arguments with tensors replaced by their shapes (FlopCounterMode's
# ``custom_mapping`` convention) and returns FLOPs (2 per multiply-add).


def attention_flops(q: tuple, k: tuple, v: tuple) -> int:
    """Forward attention, the two matrix products: Q K^T (L x E by E x S) and P V (L x S by S x Ev), per
    batch x query head (keys/values may have fewer heads, as in grouped-query attention)."""
    *_, length, e = q
    *_, s, ev = v
    return 2 * _prod(q[:-2]) * length * s * (e + ev)


def attention_backward_flops(grad_out: tuple, q: tuple, k: tuple, v: tuple) -> int:
    """Backward attention of a fused kernel, five matrix products: the recomputed scores S = Q K^T (fused
    kernels keep no L x S matrix), dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q; the same convention as
    torch's own formula for the CUDA kernels (and as torch 2.15's for the CPU one)."""
    *_, length, e = q
    *_, s, ev = v
    return 2 * _prod(q[:-2]) * length * s * (3 * e + 2 * ev)


def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query, key, value)


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return attention_backward_flops(grad_out, query, key, value)


def _native_mha(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s eval fast path: q/k/v projections, attention over all heads, out projection."""
    e = int(embed_dim)
    lead_q, lead_k = _prod(query[:-1]), _prod(key[:-1])  # (batch x) target / source length
    proj = 2 * lead_q * e * e + 2 * 2 * lead_k * e * e + 2 * lead_q * e * e
    batch = _prod(query[:-2]) if len(query) > 2 else 1
    return proj + 2 * batch * query[-2] * key[-2] * 2 * e


def _mv(a, x, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1]


def _addmv(bias, a, x, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1]


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _addbmm(bias, b1, b2, *args, out_shape=None, **kwargs) -> int:
    n, m, k = b1
    return 2 * n * m * k * b2[-1]


_SDPA_FORWARD = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")
_SDPA_BACKWARD = tuple(name + "_backward" for name in _SDPA_FORWARD)


def _ops(names) -> list:
    """The overload packets of the named aten ops that exist in this torch release."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


#: Formulas added to (and, for attention, overriding) torch's registry; keys are aten overload packets.
FORMULAS: dict[Any, Any] = {
    **{op: _sdpa for op in _ops(_SDPA_FORWARD)},
    **{op: _sdpa_backward for op in _ops(_SDPA_BACKWARD)},
    **{op: f for op, f in zip(_ops(["_native_multi_head_attention"]), [_native_mha])},
    **{op: f for name, f in (("mv", _mv), ("addmv", _addmv), ("dot", _dot), ("vdot", _dot), ("addbmm", _addbmm))
       for op in _ops([name])},
}

#: Ops whose cost grows like a matrix product, convolution or attention (names of aten ops; the ones a release
#: lacks are skipped). Executing one that neither torch's registry nor :data:`FORMULAS` covers is an error.
HEAVY_OP_NAMES = (
    # matrix products
    "mm", "addmm", "_addmm_activation", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul",
    "_scaled_mm", "_int_mm", "_weight_int8pack_mm", "_weight_int4pack_mm", "mkldnn_linear", "_sparse_mm",
    "_cdist_forward", "_cdist_backward", "_fused_linear_with_bias",
    # convolutions
    "convolution", "_convolution", "convolution_overrideable", "convolution_backward",
    "convolution_backward_overrideable", "cudnn_convolution", "cudnn_convolution_transpose",
    "miopen_convolution", "miopen_convolution_transpose", "miopen_depthwise_convolution", "mkldnn_convolution",
    "_slow_conv2d_forward", "_slow_conv2d_backward", "slow_conv3d_forward", "slow_conv_dilated2d",
    "slow_conv_dilated3d", "slow_conv_transpose2d", "slow_conv_transpose3d", "_conv_depthwise2d",
    "conv_depthwise3d", "_nnpack_spatial_convolution", "thnn_conv2d",
    # attention
    *_SDPA_FORWARD, *_SDPA_BACKWARD, "_flash_attention_forward", "_flash_attention_backward",
    "_efficient_attention_forward", "_efficient_attention_backward", "_native_multi_head_attention",
    "_transformer_encoder_layer_fwd", "_triton_multi_head_attention", "_scaled_dot_product_attention_math_for_mps",
    # recurrent kernels
    "lstm", "gru", "rnn_tanh", "rnn_relu", "mkldnn_rnn_layer", "mkldnn_rnn_layer_backward", "_cudnn_rnn",
    "_cudnn_rnn_backward", "miopen_rnn", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
)
HEAVY_OPS = frozenset(_ops(HEAVY_OP_NAMES))
#: Names a future release's new kernels would most likely carry (``_scaled_dot_product_*_attention_for_xyz``,
#: ``*_convolution``, ``*_mm``, ...): an op whose name matches is treated as heavy too, so a renamed kernel
#: cannot slip through uncounted.
HEAVY_NAME = re.compile(r"attention|convolution|conv\d|conv_|^mm|_mm|mm_|bmm|matmul|lstm|gru|rnn|cdist")


def is_heavy(packet) -> bool:
    return packet in HEAVY_OPS or bool(HEAVY_NAME.search(str(packet).removeprefix("aten.")))


# ------------------------------------------------------------------------------------------------- counter


class _HeavyOpGuard(TorchDispatchMode):
    """Sits below FlopCounterMode, so it sees the ops the counter executes after its own decompositions."""

    def __init__(self, covered) -> None:
        super().__init__()
        self.covered = covered
        self.uncounted: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet not in self.covered and is_heavy(packet):
            self.uncounted[str(packet)] += 1
        return func(*args, **(kwargs or {}))


class FlopCounter:
    """``with FlopCounter() as fc: model(x)`` then ``fc.flops`` / ``fc.macs``; strict about uncounted ops.

    On exit raises :class:`UncountedOpError` naming every compute-heavy op that ran without a formula (pass
    ``strict=False`` to get the partial count and the list in :attr:`uncounted` instead).
    """

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.flops = 0
        self.uncounted: dict[str, int] = {}
        self._fc = FlopCounterMode(display=False, custom_mapping=FORMULAS)
        self._guard = _HeavyOpGuard(set(self._fc.flop_registry))

    def __enter__(self) -> FlopCounter:
        self._guard.__enter__()  # entered first = below the counter on the mode stack
        try:
            self._fc.__enter__()
        except BaseException:
            self._guard.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._fc.__exit__(exc_type, exc, tb)
        finally:
            self._guard.__exit__(exc_type, exc, tb)
        self.flops = int(self._fc.get_total_flops())
        self.uncounted = dict(self._guard.uncounted)
        if self.uncounted and self.strict and exc_type is None:
            ops = ", ".join(f"{op} (x{n})" for op, n in sorted(self.uncounted.items()))
            raise UncountedOpError(
                f"FLOP count incomplete on torch {torch.__version__}: {ops} ran without a FLOP formula; add one "
                "to FORMULAS in aurecog/models/complexity.py (or avoid the op's fast path, e.g. count in train mode)")

    @property
    def macs(self) -> float:
        return self.flops / 2

    def by_op(self) -> dict[str, int]:
        """FLOPs per op (overload packet name), for reports."""
        return {str(k): int(v) for k, v in self._fc.get_flop_counts().get("Global", {}).items()}


def count_macs(model: torch.nn.Module, *args, **kwargs) -> float:
    """MACs of one ``model(*args, **kwargs)`` call without gradients (strict: see :class:`FlopCounter`)."""
    with torch.no_grad(), FlopCounter() as fc:
        model(*args, **kwargs)
    return fc.macs


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
