"""Model families: a family name (``configs/models/<family>.yaml``) maps to a LightningModule class.

Variants (the papers' ablation rows) are config entries of a family, not classes: see
:func:`aurecog.config.model_variants`.
"""

from __future__ import annotations

import importlib

from aurecog.tasks import TaskSpec, TrainStats

FAMILY_MODULES = {
    "baseline": "aurecog.models.baseline",
    "cisnet": "aurecog.models.cisnet",
    "ac2d": "aurecog.models.ac2d",
    "iern": "aurecog.models.iern",
    "renet": "aurecog.models.renet",
}
_FAMILIES: dict[str, type] = {}


def register_family(name: str):
    def deco(cls):
        _FAMILIES[name] = cls
        return cls

    return deco


def family_class(name: str) -> type:
    if name not in _FAMILIES:
        if name not in FAMILY_MODULES:
            raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILY_MODULES)}")
        importlib.import_module(FAMILY_MODULES[name])
    return _FAMILIES[name]


def build_model(cfg: dict, task: TaskSpec, stats: TrainStats):
    """Instantiate the family of a resolved cell config."""
    return family_class(cfg["model"]["family"])(task=task, stats=stats, cfg=cfg)
