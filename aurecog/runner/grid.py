"""The benchmark grid: model x fold x seed for one dataset, each cell in its own process.

* Finished cells (``metrics.json`` present, same profile) are skipped; an interrupted cell has no
  ``metrics.json`` and is redone from scratch. Killing the runner loses at most the cell in flight.
* Launchers: ``local`` (a subprocess per cell, ``--jobs`` at a time), ``submitit-local`` (submitit's local
  executor, same code path as SLURM) and ``slurm`` (one SLURM job per cell through submitit; each job may use
  several GPUs with Lightning DDP).
* Progress: a rich bar of cells done/total with ETA, plus the running cells' epoch bars (read from the status
  file each cell writes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
    """``default`` (each family's main model + the baseline), ``all``, group names, paper tables (``renet-table8``,
    :func:`aurecog.config.table_groups`), variant names, comma-separated."""
    variants = C.model_variants()
    groups: dict[str, list[str]] = {}
    for name, v in variants.items():
        groups.setdefault(v["group"], []).append(name)
    for name, t in C.table_groups().items():
        if name in groups or name in variants:
            raise GridError(f"table group {name!r} ({t['file']}.yaml) clashes with a model or group of that name")
        groups[name] = t["models"]
    out: list[str] = []
    for token in [t.strip() for t in spec.split(",") if t.strip()]:
        if token == "default":
            names = [n for n, v in variants.items() if v["main"]]
        elif token == "all":
            names = list(variants)
        elif token in groups:
            names = groups[token]
            if token.endswith("-ablation") and names:
                fam = variants[names[0]]["file"]
                names = [n for n, v in variants.items() if v["file"] == fam and v["main"]] + names
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


def _cell_env(threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["AURECOG_TORCH_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_spec_file(spec_path: str) -> int:
    """Entry point for submitit jobs (picklable top-level function)."""
    from aurecog.runner.cell import main

    return main([spec_path])


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
            _run_local(todo, jobs, threads, progress, grid_task, result)
        elif launcher in ("submitit-local", "slurm"):
            _run_submitit(todo, launcher, slurm or {}, progress, grid_task, result)
        else:
            raise GridError(f"unknown launcher {launcher!r} (local, submitit-local, slurm)")
    return result


def _epoch_update(progress, task_id, cell: Cell) -> None:
    try:
        st = json.loads(cell.status_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    progress.update(task_id, total=st.get("total", 1), completed=st.get("done", 0),
                    description=f"  {cell.model} f{cell.fold} s{cell.seed} {st.get('phase', '')}")


def _finish(cell: Cell, rc: int, progress, grid_task, result) -> None:
    if rc == 0 and cell.finished():
        result["done"].append(cell)
    else:
        tail = ""
        if cell.log_path.exists():
            tail = "\n".join(cell.log_path.read_text(errors="replace").splitlines()[-25:])
        result["failed"].append((cell, tail))
        progress.console.print(f"[red]cell failed: {cell.key} (exit {rc}); log: {cell.log_path}[/red]\n{tail}")
    progress.advance(grid_task)


def _run_local(todo: list[Cell], jobs: int, threads: int, progress, grid_task, result) -> None:
    pending = list(todo)
    running: list[tuple[Cell, subprocess.Popen, int]] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, jobs):
                c = pending.pop(0)
                log = open(c.log_path, "w")
                cmd = [sys.executable, "-m", "aurecog.runner.cell", str(c.log_path.with_suffix(".spec.json"))]
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_cell_env(threads),
                                     cwd=str(REPO_ROOT))
                log.close()
                tid = progress.add_task(f"  {c.model} f{c.fold} s{c.seed}", total=1)
                running.append((c, p, tid))
            time.sleep(0.5)
            for item in list(running):
                c, p, tid = item
                _epoch_update(progress, tid, c)
                rc = p.poll()
                if rc is not None:
                    running.remove(item)
                    progress.remove_task(tid)
                    _finish(c, rc, progress, grid_task, result)
    finally:
        for _, p, _ in running:  # the runner was interrupted: stop children, their cells stay unfinished
            p.terminate()


def _run_submitit(todo: list[Cell], launcher: str, slurm: dict, progress, grid_task, result) -> None:
    import submitit

    folder = todo[0].log_path.parents[2] / "submitit"  # <logs>/submitit
    if launcher == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        devices = int(slurm.get("gpus_per_node", 1))
        executor.update_parameters(
            slurm_partition=slurm.get("partition"), nodes=int(slurm.get("nodes", 1)), gpus_per_node=devices,
            tasks_per_node=devices, cpus_per_task=int(slurm.get("cpus_per_task", 8)),
            timeout_min=int(slurm.get("timeout_min", 24 * 60)), name="aurecog",
            **({"slurm_additional_parameters": slurm["additional"]} if slurm.get("additional") else {}))
    else:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int(slurm.get("timeout_min", 120)))
    jobs = []
    for c in todo:
        job = executor.submit(run_spec_file, str(c.log_path.with_suffix(".spec.json")))
        jobs.append((c, job))
        progress.console.print(f"[dim]submitted {c.key} as job {job.job_id}[/dim]")
    for c, job in jobs:
        try:
            job.result()
            rc = 0
        except Exception as e:  # the job's own traceback is in its submitit log
            c.log_path.write_text(f"{e}\n{job.stderr() or ''}")
            rc = 1
        _finish(c, rc, progress, grid_task, result)
