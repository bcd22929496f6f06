"""Evaluation protocols as data.

A protocol is a dict from a dataset config (``configs/datasets/*.yaml``, key ``protocols``). Types:

* ``subject_folds``: fixed subject lists ``parts: [[...], [...], [...]]`` (the literature's BP4D/DISFA
  partitions). Fold k tests ``parts[k]`` and trains on the others (FG-Net's numbering: fold 0 tests part 1).
* ``subject_kfold``: ``k`` parts computed from the sorted subject names, subject at sorted position i in part
  ``i % k`` (deterministic, for datasets without published lists, e.g. SynthAU).
* ``fixed_split``: ``train``/``test`` subject lists, or ``column`` + ``train_values``/``test_values`` to split
  on an index column (Aff-Wild2's official train/validation). One fold.
* ``cross_dataset``: train on all of this dataset, test on all of ``test_dataset`` (another prepared
  dataset). One fold.
* ``heldout_cells``: the IERN mixed-dataset o.o.d. protocol. ``folds`` is a list; each maps a value of
  ``group_column`` (the source dataset) to the labels (expression names) held out for testing.
  ``move_fraction`` of the sequences of each held-out (group, label) cell moves to training, whole
  (0 = bias100, 0.1 = bias90; see :func:`_move_sequences`).

Validation is always carved subject-exclusively from the training rows (:func:`carve_validation`); the
test rows are never used for model selection.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROTOCOL_TYPES = ("subject_folds", "subject_kfold", "fixed_split", "cross_dataset", "heldout_cells")


class ProtocolError(ValueError):
    pass


def num_folds(protocol: dict) -> int:
    kind = protocol.get("type")
    if kind == "subject_folds":
        return len(protocol["parts"])
    if kind == "subject_kfold":
        return int(protocol["k"])
    if kind in ("fixed_split", "cross_dataset"):
        return 1
    if kind == "heldout_cells":
        return len(protocol["folds"])
    raise ProtocolError(f"unknown protocol type {kind!r}; expected one of {PROTOCOL_TYPES}")


def _stable_rng(*keys) -> np.random.Generator:
    seed = 0
    for k in keys:
        for ch in str(k):
            seed = (seed * 131 + ord(ch)) % (2**63 - 1)
    return np.random.default_rng(seed)


def split_rows(index: pd.DataFrame, protocol: dict, fold: int, label_names: list[str] | None = None,
               where: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """Row positions (train, test) of ``index`` for ``fold``. For ``cross_dataset`` test is ``None`` (the
    test rows are all rows of the other dataset)."""
    n = num_folds(protocol)
    if not 0 <= fold < n:
        raise ProtocolError(f"fold {fold} out of range: protocol {protocol.get('type')} has {n} folds (0..{n - 1})")
    kind = protocol["type"]
    subj = index["subject"].astype(str).to_numpy()
    if kind in ("subject_folds", "subject_kfold"):
        if kind == "subject_folds":
            parts = [list(map(str, p)) for p in protocol["parts"]]
            listed = set().union(*map(set, parts))
            unlisted = sorted(set(subj) - listed)
            if unlisted:
                raise ProtocolError(
                    f"{where}: subjects {unlisted[:10]} are in the data but in no part of the protocol; "
                    "fix the subject lists in the dataset config")
            missing = sorted(listed - set(subj))
            if missing and protocol.get("require_all", True):
                raise ProtocolError(
                    f"{where}: protocol lists subjects {missing[:10]} that the prepared data does not contain; "
                    "prepare the full distribution or set require_all: false")
        else:
            subjects = sorted(set(subj))
            k = int(protocol["k"])
            if len(subjects) < k:
                raise ProtocolError(f"{where}: {len(subjects)} subjects cannot form {k} subject-exclusive folds")
            parts = [subjects[i::k] for i in range(k)]
        test_mask = np.isin(subj, parts[fold])
        return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    if kind == "fixed_split":
        if "column" in protocol:
            col = index[protocol["column"]].astype(str).to_numpy()
            train_mask = np.isin(col, [str(v) for v in protocol["train_values"]])
            test_mask = np.isin(col, [str(v) for v in protocol["test_values"]])
        else:
            train_mask = np.isin(subj, [str(s) for s in protocol["train"]])
            test_mask = np.isin(subj, [str(s) for s in protocol["test"]])
        if (train_mask & test_mask).any():
            raise ProtocolError(f"{where}: fixed split puts rows in both train and test")
        return np.flatnonzero(train_mask), np.flatnonzero(test_mask)
    if kind == "cross_dataset":
        return np.arange(len(index)), None
    if kind == "heldout_cells":
        group = index[protocol.get("group_column", "dataset")].astype(str).to_numpy()
        if label_names is None:
            raise ProtocolError("heldout_cells needs the expression names")
        label = index["expression"].to_numpy()
        cells = protocol["folds"][fold]
        test_mask = np.zeros(len(index), dtype=bool)
        for g, held in cells.items():
            unknown = [h for h in held if h not in label_names]
            if unknown:
                raise ProtocolError(f"{where}: held-out labels {unknown} not among {label_names}")
            ids = [label_names.index(h) for h in held]
            test_mask |= (group == str(g)) & np.isin(label, ids)
        frac = float(protocol.get("move_fraction", 0.0))
        if frac > 0:
            _move_sequences(index, test_mask, group, label, cells, label_names, frac, fold, where)
        return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    raise ProtocolError(f"unknown protocol type {kind!r}")


def _move_sequences(index: pd.DataFrame, test_mask: np.ndarray, group: np.ndarray, label: np.ndarray, cells: dict,
                    label_names: list[str], frac: float, fold: int, where: str) -> None:
    """bias90 (IERN Table 3, "moving 10% of images from the original test set into the training set", which the
    paper calls sequence-independent): ``frac`` of the *sequences* of each held-out (group, label) cell move to
    training, whole, so no test frame shares a sequence with a training frame. A sequence is one
    (subject, session); the notes do not pin how the authors' CSVs pick the moved images (their Oulu count,
    24 of 240 frames = 8 of 80 three-frame sequences, fits whole sequences), so whole sequences is our
    reading. Updates ``test_mask`` in place."""
    if "session" not in index.columns:
        raise ProtocolError(f"{where}: move_fraction moves whole sequences and needs a 'session' index column")
    seq = (index["subject"].astype(str) + "\x1f" + index["session"].astype(str)).to_numpy()
    rng = _stable_rng("move", fold)
    for g, held in cells.items():
        for h in held:
            cell = (group == str(g)) & (label == label_names.index(h))
            sequences = np.unique(seq[cell])  # sorted: deterministic
            k = int(round(frac * len(sequences)))
            if k:
                moved = rng.choice(sequences, size=k, replace=False)
                test_mask[cell & np.isin(seq, moved)] = False


def carve_validation(index: pd.DataFrame, train_rows: np.ndarray, fraction: float, seed: int | str = 0,
                     min_subjects: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split ``train_rows`` into (fit, validation) by subject: ``fraction`` of the training subjects (at least
    ``min_subjects``) go to validation. Deterministic in ``seed``."""
    subj = index["subject"].astype(str).to_numpy()[train_rows]
    subjects = sorted(set(subj))
    if fraction <= 0:
        return train_rows, train_rows[:0]
    n_val = max(min_subjects, int(round(fraction * len(subjects))))
    if n_val >= len(subjects):
        raise ProtocolError(
            f"cannot carve {n_val} validation subjects from {len(subjects)} training subjects; lower val_fraction")
    rng = _stable_rng("val", seed)
    val_subjects = set(rng.choice(subjects, size=n_val, replace=False).tolist())
    is_val = np.isin(subj, list(val_subjects))
    return train_rows[~is_val], train_rows[is_val]
