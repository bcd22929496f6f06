"""Model families: a family name (``configs/models/<family>.yaml``) maps to a LightningModule class.

Variants (the papers' ablation rows) are config entries of a family, not classes: see
:func:`aurecog.config.model_variants`.

Config keys: every family class declares the dotted config keys it reads (``config_keys``, extending its
parent's). :func:`allowed_keys` adds the runner's common keys (the leaf keys of ``configs/profiles/*.yaml``)
and the runner's bookkeeping keys; :func:`check_config` rejects a cell config holding any other key, naming
the yaml it comes from and the closest valid keys.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

from aurecog.tasks import TaskSpec, TrainStats

FAMILY_MODULES = {
    "baseline": "aurecog.models.baseline",
    "cisnet": "aurecog.models.cisnet",
    "ac2d": "aurecog.models.ac2d",
    "iern": "aurecog.models.iern",
    "renet": "aurecog.models.renet",
}
_FAMILIES: dict[str, type] = {}

#: sections of the runner's common keys; their leaf keys are read from configs/profiles/*.yaml
COMMON_SECTIONS = ("trainer", "data", "optim", "schedule", "init", "slurm")
#: keys the runner itself writes into a cell config (config.resolve, grid.expand, cell.run_cell, identity)
RUNNER_KEYS = frozenset({"model", "dataset", "profile", "protocol", "task", "synth_version", "fold", "seed",
                         "dataset_config", "labels", "confounder", "identity"})
#: timm constructor arguments the model yamls pass through ``backbone`` (create_backbone's ``**kwargs``)
TIMM_BACKBONE_KWARGS = ("channels", "output_stride", "stem_width", "stem_type", "drop_rate", "drop_path_rate")


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


# ---------------------------------------------------------------------------------------------- config keys
def backbone_keys() -> frozenset[str]:
    """``backbone.*`` keys: the named arguments of :func:`aurecog.models.backbones.create_backbone` plus the
    timm constructor arguments of :data:`TIMM_BACKBONE_KWARGS`."""
    from aurecog.models.backbones import create_backbone

    named = [n for n, p in inspect.signature(create_backbone).parameters.items()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return frozenset(f"backbone.{n}" for n in (*named, *TIMM_BACKBONE_KWARGS))


def flatten_keys(d: dict, prefix: str = "") -> dict[str, object]:
    """Dotted leaf keys of a nested dict -> value (an empty dict is a leaf)."""
    out: dict[str, object] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_keys(v, key + "."))
        else:
            out[key] = v
    return out


def common_keys() -> frozenset[str]:
    """The runner's common keys: the leaf keys of every ``configs/profiles/*.yaml`` in :data:`COMMON_SECTIONS`."""
    from aurecog import config as C

    keys: set[str] = set()
    for name in C.profile_names():
        for k in flatten_keys(C.load_profile(name)):
            if k.split(".")[0] in COMMON_SECTIONS:
                keys.add(k)
    return frozenset(keys)


def allowed_keys(cfg: dict) -> set[str]:
    """All dotted leaf keys valid for this cell: the runner's common keys (profile yamls) and those of the
    cell's family class (``config_keys``). Runner bookkeeping keys (:data:`RUNNER_KEYS`) are accepted at any
    depth and not listed."""
    return set(common_keys()) | set(family_class(cfg["model"]["family"]).config_keys)


def _is_allowed(key: str, allowed: set[str], open_keys: set[str]) -> bool:
    if key in allowed or key.split(".")[0] in RUNNER_KEYS:
        return True
    # a common key whose profile value is null may hold a mapping (data.augment.affine: {p: 1.0, ...})
    parts = key.split(".")
    return any(".".join(parts[:i]) in open_keys for i in range(1, len(parts)))


def _open_keys() -> set[str]:
    from aurecog import config as C

    out: set[str] = set()
    for name in C.profile_names():
        out |= {k for k, v in flatten_keys(C.load_profile(name)).items() if v is None}
    return out


def key_sources(cfg: dict) -> dict[str, list[str]]:
    """Dotted key -> the config files that set it, for the cell's (model, dataset, profile); keys set by
    none of them came from overrides (``--set``)."""
    from aurecog import config as C

    model, dataset, profile = cfg["model"]["name"], cfg["dataset"], cfg["profile"]
    v = C.model_variants()[model]
    fam, ds = C.load_family(v["file"]), C.load_dataset(dataset)
    fam_file, ds_file = f"configs/models/{v['file']}.yaml", f"configs/datasets/{dataset}.yaml"
    parts = [(f"configs/profiles/{profile}.yaml", C.load_profile(profile)),
             (f"{ds_file} (profiles.{profile})", (ds.get("profiles") or {}).get(profile)),
             (f"{fam_file} (defaults)", fam.get("defaults")),
             (f"{fam_file} (profiles.{profile})", (fam.get("profiles") or {}).get(profile)),
             (f"{fam_file} (variants.{model})", v["overrides"])]
    out: dict[str, list[str]] = {}
    for where, d in parts:
        for k in flatten_keys(d or {}):
            out.setdefault(k, []).append(where)
    return out


def check_config(cfg: dict) -> None:
    """Raise :class:`aurecog.config.ConfigError` listing every key of ``cfg`` that neither the runner nor the
    cell's family class reads, with the yaml it comes from and the closest valid keys."""
    from aurecog.config import ConfigError

    allowed, open_keys = allowed_keys(cfg), _open_keys()
    unknown = [k for k in flatten_keys(cfg) if not _is_allowed(k, allowed, open_keys)]
    if not unknown:
        return
    try:
        sources = key_sources(cfg)
    except Exception:  # an inline or partial config: no provenance
        sources = {}
    cls = family_class(cfg["model"]["family"]).__name__
    items = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(allowed), n=3, cutoff=0.6)
        where = ", ".join(sources.get(k) or ["--set / overrides"])
        items.append(f"{k} (from {where}" + (f"; did you mean {', '.join(close)}?)" if close else ")"))
    raise ConfigError(f"model {cfg['model']['name']!r} ({cls}) does not read config key(s): " + "; ".join(items)
                      + ". Remove or fix them (the keys a family reads are its class's config_keys).")
