"""Evaluation protocols as data.

A protocol is a dict from a dataset config (``configs/datasets/*.yaml``, key ``protocols``). Types:

* ``subject_folds``: fixed subject lists ``parts: [[...], [...], [...]]`` (the literature's BP4D/DISFA
  partitions). Fold k tests ``parts[k]`` and trains on the others (FG-Net's numbering: fold 0 tests part 1).
* ``subject_kfold``: ``k`` parts computed from the sorted subject names, subject at sorted position i in part
  ``i % k`` (deterministic, for datasets without published lists, e.g. SynthAU).
* ``fixed_split``: ``train``/``test`` subject lists, or ``column`` + ``train_values``/``test_values`` to split
  on an index column (Aff-Wild2's official train/validation). One fold.
* ``repeated_subject_kfold``: ``repeats`` independent re-draws of a subject-exclusive ``k``-fold partition
  (beyond the papers: "Beyond the Fold", Hinduja et al. 2026, found rankings change with the fold assignment).
  Re-draw r shuffles the sorted subject names with a generator seeded by (``seed``, r) and deals them into ``k``
  parts like ``subject_kfold``; fold index = r * k + part (:func:`redraw_of`). Every subject is tested exactly once
  per re-draw.
* ``cross_dataset``: train on this dataset, test on ``test_dataset`` (another dataset config). By default one
  fold: all rows of both. With ``folds: n`` and ``train_protocol`` (a protocol of this dataset) fold k trains on
  that protocol's fold-k training rows; with ``test_protocol`` (a protocol of the test dataset) fold k tests on
  that protocol's fold-k test rows (AC2D Table 9 averages three BP4D fold models tested on GFT, and the GFT
  model tested on the three BP4D test parts). See :func:`cross_dataset_rows`.
* ``leave_one_dataset_out``: test on all of this dataset, train on all of ``train_datasets`` (other dataset
  configs), on the AU ``labels`` every one of them codes (default: the common AUs). One fold per held-out dataset
  config (Hinduja et al. 2026 propose LODO over BP4D, BP4D+, DISFA, GFT). Subjects are namespaced
  ``<dataset>/<subject>`` so that equal names in two datasets stay two subjects.
* ``heldout_cells``: the IERN mixed-dataset o.o.d. protocol. ``folds`` is a list; each maps a value of
  ``group_column`` (the source dataset) to the labels (expression names) held out for testing.
  ``move_fraction`` of the sequences of each held-out (group, label) cell moves to training, whole
  (0 = bias100, 0.1 = bias90; see :func:`_move_sequences`). ``id_fraction`` (beyond the paper, default 0)
  keeps that fraction of the sequences of every *other* (group, label) cell out of training as an
  in-distribution test set (:func:`in_distribution_rows`), scored apart from the held-out cells, so that a
  model's in-distribution - held-out gap can be measured; the headline stays the held-out cells'.

Any protocol may also set, overriding the dataset config (a paper's own variant of a protocol):

* ``labels``: the label set, a list, or a mapping task -> list (``null``: every label the dataset has for
  that task), e.g. RE-Net's DISFA: 8 AUs for occurrence, all 12 for intensity;
* ``positive_threshold``: occurrence = intensity >= this, re-derived from the ``AU<k>_int`` columns for the AU
  task (RE-Net's DISFA: positive = intensity > 0, i.e. >= 1), and the binarisation of the intensity task.

Validation is always carved subject-exclusively from the training rows (:func:`carve_validation`); the
test rows are never used for model selection.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROTOCOL_TYPES = ("subject_folds", "subject_kfold", "repeated_subject_kfold", "fixed_split", "cross_dataset",
                  "leave_one_dataset_out", "heldout_cells")


class ProtocolError(ValueError):
    pass


def num_folds(protocol: dict) -> int:
    kind = protocol.get("type")
    if kind == "subject_folds":
        return len(protocol["parts"])
    if kind == "subject_kfold":
        return int(protocol["k"])
    if kind == "repeated_subject_kfold":
        return int(protocol["k"]) * int(protocol["repeats"])
    if kind == "cross_dataset":
        return int(protocol.get("folds", 1))
    if kind in ("fixed_split", "leave_one_dataset_out"):
        return 1
    if kind == "heldout_cells":
        return len(protocol["folds"])
    raise ProtocolError(f"unknown protocol type {kind!r}; expected one of {PROTOCOL_TYPES}")


def redraw_of(protocol: dict, fold: int) -> tuple[int, int]:
    """(re-draw, part) of a fold index: ``fold = redraw * k + part`` for ``repeated_subject_kfold``, (0, fold)
    for every other protocol."""
    if protocol.get("type") == "repeated_subject_kfold":
        k = int(protocol["k"])
        return fold // k, fold % k
    return 0, fold


def kfold_parts(subjects, k: int, redraw: int | None = None, seed: int = 0) -> list[list[str]]:
    """``k`` subject-exclusive parts of the sorted ``subjects``: position i goes to part ``i % k``. With
    ``redraw`` the sorted names are first shuffled by a generator seeded by (``seed``, ``redraw``), so each
    re-draw is a new, reproducible partition; part sizes differ by at most one."""
    subjects = sorted(set(map(str, subjects)))
    if redraw is not None:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(redraw)]))
        subjects = [subjects[i] for i in rng.permutation(len(subjects))]
    return [subjects[i::k] for i in range(k)]


def _stable_rng(*keys) -> np.random.Generator:
    seed = 0
    for k in keys:
        for ch in str(k):
            seed = (seed * 131 + ord(ch)) % (2**63 - 1)
    return np.random.default_rng(seed)


def split_rows(index: pd.DataFrame, protocol: dict, fold: int, label_names: list[str] | None = None,
               where: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """Row positions (train, test) of ``index`` for ``fold``. For ``cross_dataset`` and ``leave_one_dataset_out``
    test is ``None``: the rows come from other datasets (:func:`cross_dataset_rows`; the DataModule)."""
    n = num_folds(protocol)
    if not 0 <= fold < n:
        raise ProtocolError(f"fold {fold} out of range: protocol {protocol.get('type')} has {n} folds (0..{n - 1})")
    kind = protocol["type"]
    subj = index["subject"].astype(str).to_numpy()
    if kind in ("subject_folds", "subject_kfold", "repeated_subject_kfold"):
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
            k = int(protocol["k"])
            if len(set(subj)) < k:
                raise ProtocolError(f"{where}: {len(set(subj))} subjects cannot form {k} subject-exclusive folds")
            redraw, fold = redraw_of(protocol, fold)
            parts = kfold_parts(subj, k, redraw if kind == "repeated_subject_kfold" else None,
                                int(protocol.get("seed", 0)))
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
    if kind in ("cross_dataset", "leave_one_dataset_out"):
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


def cross_dataset_rows(protocol: dict, fold: int, train_index: pd.DataFrame, train_protocols: dict,
                       test_index: pd.DataFrame, test_protocols: dict,
                       where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Row positions (train rows of this dataset, test rows of ``test_dataset``) of a ``cross_dataset`` fold.

    ``train_protocols`` / ``test_protocols`` are the ``protocols`` of the two dataset configs, where
    ``train_protocol`` / ``test_protocol`` are looked up; each has the protocol's ``folds`` (its fold k is used)
    or one fold (used for every fold: AC2D's one GFT model tested on the three BP4D parts)."""
    n = num_folds(protocol)
    if not 0 <= fold < n:
        raise ProtocolError(f"fold {fold} out of range: the cross_dataset protocol has {n} folds (0..{n - 1})")
    out = []
    for side, index, protocols, pick in (("train", train_index, train_protocols, 0),
                                         ("test", test_index, test_protocols, 1)):
        ref = protocol.get(f"{side}_protocol")
        if ref is None:
            out.append(np.arange(len(index)))
            continue
        if ref not in protocols:
            raise ProtocolError(f"{where}: {side}_protocol {ref!r} is not a protocol of the {side} dataset "
                                f"(has {', '.join(protocols)})")
        m = num_folds(protocols[ref])
        if m not in (1, n):
            raise ProtocolError(f"{where}: {side}_protocol {ref!r} has {m} folds but the cross_dataset protocol "
                                f"says folds: {n}; make them agree (or use a one-fold protocol)")
        out.append(split_rows(index, protocols[ref], fold if m == n else 0, where=where)[pick])
    return out[0], out[1]


def common_labels(label_sets: dict[str, list[str]], wanted: list[str] | None = None, where: str = "") -> list[str]:
    """The labels of a ``leave_one_dataset_out`` protocol: ``wanted`` if given (each must be a label of every
    dataset in ``label_sets``, name -> labels), else the labels all of them share, in the first set's order."""
    names = list(label_sets)
    if wanted is None:
        first = label_sets[names[0]]
        out = [n for n in first if all(n in label_sets[d] for d in names[1:])]
        if not out:
            raise ProtocolError(f"{where}: datasets {names} share no label; a leave-one-dataset-out protocol needs "
                                "common AUs")
        return out
    for d in names:
        missing = [n for n in wanted if n not in label_sets[d]]
        if missing:
            raise ProtocolError(f"{where}: labels {missing} are not labels of dataset {d!r} (has {label_sets[d]}); "
                                "list only the AUs every dataset of the protocol codes")
    return list(wanted)


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


def in_distribution_rows(index: pd.DataFrame, protocol: dict, fold: int, train_rows: np.ndarray,
                         label_names: list[str] | None, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(train rows, in-distribution test rows) of a ``heldout_cells`` fold with ``id_fraction``: that fraction
    of the sequences (subject, session) of every (group, label) cell *not* held out in the fold leaves
    ``train_rows``, whole, for an in-distribution test set; the same subjects keep their other sequences in
    training, as the held-out cells' subjects do, so the two test sets differ in whether the cell was seen.
    Deterministic per fold; at least one sequence per cell when the fraction is positive and the cell has two."""
    frac = float(protocol.get("id_fraction", 0.0) or 0.0)
    train_rows = np.asarray(train_rows)
    if frac <= 0:
        return train_rows, train_rows[:0]
    if not 0 < frac < 1:
        raise ProtocolError(f"{where}: id_fraction must be in [0, 1), got {frac}")
    if protocol.get("type") != "heldout_cells":
        raise ProtocolError(f"{where}: id_fraction is a heldout_cells option (protocol type {protocol.get('type')})")
    if "session" not in index.columns:
        raise ProtocolError(f"{where}: id_fraction keeps whole sequences out and needs a 'session' index column")
    if label_names is None:
        raise ProtocolError(f"{where}: id_fraction needs the expression names")
    sub = index.iloc[train_rows]
    group = sub[protocol.get("group_column", "dataset")].astype(str).to_numpy()
    label = sub["expression"].to_numpy()
    seq = (sub["subject"].astype(str) + "\x1f" + sub["session"].astype(str)).to_numpy()
    held = {(str(g), label_names.index(h)) for g, hs in protocol["folds"][fold].items() for h in hs}
    rng = _stable_rng("id", fold)
    keep_out = np.zeros(len(train_rows), dtype=bool)
    for g, lab in sorted({(g, int(v)) for g, v in zip(group, label) if v >= 0}):
        if (g, lab) in held:  # bias90's moved sequences of a held-out cell stay in training
            continue
        cell = (group == g) & (label == lab)
        sequences = np.unique(seq[cell])
        k = max(1, int(round(frac * len(sequences)))) if len(sequences) >= 2 else 0
        if k:
            keep_out |= cell & np.isin(seq, rng.choice(sequences, size=k, replace=False))
    return train_rows[~keep_out], train_rows[keep_out]


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
