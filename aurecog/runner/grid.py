"""The benchmark grid: model x fold x seed for one dataset, each cell in its own process.

* A finished cell (``metrics.json`` present) is reused only when its recorded identity (resolved config with every
  ``--set``, code, pinned environment, data version, threads and device: :mod:`aurecog.runner.identity`) equals
  the cell's identity now; any other finished cell is *stale* and is redone (``keep_stale`` keeps it, with a
  warning). An interrupted cell has no ``metrics.json`` and is redone from scratch; a corrupt one is named and redone.
* ``--set`` overrides are validated against the resolved config before any cell starts: an unknown key fails with
  the closest valid names, a value of the wrong type names key, value and expected type.
* Launchers: ``local`` (a subprocess per cell, ``--jobs`` at a time), ``submitit-local`` (submitit's local
  executor, same code path as SLURM) and ``slurm`` (one SLURM job per cell through submitit; each job may use
  several GPUs with Lightning DDP).
* Progress: a rich bar of cells done/total with ETA, plus the running cells' epoch bars (read from the status
  file each cell writes).
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    results: Path = field(default=None)
    identity: dict | None = None  # set by assign_identities (needs the threads per cell, i.e. --jobs)

    @property
    def key(self) -> str:
        return f"{self.model} fold {self.fold} seed {self.seed}"

    def state(self) -> tuple[str, str]:
        """``("finished" | "missing" | "stale" | "corrupt", detail)`` of the run folder against ``identity``."""
        f = self.run_dir / FINISHED
        if not f.exists():
            return "missing", ""
        try:
            done = json.loads(f.read_text())
            if not isinstance(done, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return "corrupt", f"{f}: {e}"
        old = done.get("identity")
        if self.identity is None:
            raise GridError("cell identity not assigned; call assign_identities first")
        if not old or old.get("cell") != self.identity["cell"]:
            from aurecog.runner.identity import describe_mismatch

            return "stale", describe_mismatch(old, self.identity)
        return "finished", ""

    def finished(self) -> bool:
        return self.state()[0] == "finished"


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


# keys whose valid values are of several YAML types (Lightning accepts devices=2 or "auto", precision=32 or
# "bf16-mixed", limit_*_batches as a count or a fraction)
POLYMORPHIC_KEYS: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int, str, list), "trainer.precision": (str, int),
    "trainer.limit_train_batches": (int, float), "trainer.gradient_clip_val": (int, float),
}


def leaf_keys(cfg: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out |= leaf_keys(v, key + ".") if isinstance(v, dict) and v else {key}
    return out


def _type_ok(key: str, cur: Any, val: Any) -> tuple[bool, str]:
    if cur is None or val is None:
        return True, ""
    if key in POLYMORPHIC_KEYS:
        types = POLYMORPHIC_KEYS[key]
        ok = isinstance(val, types) and not (isinstance(val, bool) and bool not in types)
        return ok, " or ".join(t.__name__ for t in types)
    if isinstance(cur, bool):
        return isinstance(val, bool), "bool (true/false)"
    if isinstance(cur, int):
        return isinstance(val, int) and not isinstance(val, bool), "int"
    if isinstance(cur, float):
        return isinstance(val, (int, float)) and not isinstance(val, bool), "float"
    if isinstance(cur, (list, tuple)):
        return isinstance(val, (list, tuple)), "list"
    if isinstance(cur, dict):
        return isinstance(val, dict), "mapping"
    return isinstance(val, type(cur)), type(cur).__name__


def _check_override(cfg: dict, key: str, raw: str, val: Any, known: set[str]) -> None:
    parts = key.split(".")
    cur: Any = cfg
    for i, p in enumerate(parts):
        if not isinstance(cur, dict) or p not in cur:
            if key in known:  # declared by the model family, not present in the resolved config
                return
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else \
                f"; valid keys under {'.'.join(parts[:i]) or 'the top level'}: " \
                f"{', '.join(sorted(cur)) if isinstance(cur, dict) else '(not a mapping)'}"
            raise GridError(f"--set {key}={raw}: unknown config key {key!r}{hint}")
        cur = cur[p]
    ok, expected = _type_ok(key, cur, val)
    if not ok:
        raise GridError(f"--set {key}={raw}: expected {expected} (the resolved config has {cur!r}), got "
                        f"{type(val).__name__} {val!r}")
    if isinstance(cur, dict) and isinstance(val, dict):
        for k, v in val.items():
            _check_override(cfg, f"{key}.{k}", f"{{{k}: {v}}}", v, known)


def set_dotted(cfg: dict, assignments: list[str], known: set[str] | None = None, validate: bool = True) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML). With ``validate``, every key must exist in ``cfg``
    (or in ``known``, the model family's declared keys) and the value must have the type of the current one."""
    import yaml

    out: dict = {}
    known = set(known or ()) | leaf_keys(cfg)
    for a in assignments or []:
        if "=" not in a:
            raise GridError(f"override {a!r} is not of the form key.sub=value")
        key, raw = a.split("=", 1)
        key = key.strip()
        try:
            val = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise GridError(f"--set {a}: the value is not valid YAML ({e.__class__.__name__})") from None
        if validate:
            _check_override(cfg, key, raw, val, known)
        cur = out
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = val
    return C.deep_merge(cfg, out)


def _family_keys(cfg: dict) -> set[str]:
    """The model family's declared config keys (``registry.allowed_keys``), when the family declares them."""
    from aurecog.models import registry

    fn = getattr(registry, "allowed_keys", None)
    return set(fn(cfg)) if fn else set()


def _check_family_config(cfg: dict) -> None:
    from aurecog.models import registry

    fn = getattr(registry, "check_config", None)
    if fn:
        try:
            fn(cfg)
        except C.ConfigError as e:
            raise GridError(str(e)) from None


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
        cfg["protocol"] = protocol
        cfg["task"] = task
        cfg = set_dotted(cfg, overrides or [], known=_family_keys(cfg))
        _check_family_config(cfg)
        if ds.get("source") == "synth":
            cfg["synth_version"] = GENERATOR_VERSION
        for f in fold_list:
            for s in seed_list:
                base = results / "runs" / dataset / m
                logs = results / "logs" / dataset / m  # inside the results folder (git-ignored): never shared
                if sub:
                    base, logs = base / sub, logs / sub
                run_dir = base / f"{f}-{s}"
                cells.append(Cell(m, dataset, f, s, cfg, run_dir, logs / f"{f}-{s}.log", logs / f"{f}-{s}.status",
                                  results))
    return cells


def resolve_threads(cfg: dict, jobs: int) -> int:
    """``trainer.threads``, or (null) the machine's cores shared among ``jobs`` cells at once."""
    t = (cfg.get("trainer") or {}).get("threads")
    if t is not None:
        if not isinstance(t, int) or isinstance(t, bool) or t < 1:
            raise GridError(f"trainer.threads must be a positive integer or null, got {t!r}")
        return t
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def assign_identities(cells: list[Cell], jobs: int = 1, data_root: str | None = None) -> None:
    """Resolve threads per cell into the config and attach each cell's identity (see identity.py)."""
    from aurecog.runner import identity as I

    code, lock, git = I.code_fingerprint(), I.lock_fingerprint(), I.git_state()
    data_cache: dict[str, str] = {}
    for c in cells:
        threads = resolve_threads(c.config, jobs)
        c.config = C.deep_merge(c.config, {"trainer": {"threads": threads}})
        dkey = json.dumps([c.config.get("dataset"), c.config.get("protocol"), c.config.get("data", {}).get(
            "synth_seed", 0)], default=str)
        if dkey not in data_cache:
            data_cache[dkey] = I.data_version(c.config, data_root)
        c.identity = I.cell_identity(c.config, c.fold, c.seed, threads=threads, code=code, lock=lock, git=git,
                                     data=data_cache[dkey])


def cell_spec(cell: Cell, data_root: str | None, wandb_mode: str, progress: bool = False) -> dict:
    return {"config": cell.config, "fold": cell.fold, "seed": cell.seed, "run_dir": str(cell.run_dir),
            "data_root": data_root, "wandb_mode": wandb_mode, "progress": progress,
            "status_path": str(cell.status_path), "identity": cell.identity}


def check_writable(cells: list[Cell]) -> None:
    """Every run folder can be created and written, before any cell trains (a read-only or misplaced results
    folder used to be discovered only after training and testing)."""
    seen = set()
    for c in cells:
        for folder in (c.run_dir.parent, c.log_path.parent):
            if folder in seen:
                continue
            seen.add(folder)
            probe = folder / f".write-probe-{os.getpid()}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise GridError(f"cannot write to {folder} ({e.strerror or e}); choose a writable results folder "
                                "with --results DIR") from None


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
             launcher: str = "local", slurm: dict | None = None, console=None, keep_stale: bool = False) -> dict:
    """Run the cells that are not finished with their current identity; returns {"done": [...], "skipped": [...],
    "failed": [(cell, log tail)], "stale_kept": [...]}."""
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
    if any(c.identity is None for c in cells):
        assign_identities(cells, jobs, data_root)
    todo, skipped, stale_kept = [], [], []
    for c in cells:
        state, detail = c.state()
        if state == "finished":
            skipped.append(c)
        elif state == "stale" and keep_stale:
            stale_kept.append(c)
            console.print(f"[yellow]kept stale cell {c.key} ({detail}); its numbers are not of this identity[/yellow]")
        else:
            if state in ("stale", "corrupt"):
                console.print(f"[yellow]redoing {state} cell {c.key}: {detail}[/yellow]")
            todo.append(c)
    if skipped:
        console.print(f"[dim]{len(skipped)} finished cell(s) of the same identity skipped (results kept)[/dim]")
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    result = {"done": [], "skipped": skipped + stale_kept, "failed": [], "stale_kept": stale_kept}
    if not todo:
        return result
    check_writable(todo)
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
