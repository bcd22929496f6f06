"""The identity of a result: what a finished cell was computed from, so that it is reused only for exactly that.

A cell's identity is a hash of

* ``config``: the resolved config with every ``--set`` override (minus ``slurm``, the launcher's resource request,
  which changes where a cell runs, not what it computes);
* ``code``: a content hash of the code and configs a cell executes (:data:`CODE_GLOBS`), read from the working
  tree, so that a commit touching only results or README keeps the identity, while any edit to the training code,
  committed or not, changes it. The git revision and whether the tree was dirty are recorded beside it;
* ``lock``: the hash of ``requirements.lock`` (the pinned environment), plus the torch build actually imported;
* ``data``: the data version: SynthAU generator version + preset + seed, or a prepared dataset's fingerprint;
* ``execution``: every setting that changes numbers and is not in the config: torch threads per cell (resolved,
  never "auto") and the device kind the cell runs on;
* ``weights``: the sha256 of every local weights file the config initialises from (each ``*pretrained_file`` key,
  e.g. the SynthAU-pretrained trunks of the quick profile, :func:`aurecog.models.backbones.pretrained_files`): the
  config names the file, this hashes what is in it, so re-running ``make pretrain`` makes the cells stale.

``row`` is the same hash without fold and seed: a leaderboard row is made of cells of one ``row`` identity.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from aurecog.config import REPO_ROOT

# Files whose content defines what a cell computes. Modules that do not change a cell's numbers (leaderboards,
# statistics, the bias analysis, figures, the W&B dashboard, the command line, the study's questions, inference
# on users' files: `aurecog predict`) are left out: editing them cannot change a cell's numbers, and
# tests/test_identity.py checks that running a cell does not import them.
CODE_GLOBS = ("aurecog/**/*.py", "configs/**/*.yaml")
REPORT_ONLY = ("aurecog/cli.py", "aurecog/runner/leaderboard.py", "aurecog/runner/stats.py",
               "aurecog/runner/claims.py", "aurecog/runner/figures.py", "aurecog/runner/dashboard.py",
               "aurecog/runner/bias.py", "configs/study.yaml", "aurecog/predict.py",
               # trunk pretraining: a cell reads its output (the weights file, hashed into the identity), not it
               "aurecog/pretrain.py", "configs/pretrain/synthau.yaml")
# config keys that say where/how a cell is launched, not what it computes
NON_IDENTITY_KEYS = ("slurm",)
LOCK_FILE = "requirements.lock"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def code_files(root: Path = REPO_ROOT) -> list[Path]:
    files = {p for g in CODE_GLOBS for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts}
    skip = {root / s for s in REPORT_ONLY}
    return sorted(p for p in files if p not in skip)


def code_fingerprint(root: Path = REPO_ROOT) -> str:
    """Content hash of :func:`code_files` (paths relative to the repository root, then contents)."""
    h = hashlib.sha256()
    for p in code_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(_sha(p.read_bytes()).encode() + b"\n")
    return h.hexdigest()[:16]


def lock_fingerprint(root: Path = REPO_ROOT) -> str:
    p = root / LOCK_FILE
    return _sha(p.read_bytes())[:16] if p.exists() else "no-lock"


def git_state(root: Path = REPO_ROOT) -> dict:
    """``{"revision": full sha or "unknown", "dirty": bool}``; dirty = a tracked file differs from HEAD or an
    untracked, not ignored file exists under the code folders or pretrained/ (the quick trunks' weights)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        rev = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", "aurecog", "configs", "pretrained", LOCK_FILE, "pyproject.toml")
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown", "dirty": True}
    return {"revision": rev or "unknown", "dirty": bool(status) or not rev}


def data_version(cfg: dict, data_root: str | None = None) -> str:
    """SynthAU: ``synthau-v<generator>:<preset>:seed<synth seed>`` per source; real data: each prepared
    dataset's fingerprint (the hash of its integrity manifest)."""
    from aurecog.data.datamodule import load_config
    from aurecog.data.synth import GENERATOR_VERSION

    ds = load_config(cfg.get("dataset_config") or cfg["dataset"])  # a dataset name, or an inline config (tests)
    proto = (ds.get("protocols") or {}).get(cfg.get("protocol")) or {}
    names = [ds]
    if proto.get("type") == "cross_dataset":
        names.append(load_config(proto["test_dataset"]))
    elif proto.get("type") == "leave_one_dataset_out":
        names += [load_config(d) for d in proto["train_datasets"]]
    parts = []
    seed = (cfg.get("data") or {}).get("synth_seed", 0)
    for d in names:
        if d.get("source") == "synth":
            over = d.get("synth_overrides")
            parts.append(f"synthau-v{GENERATOR_VERSION}:{d.get('preset', d['name'])}:seed{seed}"
                         + (f":{_hash(over)}" if over else ""))
        else:
            parts.append(f"{d['name']}:{prepared_fingerprint(d, data_root)}")
    return "+".join(parts)


def prepared_fingerprint(ds_cfg: dict, data_root: str | None) -> str:
    from aurecog.data.datamodule import open_source

    ds = open_source(ds_cfg, data_root, progress=False)
    fp = getattr(ds, "fingerprint", None)
    if fp:
        return str(fp)
    # a prepared folder without an integrity manifest: its meta and file sizes
    root = Path(ds.root)
    h = hashlib.sha256((root / "meta.json").read_bytes())
    for p in sorted(root.iterdir()):
        if p.is_file():
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    return "nomanifest-" + h.hexdigest()[:12]


def weights_fingerprints(cfg: dict) -> dict[str, str]:
    """Dotted config key -> sha256 of the weights file it names ("missing" when the file does not exist)."""
    from aurecog.models.backbones import file_sha256, pretrained_files

    return {k: file_sha256(p) if p.is_file() else "missing" for k, p in sorted(pretrained_files(cfg).items())}


def device_kind(cfg: dict) -> str:
    import torch

    acc = (cfg.get("trainer") or {}).get("accelerator", "auto")
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return "cuda:" + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unavailable")
    return "cpu"


def _hash(obj) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str).encode())[:16]


def cell_identity(cfg: dict, fold: int, seed: int, *, threads: int, code: str, lock: str, git: dict,
                  data: str) -> dict:
    """The identity record written into ``metrics.json`` (see module docstring)."""
    import torch

    config = {k: v for k, v in cfg.items() if k not in NON_IDENTITY_KEYS}
    execution = {"threads": int(threads), "device": device_kind(cfg), "torch": torch.__version__}
    weights = weights_fingerprints(cfg)
    row_parts = {"config": config, "code": code, "lock": lock, "data": data, "execution": execution}
    if weights:  # only cells that load a file: the identities of every other cell stay as they were
        row_parts["weights"] = weights
    row = _hash(row_parts)
    return {"row": row, "cell": _hash({"row": row, "fold": int(fold), "seed": int(seed)}), "code": code,
            "lock": lock, "data": data, "weights": weights, "revision": git["revision"], "dirty": bool(git["dirty"]),
            "threads": int(threads), "device": execution["device"], "torch": execution["torch"],
            "precision": str((cfg.get("trainer") or {}).get("precision"))}


def describe_mismatch(old: dict | None, new: dict) -> str:
    """Which part of an identity changed, for the runner's 'redoing stale cell' line."""
    if not old:
        return "no identity recorded (made before identities existed)"
    parts = [k for k in ("code", "lock", "data", "weights", "threads", "device", "torch", "precision")
             if old.get(k, {} if k == "weights" else None) != new.get(k, {} if k == "weights" else None)]
    if old.get("row") != new.get("row") and not parts:
        parts = ["config"]
    return ", ".join(f"{k} {old.get(k)!s:.16} -> {new.get(k)!s:.16}" if k != "config" else "config" for k in parts)
