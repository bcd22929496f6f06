"""What a model is asked to predict (:class:`TaskSpec`) and what it may know about the training set
(:class:`TrainStats`). Both are plain data, stored in checkpoints as dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

TASK_KINDS = ("au", "intensity", "expression")
INTENSITY_LEVELS = 6  # FACS intensities 0 (absent) and A-E coded 1-5


@dataclass
class TaskSpec:
    """``kind``: ``au`` (multi-label occurrence, one logit per AU), ``intensity`` (per-AU 6-level logits,
    B x C x 6) or ``expression`` (one logit per class). ``names``: AU names or class names."""

    kind: str
    names: list[str]
    positive_threshold: float = 2.0  # intensity at or above which an AU counts as present (DISFA convention)
    levels: int = INTENSITY_LEVELS

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {TASK_KINDS}")
        self.names = list(self.names)

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    @property
    def multilabel(self) -> bool:
        return self.kind != "expression"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainStats:
    """Training-set statistics the models use; computed by the DataModule from training rows only.

    * ``label_rate[c]``: share of known labels that are positive (AU occurrence; for ``intensity`` the share
      at or above the positive threshold; for ``expression`` the class frequency).
    * ``n_pos[c]``, ``n_neg[c]``: counts behind it.
    * ``label_corr``: C x C Pearson correlation of the training labels (RE-Net's graph; one-hot classes for
      expression, intensities for ``intensity``); rows with unknown entries are left out.
    * ``subjects``: the training subjects, sorted; ``subject_counts``: their sample counts (CISNet's P(s)).
    * ``confounders``: names of the confounder strata (subjects, or datasets for the expression mix);
      ``confounder_counts`` their sample counts.
    """

    n_train: int
    label_rate: list[float]
    n_pos: list[int]
    n_neg: list[int]
    label_corr: list[list[float]]
    subjects: list[str]
    subject_counts: list[int]
    confounder: str = "subject"
    confounders: list[str] = field(default_factory=list)
    confounder_counts: list[int] = field(default_factory=list)

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def n_confounders(self) -> int:
        return len(self.confounders)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainStats:
        return cls(**d)

    def corr_array(self) -> np.ndarray:
        return np.asarray(self.label_corr, dtype=np.float32)
