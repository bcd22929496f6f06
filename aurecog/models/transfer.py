"""Initialise a model from another trained model of the same family whose label set differs.

AC²D (paper 4.1.3) initialises its DISFA model from the model trained on BP4D. The two label sets overlap (AUs
1, 2, 4, 6, 12) but differ in size and order, so a plain ``load_state_dict`` cannot be used: per-label
parameters must follow the label *names*. A family declares where its per-label parameters live:

* ``LABEL_BLOCK_PREFIXES``: state-dict entries under these prefixes are label-major along dim 0 (one block of
  ``dim0 / n_labels`` rows per label: stacked per-branch weights ``(m, ...)``, grouped convolutions
  ``(m * c, ...)``, per-label prototypes);
* ``LABEL_LIST_PREFIXES``: ``nn.ModuleList``s indexed by label (``<prefix>.<i>.<rest>``).

Everything else is shared and copied when its shape matches. Labels of the target that the source does not have
keep their fresh initialisation; :func:`transfer_state` reports what was copied, mapped and kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn


class TransferError(ValueError):
    pass


def _under(key: str, prefix: str) -> bool:
    """``key`` is the entry ``prefix`` or lies below it (``prefix.`` ...)."""
    p = prefix.rstrip(".")
    return key == p or key.startswith(p + ".")


def _label_list_key(key: str, prefixes: tuple[str, ...]) -> tuple[str, int, str] | None:
    for p in prefixes:
        m = re.match(rf"^{re.escape(p)}\.(\d+)\.(.+)$", key)
        if m:
            return p, int(m.group(1)), m.group(2)
    return None


def transfer_state(model: nn.Module, state: dict[str, Tensor], src_labels: list[str]) -> dict[str, list[str]]:
    """Load ``state`` (trained on ``src_labels``) into ``model`` (labels ``model.task.names``), mapping per-label
    parameters by label name. Returns ``{"copied": [...], "mapped": [...], "kept": [...], "labels": [...]}``:
    shared entries copied, per-label entries filled for the common labels, entries left at their initialisation,
    and the common labels."""
    tgt_labels = list(model.task.names)
    src_labels = list(src_labels)
    blocks = getattr(model, "LABEL_BLOCK_PREFIXES", None)
    lists = tuple(getattr(model, "LABEL_LIST_PREFIXES", ()))
    if blocks is None and src_labels != tgt_labels:
        raise TransferError(f"{type(model).__name__} does not declare its per-label parameters, so it can only be "
                            f"initialised from a model with the same labels ({src_labels} != {tgt_labels})")
    blocks = tuple(blocks or ())
    common = [(j, src_labels.index(n)) for j, n in enumerate(tgt_labels) if n in src_labels]
    if not common:
        raise TransferError(f"no label in common between the source {src_labels} and the target {tgt_labels}")
    n_src, n_tgt = len(src_labels), len(tgt_labels)
    target = model.state_dict()
    out = {k: v.clone() for k, v in target.items()}
    report: dict[str, list[str]] = {"copied": [], "mapped": [], "kept": [], "labels": [tgt_labels[j] for j, _ in
                                                                                         common]}
    for key, t in target.items():
        listed = _label_list_key(key, lists)
        if listed is not None:
            prefix, j, rest = listed
            src_i = dict(common).get(j)
            src_key = f"{prefix}.{src_i}.{rest}"
            if src_i is not None and src_key in state and state[src_key].shape == t.shape:
                out[key] = state[src_key].to(t.dtype)
                report["mapped"].append(key)
            else:
                report["kept"].append(key)
            continue
        if key not in state:
            report["kept"].append(key)
            continue
        s = state[key]
        if any(_under(key, p) for p in blocks):
            if t.ndim == 0 or t.shape[0] % n_tgt or s.shape[0] % n_src:
                raise TransferError(f"{key}: dim 0 ({tuple(t.shape)} / {tuple(s.shape)}) is not a multiple of the "
                                    "label count")
            b = t.shape[0] // n_tgt
            if s.shape[0] // n_src != b or s.shape[1:] != t.shape[1:]:
                report["kept"].append(key)
                continue
            for j, i in common:
                out[key][j * b:(j + 1) * b] = s[i * b:(i + 1) * b].to(t.dtype)
            report["mapped"].append(key)
        elif s.shape == t.shape:
            out[key] = s.to(t.dtype)
            report["copied"].append(key)
        else:
            report["kept"].append(key)
    model.load_state_dict(out)
    return report


def init_from_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """:func:`transfer_state` from a Lightning checkpoint of an :class:`~aurecog.models.base.AUModel` (its labels
    come from the checkpoint's hyperparameters)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint {path} does not exist: train the source model first (for "
                                "AC²D's DISFA initialisation, `make bench DATASET=bp4d MODELS=ac2d` with the same "
                                "folds and seeds), or set init.checkpoint to an existing file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    src_labels = ckpt["hyper_parameters"]["task"]["names"]
    return transfer_state(model, ckpt["state_dict"], src_labels)
