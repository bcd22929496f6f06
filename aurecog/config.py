"""YAML configuration: datasets, model families and their variants, profiles.

``configs/`` layout::

    configs/profiles/<profile>.yaml   trainer + data defaults of a profile (quick, paper)
    configs/datasets/<name>.yaml      source, AU set, task, confounder, protocols
    configs/models/<family>.yaml      family defaults, per-profile hyperparameters, registered variants

A cell's resolved config is ``deep_merge(profile, dataset.profiles[profile], family.defaults,
family.profiles[profile], variant)`` less the variant's ``unset`` keys, then the overrides (see :func:`resolve`).
Nothing in code duplicates these values.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(os.environ.get("AURECOG_CONFIGS", REPO_ROOT / "configs"))


class ConfigError(ValueError):
    pass


def deep_merge(base: dict, *others: dict | None) -> dict:
    out = copy.deepcopy(base)
    for other in others:
        for k, v in (other or {}).items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _names(sub: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / sub).glob("*.yaml"))


def dataset_names() -> list[str]:
    return _names("datasets")


def profile_names() -> list[str]:
    return _names("profiles")


def load_dataset(name: str) -> dict:
    path = CONFIG_DIR / "datasets" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}")
    cfg = _load(path)
    cfg.setdefault("name", name)
    return cfg


def load_profile(name: str) -> dict:
    path = CONFIG_DIR / "profiles" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown profile {name!r}; known profiles: {', '.join(profile_names())}")
    return _load(path)


def load_family(family: str) -> dict:
    path = CONFIG_DIR / "models" / f"{family}.yaml"
    if not path.exists():
        raise ConfigError(f"no model config {path}")
    return _load(path)


def model_variants() -> dict[str, dict]:
    """All registered variants: name -> {file, family, group, main, paper_row, description, tables, unset,
    overrides}.

    A variant may set ``family:`` to use another family's class with this file's hyperparameters (for example
    CISNet's 'ResNet w/o CIS' rows are the baseline class with CISNet's classifier and recipe); ``unset:``
    lists dotted keys of this file's defaults/profiles that its class does not read (removed by
    :func:`resolve`). ``tables:`` lists the paper tables (groups of the file's top-level ``tables:``
    section, see :func:`table_groups`) the variant is a row of."""
    out: dict[str, dict] = {}
    for fam in _names("models"):
        cfg = load_family(fam)
        declared = set(cfg.get("tables") or {})
        for vname, v in (cfg.get("variants") or {}).items():
            v = dict(v or {})
            if vname in out:
                raise ConfigError(f"model variant {vname!r} is defined twice ({out[vname]['family']} and {fam})")
            tables = list(v.pop("tables", None) or [])
            undeclared = [t for t in tables if t not in declared]
            if undeclared:
                raise ConfigError(f"configs/models/{fam}.yaml: variant {vname!r} lists tables {undeclared} that the "
                                  f"file's top-level 'tables:' section does not declare ({sorted(declared)})")
            out[vname] = {
                "file": fam,  # the yaml whose defaults/profiles apply
                "family": v.pop("family", fam),  # the class (a paper's 'w/o' rows use the baseline class)
                "group": v.pop("group", f"{fam}-ablation"),
                "main": bool(v.pop("main", False)),
                "paper_row": v.pop("paper_row", None),
                "description": v.pop("description", ""),
                "tables": tables,
                "unset": list(v.pop("unset", None) or []),
                "overrides": v,
            }
    return out


def table_groups() -> dict[str, dict]:
    """Each paper table as a runnable group: name -> {file, description, protocol, models}. ``protocol``
    (optional, e.g. IERN Table 3's ``bias90``) is the protocol the table was reported under; ``models`` are
    the variants listing the table, in file order."""
    out: dict[str, dict] = {}
    variants = model_variants()
    for fam in _names("models"):
        for name, t in (load_family(fam).get("tables") or {}).items():
            if name in out:
                raise ConfigError(f"table group {name!r} is defined twice ({out[name]['file']} and {fam})")
            t = dict(t or {})
            out[name] = {"file": fam, "description": t.get("description", ""), "protocol": t.get("protocol"),
                         "models": [v for v, d in variants.items() if name in d["tables"]]}
    return out


def resolve(model: str, dataset: str, profile: str, overrides: dict | None = None) -> dict:
    """Full config of one (model variant, dataset, profile) cell."""
    variants = model_variants()
    if model not in variants:
        raise ConfigError(f"unknown model {model!r}; known models: {', '.join(sorted(variants))}")
    v = variants[model]
    fam = load_family(v["file"])
    ds = load_dataset(dataset)
    prof = load_profile(profile)
    cfg = deep_merge(
        prof,
        (ds.get("profiles") or {}).get(profile),
        fam.get("defaults"),
        (fam.get("profiles") or {}).get(profile),
        v["overrides"],
    )
    for dotted in v["unset"]:  # this file's keys that the variant's class does not read (not the caller's)
        *path, last = dotted.split(".")
        cur = get(cfg, ".".join(path)) if path else cfg
        if isinstance(cur, dict):
            cur.pop(last, None)
    cfg = deep_merge(cfg, overrides)
    cfg["model"] = {"name": model, "family": v["family"], "group": v["group"], "paper_row": v["paper_row"],
                    **cfg.get("model", {})}
    cfg["dataset"] = dataset
    cfg["profile"] = profile
    return cfg


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur
