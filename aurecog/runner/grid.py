"""The benchmark grid: model x fold x seed for one dataset, each cell in its own process.

* Finished cells (``metrics.json`` present, same profile) are skipped; an interrupted cell has no
  ``metrics.json`` and is redone from scratch. Killing the runner loses at most the cell in flight.
* Launchers (aurecog/runner/launchers.py: process groups, per-cell locks, Slurm requests): ``local`` (a
  subprocess per cell, ``--jobs`` at a time), ``submitit-local`` (submitit's local executor, same code path as
  SLURM) and ``slurm`` (one SLURM job per cell through submitit; each job may use several GPUs with Lightning DDP).
* Progress: a rich bar of cells done/total with ETA, plus the running cells' epoch bars (read from the status
  file each cell writes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.data.protocols import num_folds
from aurecog.data.synth import GENERATOR_VERSION
from aurecog.runner.cell import FINISHED, atomic_write_json

DEFAULT_MODELS = "default"


class GridError(ValueError):
    pass


@dataclass
class Cell:
    model: str
    dataset: str
    fold: int
    seed: int
    config: dict
    run_dir: Path
    log_path: Path = field(default=None)
    status_path: Path = field(default=None)

    @property
    def key(self) -> str:
        return f"{self.model} fold {self.fold} seed {self.seed}"

    def finished(self) -> bool:
        f = self.run_dir / FINISHED
        if not f.exists():
            return False
        try:
            done = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        # a run of another profile, or on an older SynthAU generator version, is stale and is redone
        return (done.get("profile") == self.config["profile"]
                and done.get("synth_version") == self.config.get("synth_version"))


def select_models(spec: str) -> list[str]:
    """``default`` (each family's main model + the baseline), ``all``, group names, variant names, comma-separated."""
    variants = C.model_variants()
    groups: dict[str, list[str]] = {}
    for name, v in variants.items():
        groups.setdefault(v["group"], []).append(name)
    out: list[str] = []
    for token in [t.strip() for t in spec.split(",") if t.strip()]:
        if token == "default":
            names = [n for n, v in variants.items() if v["main"]]
        elif token == "all":
            names = list(variants)
        elif token in groups:
            fam = variants[groups[token][0]]["file"]
            mains = [n for n, v in variants.items() if v["file"] == fam and v["main"]]
            names = mains + groups[token] if token.endswith("-ablation") else groups[token]
        elif token in variants:
            names = [token]
        else:
            raise GridError(f"unknown model or group {token!r}. Models: {', '.join(sorted(variants))}. "
                            f"Groups: {', '.join(sorted(groups))}, default, all")
        out += [n for n in names if n not in out]
    return _family_order(out, variants)


def _family_order(names: list[str], variants: dict) -> list[str]:
    order = ["baseline", "cisnet", "ac2d", "iern", "renet"]
    return sorted(names, key=lambda n: (order.index(variants[n]["file"]) if variants[n]["file"] in order else 99,
                                        not variants[n]["main"], n))


def parse_folds(spec: str | None, n: int) -> list[int]:
    if spec in (None, "", "all"):
        return list(range(n))
    folds = [int(x) for x in str(spec).split(",")]
    bad = [f for f in folds if not 0 <= f < n]
    if bad:
        raise GridError(f"folds {bad} out of range: the protocol has {n} folds (0..{n - 1})")
    return folds


def set_dotted(cfg: dict, assignments: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for a in assignments or []:
        if "=" not in a:
            raise GridError(f"override {a!r} is not of the form key.sub=value")
        key, val = a.split("=", 1)
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = yaml.safe_load(val)
    return C.deep_merge(cfg, out)


TASKS = ("au", "intensity", "expression")


def run_subdir(ds: dict, protocol: str, task: str) -> str | None:
    """Run folders of a dataset's default protocol and task are ``<model>/<fold>-<seed>``; any other protocol or
    task gets its own level, ``<model>/<protocol>[-<task>]/<fold>-<seed>``, so its cells never collide with (or
    are skipped as) the default ones."""
    default_task = ds.get("task", "au")
    if protocol == ds.get("default_protocol") and task == default_task:
        return None
    return protocol if task == default_task else f"{protocol}-{task}"


def expand(dataset: str, models: str = DEFAULT_MODELS, folds: str | None = "all", seeds: str = "0",
           profile: str | None = None, protocol: str | None = None, results: Path | None = None,
           overrides: list[str] | None = None, task: str | None = None) -> list[Cell]:
    ds = C.load_dataset(dataset)
    profile = profile or ds.get("default_profile", "paper")
    protocol = protocol or ds.get("default_protocol")
    if protocol not in (ds.get("protocols") or {}):
        raise GridError(f"dataset {dataset!r} has no protocol {protocol!r}; protocols: {', '.join(ds['protocols'])}")
    task = task or ds.get("task", "au")
    if task not in TASKS:
        raise GridError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    sub = run_subdir(ds, protocol, task)
    fold_list = parse_folds(folds, num_folds(ds["protocols"][protocol]))
    seed_list = [int(s) for s in str(seeds).split(",")]
    results = Path(results or REPO_ROOT / "results")
    cells = []
    for m in select_models(models):
        cfg = C.resolve(m, dataset, profile)
        cfg = set_dotted(cfg, overrides or [])
        cfg["protocol"] = protocol
        cfg["task"] = task
        if ds.get("source") == "synth":
            cfg["synth_version"] = GENERATOR_VERSION
        for f in fold_list:
            for s in seed_list:
                base = results / "runs" / dataset / m
                logs = results.parent / "logs" / dataset / m  # next to the results folder, git-ignored
                if sub:
                    base, logs = base / sub, logs / sub
                run_dir = base / f"{f}-{s}"
                cells.append(Cell(m, dataset, f, s, cfg, run_dir, logs / f"{f}-{s}.log", logs / f"{f}-{s}.status"))
    return cells


def cell_spec(cell: Cell, data_root: str | None, wandb_mode: str, progress: bool = False) -> dict:
    return {"config": cell.config, "fold": cell.fold, "seed": cell.seed, "run_dir": str(cell.run_dir),
            "data_root": data_root, "wandb_mode": wandb_mode, "progress": progress,
            "status_path": str(cell.status_path)}


def run_grid(cells: list[Cell], data_root: str | None = None, wandb_mode: str = "offline", jobs: int = 1,
             launcher: str = "local", slurm: dict | None = None, console=None) -> dict:
    """Run the unfinished cells; returns {"done": [...], "skipped": [...], "failed": [(cell, log tail)]}."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from aurecog.runner import launchers  # imports this module: loaded here, not at the top

    console = console or Console(stderr=True)
    todo = [c for c in cells if not c.finished()]
    skipped = [c for c in cells if c not in todo]
    if skipped:
        console.print(f"[dim]{len(skipped)} finished cell(s) skipped (results kept)[/dim]")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    result = {"done": [], "skipped": skipped, "failed": []}
    if not todo:
        return result
    for c in todo:
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path = c.log_path.with_suffix(".spec.json")
        atomic_write_json(spec_path, cell_spec(c, data_root, wandb_mode))
        if c.status_path.exists():
            c.status_path.unlink()
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        grid_task = progress.add_task(f"grid {cells[0].dataset}", total=len(cells), completed=len(skipped))
        if launcher == "local":
            launchers.run_local(todo, jobs, threads, progress, grid_task, result)
        elif launcher in ("submitit-local", "slurm"):
            launchers.run_submitit(todo, launcher, slurm or {}, progress, grid_task, result)
        else:
            raise GridError(f"unknown launcher {launcher!r} (local, submitit-local, slurm)")
    return result
