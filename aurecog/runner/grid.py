"""The benchmark grid: model x fold x seed for one dataset, each cell in its own process.

* A finished cell (``metrics.json`` present) is reused only when its recorded identity (resolved config with every
  ``--set``, code, pinned environment, data version, threads and device: :mod:`aurecog.runner.identity`) equals
  the cell's identity now; any other finished cell is *stale* and is redone (``keep_stale`` keeps it, with a
  warning). An interrupted cell has no ``metrics.json`` and is redone from scratch; a corrupt one is named and redone.
* ``--set`` overrides are validated against the resolved config before any cell starts: an unknown key fails with
  the closest valid names, a value of the wrong type names key, value and expected type.
* Launchers (aurecog/runner/launchers.py: process groups, per-cell locks, Slurm requests): ``local`` (a
  subprocess per cell, ``--jobs`` at a time), ``submitit-local`` (submitit's local executor, same code path as
  SLURM) and ``slurm`` (one SLURM job per cell through submitit; each job may use several GPUs with Lightning DDP).
* Progress: a rich bar of cells done/total with ETA, plus the running cells' epoch bars (read from the status
  file each cell writes).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.data.protocols import num_folds
from aurecog.data.synth import GENERATOR_VERSION
from aurecog.runner.cell import FINISHED, atomic_write_json, check_writable_folder

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


# keys whose valid values are of several YAML types (Lightning accepts devices=2 or "auto", precision=32 or
# "bf16-mixed", limit_*_batches as a count or a fraction, channels_last true/false or "auto")
POLYMORPHIC_KEYS: dict[str, tuple[type, ...]] = {
    "trainer.devices": (int, str, list), "trainer.precision": (str, int), "trainer.channels_last": (bool, str),
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
    if protocol is None:  # a paper table reported under its own protocol (IERN Table 3: bias90) runs under it
        tables = C.table_groups()
        wanted = {tables[t]["protocol"] for t in str(models).split(",") if t.strip() in tables
                  and tables[t.strip()]["protocol"]}
        if len(wanted) == 1 and next(iter(wanted)) in (ds.get("protocols") or {}):
            protocol = next(iter(wanted))
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
                cells.append(Cell(m, dataset, f, s, cfg, run_dir, logs / f"{f}-{s}.log", logs / f"{f}-{s}.status"))
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
    from aurecog.runner import speed

    for c in cells:
        threads = resolve_threads(c.config, jobs)
        c.config = C.deep_merge(c.config, {"trainer": {"threads": threads}})
        if speed.wants_choice(c.config):  # measured once per machine and variant (cache/speed.json)
            s = speed.resolve(c.config, threads)
            c.config = C.deep_merge(c.config, {"trainer": {"precision": s["precision"],
                                                           "channels_last": s["channels_last"]}})
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
            try:
                check_writable_folder(folder)
            except PermissionError as e:
                raise GridError(str(e)) from None


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

    from aurecog.runner import launchers  # imports this module: loaded here, not at the top

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
            launchers.run_local(todo, jobs, threads, progress, grid_task, result)
        elif launcher in ("submitit-local", "slurm"):
            launchers.run_submitit(todo, launcher, slurm or {}, progress, grid_task, result)
        else:
            raise GridError(f"unknown launcher {launcher!r} (local, submitit-local, slurm)")
    return result
