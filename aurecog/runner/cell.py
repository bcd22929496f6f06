"""One benchmark cell: fit a model on a fold's training subjects, select the checkpoint on the validation
subjects, test on the test fold, and write the cell's run folder.

Run folder ``results/runs/<dataset>/<model>/<fold>-<seed>/`` (all writes atomic, ``metrics.json`` last, so a
folder with ``metrics.json`` is a finished cell):

* ``config.json``: the resolved config (profile included)
* ``history.csv``: per-epoch training loss and validation metrics (training curves)
* ``predictions.parquet``: per test sample: provenance, scores, targets
* ``environment.json``: versions, device, git revision, lock hash, command, wall time
* ``metrics.json``: test metrics (per label and mean), per-subject PCC similarity, selected epoch, and the cell's
  ``identity`` (:mod:`aurecog.runner.identity`): the runner reuses a finished cell only for the same identity

The checkpoint lives in the run folder, ``<run folder>/checkpoints/best.ckpt`` (git-ignored), so a results folder
never reads or writes another one's checkpoints. W&B runs go to ``<run folder>/wandb`` (git-ignored).

Executed as ``python -m aurecog.runner.cell <spec.json>`` by the grid runner, so each cell has its own
process, and Lightning's DDP launcher can re-execute the same command for ranks >= 1.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd

from aurecog import config as C

log = logging.getLogger(__name__)

FINISHED = "metrics.json"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_write_df(path: Path, df: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if path.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def git_revision() -> str:
    """Short revision of HEAD, with ``-dirty`` when the code that makes a result (identity.git_state: aurecog,
    configs, the lock, pyproject.toml) differs from it; a rerun rewriting tracked result files is not dirty."""
    from aurecog.runner.identity import git_state

    g = git_state()
    if g["revision"] == "unknown":
        return "unknown"
    return g["revision"][:7] + ("-dirty" if g["dirty"] else "")


def environment() -> dict:
    import lightning
    import timm
    import torch
    import torchmetrics

    from aurecog.runner.identity import git_state, lock_fingerprint

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86_64'})"
    return {
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "timm": timm.__version__, "torchmetrics": torchmetrics.__version__, "device": dev,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "git_revision": git_revision(), "git": git_state(), "lock_sha256_16": lock_fingerprint(),
    }


def build_datamodule(cfg: dict, fold: int, data_root: str | None = None, progress: bool = True):
    from aurecog.data.datamodule import datamodule_from_config

    return datamodule_from_config(cfg, fold, data_root, progress)


class HistoryCallback(L.Callback):
    """Collects per-epoch logged scalars (train loss, validation metrics) for history.csv."""

    def __init__(self):
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        # Read at the end of the training epoch: the epoch's validation has run and its metrics are logged
        # (callbacks' on_validation_epoch_end runs before the module's, which would lag one epoch).
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("val/", "train/")) and k.count("/") == 1:
                row[k] = float(v)
        self.rows.append(row)


class TimingCallback(L.Callback):
    """Wall time inside ``fit`` spent training vs validating, and the optimiser steps taken (metrics.json
    ``timings``: where a cell's time goes, and its training rate in images per minute)."""

    def __init__(self):
        self.train_s = self.val_s = 0.0
        self._t = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module):
        if str(getattr(trainer.state.fn, "value", trainer.state.fn)) == "fit":  # inside fit: close the training stretch
            self.train_s += time.perf_counter() - self._t
        self._v = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_s += time.perf_counter() - self._v
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.train_s += time.perf_counter() - self._t
        self._t = time.perf_counter()


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 elsewhere): the interpreter start and imports
    before :func:`run_cell` is called."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class StatusCallback(L.Callback):
    """Writes the cell's progress (phase, batches done/total) to a small JSON file the grid runner polls."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._last = 0.0

    def _write(self, phase: str, done: int, total: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < 0.5:
            return
        self._last = now
        atomic_write_json(self.path, {"phase": phase, "done": done, "total": max(total, 1)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 0:
            total = int(trainer.estimated_stepping_batches)
            self._write(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", trainer.global_step, total)

    def on_test_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            self._write("test", 1, 1, force=True)


def _trainer_kwargs(cfg: dict) -> dict:
    t = dict(cfg.get("trainer", {}))
    devices = t.get("devices", 1)
    strategy = t.get("strategy", "auto")
    accelerator = t.get("accelerator", "auto")
    import torch

    if accelerator == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("trainer.accelerator=gpu but no CUDA GPU is visible; use accelerator=auto or cpu")
    multi = (isinstance(devices, int) and devices > 1) or int(t.get("num_nodes", 1)) > 1 or (
        devices == "auto" and torch.cuda.device_count() > 1)
    if multi and strategy == "auto":
        strategy = "ddp"
    return dict(accelerator=accelerator, devices=devices, num_nodes=int(t.get("num_nodes", 1)), strategy=strategy,
                precision=t.get("precision", "32-true"), max_epochs=int(t.get("max_epochs", 1)),
                gradient_clip_val=t.get("gradient_clip_val"), limit_train_batches=t.get("limit_train_batches"),
                deterministic=t.get("deterministic", False))


def make_logger(cfg: dict, run_dir: Path, fold: int, seed: int, wandb_mode: str):
    if wandb_mode == "disabled":
        return False
    os.environ["WANDB_SILENT"] = "true"
    os.environ.setdefault("WANDB_CONSOLE", "off")
    from lightning.pytorch.loggers import WandbLogger

    m = cfg["model"]
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=os.environ.get("WANDB_PROJECT", "aurecog"), save_dir=str(run_dir), offline=wandb_mode == "offline",
        group=f"{cfg['dataset']}/{m['name']}", job_type=f"fold{fold}",
        name=f"{m['name']}-{cfg['dataset']}-f{fold}-s{seed}",
        tags=[cfg["profile"], f"seed{seed}", git_revision(), m["family"]], config=cfg, mode=wandb_mode)


def predictions_frame(dm, preds: dict, names: list[str], kind: str) -> pd.DataFrame:
    sources = {0: dm.split_sources["train"], 1: dm.split_sources["test"]}
    rows = []
    for src, ds in sources.items():
        m = preds["source"].numpy() == src
        if not m.any():
            continue
        sub = ds.index.iloc[preds["sample"].numpy()[m]].reset_index(drop=True)
        keep = [c for c in ("dataset", "subject", "session", "frame", "split") if c in sub.columns]
        df = sub[keep].copy()
        df.insert(0, "sample", preds["sample"].numpy()[m])
        scores, target = preds["scores"].numpy()[m], preds["target"].numpy()[m]
        for j, n in enumerate(names):
            df[f"score_{n}"] = scores[:, j].astype(np.float32)
        if kind == "expression":
            df["target"] = target.astype(np.int64)
        else:
            for j, n in enumerate(names):
                df[f"target_{n}"] = target[:, j].astype(np.float32)
        rows.append(df)
    out = pd.concat(rows, ignore_index=True)
    return out.sort_values(["sample"]).reset_index(drop=True)


CHECKPOINT = Path("checkpoints") / "best.ckpt"  # below the run folder
#: predictions on a protocol's in-distribution test set (heldout_cells ``id_fraction``), beside predictions.parquet
ID_PREDICTIONS = "predictions_id.parquet"


def checkpoint_path(run_dir: Path) -> Path:
    """The selected checkpoint of a run folder (or a path to a checkpoint file, returned as is)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".ckpt" else run_dir / CHECKPOINT


def results_root(run_dir: Path) -> Path:
    """The results folder of a run folder ``<results>/runs/<dataset>/...``."""
    parts = Path(run_dir).parts
    if "runs" not in parts:
        raise ValueError(f"{run_dir} is not below a results folder's runs/ directory")
    last_runs = len(parts) - 1 - parts[::-1].index("runs")
    return Path(*parts[:last_runs])


def initialise(model, cfg: dict, run_dir: Path, fold: int, seed: int) -> dict | None:
    """``init.checkpoint: PATH`` or ``init.from_dataset: NAME`` (the same model, fold and seed trained on NAME in
    the same results folder, e.g. AC²D's DISFA model from BP4D, paper 4.1.3): load it with per-label parameters
    mapped by label name."""
    init = cfg.get("init") or {}
    if not (init.get("checkpoint") or init.get("from_dataset")):
        return None
    from aurecog.models.transfer import init_from_checkpoint

    if init.get("checkpoint"):
        path = checkpoint_path(Path(init["checkpoint"]))
    else:
        path = checkpoint_path(results_root(run_dir) / "runs" / init["from_dataset"] / cfg["model"]["name"]
                               / f"{fold}-{seed}")
        if not path.exists():
            raise FileNotFoundError(f"init.from_dataset={init['from_dataset']}: no checkpoint {path}; train that "
                                    f"cell first (aurecog bench --dataset {init['from_dataset']} --models "
                                    f"{cfg['model']['name']} --folds {fold} --seeds {seed} with the same --results)")
    rep = init_from_checkpoint(model, path)
    log.info("initialised from %s: %d shared tensors copied, %d per-label tensors mapped for %s, %d kept", path,
             len(rep["copied"]), len(rep["mapped"]), rep["labels"], len(rep["kept"]))
    return {"checkpoint": str(path), "labels": rep["labels"], "copied": len(rep["copied"]),
            "mapped": len(rep["mapped"]), "kept": len(rep["kept"])}


def train_label_summary(dm) -> dict:
    """Training-set label statistics the leaderboard's trivial floors use: ``train_prevalence`` (AU occurrence:
    share of known labels that are positive; expression: class frequency) or ``train_mean`` (intensity: mean
    known level), per label, from the rows the model was fitted on."""
    y = np.asarray(dm.fit_targets)
    names = dm.task_spec.names
    kind = dm.task_spec.kind
    if kind == "expression":
        known = y[y >= 0]
        return {"train_prevalence": {n: float((known == j).mean()) if len(known) else float("nan")
                                     for j, n in enumerate(names)}}
    out = {}
    for j, n in enumerate(names):
        col = y[:, j]
        col = col[col >= 0]
        out[n] = float("nan") if not len(col) else float(col.mean() if kind == "intensity" else (col > 0.5).mean())
    return {"train_mean" if kind == "intensity" else "train_prevalence": out}


def preprocessing(dm) -> dict:
    """What inference must reproduce before the model's eval transform (``data.*`` of the config): the size and
    landmark layout of the training crops and the alignment that made them (None for rendered SynthAU crops)."""
    meta = dm.split_sources["train"].meta
    return {"image_size": int(meta["image_size"]), "landmark_layout": dm.landmark_layout,
            "alignment": meta.get("alignment")}


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it, before any training (an unwritable results folder used to
    be discovered only after the test); PermissionError naming the folder and the fix otherwise."""
    probe = Path(folder) / f".write-probe-{os.getpid()}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to {folder} ({e.strerror or e}); choose a writable results folder "
                              "with --results DIR") from None


def run_cell(cfg: dict, fold: int, seed: int, run_dir: Path, data_root: str | None = None,
             wandb_mode: str = "offline", progress: bool = True, status_path: str | None = None,
             identity: dict | None = None) -> dict | None:
    """Train/select/test one cell. Returns the metrics dict (rank 0) or None (other ranks). ``identity`` (from the
    runner) is recorded in ``metrics.json``; ``trainer.threads`` sets torch's intra-op threads."""
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from aurecog.models.registry import build_model

    t0 = time.time()
    started_s = process_age_s()
    run_dir = Path(run_dir)
    check_writable_folder(run_dir)
    threads = (cfg.get("trainer") or {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    from aurecog.runner import speed

    if speed.wants_choice(cfg):  # called without the runner (which resolves it into the identity)
        s = speed.resolve(cfg, int(threads or torch.get_num_threads()))
        cfg = C.deep_merge(cfg, {"trainer": {"precision": s["precision"], "channels_last": s["channels_last"]}})
    L.seed_everything(seed, workers=True)
    torch.set_float32_matmul_precision("high")
    cfg = dict(cfg, fold=fold, seed=seed)
    dm = build_datamodule(cfg, fold, data_root, progress=progress)
    dm.setup("fit")
    model = build_model(cfg, dm.task_spec, dm.stats)
    model.hparams["preprocessing"] = preprocessing(dm)  # stored in the checkpoint for `aurecog predict`
    ckpt_dir = checkpoint_path(run_dir).parent
    init_report = initialise(model, cfg, run_dir, fold, seed)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # an interrupted earlier attempt
    has_val = len(dm.split_rows["val"]) > 0
    monitor = model.monitor if has_val else "train/loss"
    mode = "max" if has_val else "min"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                                 auto_insert_metric_name=False, enable_version_counter=False)]
    history, timing = HistoryCallback(), TimingCallback()
    callbacks += [history, timing]
    if status_path:
        callbacks.append(StatusCallback(status_path))
    patience = cfg.get("trainer", {}).get("early_stopping_patience")
    if patience and has_val:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=int(patience)))
    if progress:
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar(leave=False))
    logger = make_logger(cfg, run_dir, fold, seed, wandb_mode)
    tk = _trainer_kwargs(cfg)
    if tk["gradient_clip_val"] is not None and not model.automatic_optimization:
        tk["gradient_clip_val"] = None  # manual-optimisation models clip inside their step
    trainer = L.Trainer(**tk, logger=logger, callbacks=callbacks, use_distributed_sampler=False,
                        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=10, default_root_dir=str(ckpt_dir))
    t_fit = time.time()
    trainer.fit(model, datamodule=dm, **({} if has_val else {"val_dataloaders": []}))
    t_test = time.time()
    best = callbacks[0].best_model_path or None
    best_epoch = _best_epoch(history.rows, monitor, mode)
    trainer.test(model, datamodule=dm, ckpt_path=best if best else None, verbose=False)
    res, res_id = model.test_results, None
    if "test_id" in dm.split_rows:  # a heldout_cells protocol's in-distribution test set, scored apart
        model.test_log_prefix = "test_id"
        trainer.test(model, dataloaders=dm.test_id_dataloader(), ckpt_path=best if best else None, verbose=False)
        res_id = model.test_results
    t_done = time.time()
    if trainer.global_rank != 0:
        return None
    kind = dm.task_spec.kind
    pcc = {dm.subject_names[k]: v for k, v in res["pcc_similarity"].items()}
    metrics = {
        "model": cfg["model"]["name"], "family": cfg["model"]["family"], "group": cfg["model"]["group"],
        "dataset": cfg["dataset"], "protocol": dm.protocol_name, "fold": fold, "seed": seed,
        "profile": cfg["profile"], "task": kind, "labels": dm.task_spec.names, "test": res["metrics"],
        "pcc_similarity": pcc, "n_train": len(dm.split_rows["train"]), "n_val": len(dm.split_rows["val"]),
        "n_test": int(len(res["predictions"]["sample"])), "selected_epoch": best_epoch, "monitor": monitor,
        "epochs_run": trainer.current_epoch, "wall_time_s": round(time.time() - t0, 1),
        "timings": _timings(started_s, t0, t_fit, t_test, t_done, timing, trainer.global_step,
                            int(cfg["data"]["batch_size"])),
        "train_subjects": dm.stats.subjects, **train_label_summary(dm),
    }
    if cfg.get("synth_version") is not None:
        metrics["synth_version"] = cfg["synth_version"]
    if init_report:
        metrics["init"] = init_report
    if identity:
        metrics["identity"] = identity
    atomic_write_json(run_dir / "config.json", cfg)
    atomic_write_df(run_dir / "history.csv", pd.DataFrame(history.rows))
    preds = predictions_frame(dm, res["predictions"], dm.task_spec.names, kind)
    atomic_write_df(run_dir / "predictions.parquet", preds)
    if res_id is not None:
        metrics["test_in_distribution"] = res_id["metrics"]
        metrics["n_test_in_distribution"] = int(len(res_id["predictions"]["sample"]))
        atomic_write_df(run_dir / ID_PREDICTIONS, predictions_frame(dm, res_id["predictions"], dm.task_spec.names,
                                                                    kind))
    habits = dm.split_sources["test"].meta.get("habits")
    # SynthAU ground truth: the habit group of each test subject (leaderboard bias breakdown). Contrarian groups
    # are placed for the subject k-fold split (one per fold); other protocols train on them, so no breakdown there.
    if habits and dm.protocol["type"] == "subject_kfold":
        metrics["test_habits"] = {s: {"group": habits[s]["group_name"], "contrarian": bool(habits[s]["contrarian"])}
                                  for s in sorted(preds["subject"].astype(str).unique()) if s in habits}
    env = environment()
    env.update({"argv": sys.argv, "world_size": trainer.world_size, "wall_time_s": metrics["wall_time_s"]})
    atomic_write_json(run_dir / "environment.json", env)
    if logger:
        _wandb_test_extras(logger, dm, model, res, metrics)
    atomic_write_json(run_dir / FINISHED, metrics)
    if logger:
        import wandb

        wandb.finish()
    return metrics


def _timings(started_s, t0, t_fit, t_test, t_done, timing: TimingCallback, steps: int, batch: int) -> dict:
    """Seconds per phase of the cell (``start``: interpreter and imports before run_cell; ``setup``: data, model,
    logger, trainer; ``train`` / ``validate`` inside fit; ``fit_other``: the rest of fit (checkpointing, epoch
    hooks); ``test``: reload of the best checkpoint and the test pass) and the training rate (optimiser steps x
    batch per minute of ``train``). Writing the outputs comes after and is not included."""
    fit = t_test - t_fit
    out = {"start": started_s, "setup": t_fit - t0, "train": timing.train_s, "validate": timing.val_s,
           "fit_other": max(0.0, fit - timing.train_s - timing.val_s), "test": t_done - t_test,
           "steps": int(steps), "batch": int(batch)}
    out["train_images_per_min"] = steps * batch / timing.train_s * 60 if timing.train_s > 0 else float("nan")
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def _best_epoch(rows: list[dict], monitor: str, mode: str):
    vals = [(r["epoch"], r[monitor]) for r in rows if monitor in r]
    if not vals:
        return None
    return (max if mode == "max" else min)(vals, key=lambda x: x[1])[0]


def _wandb_test_extras(logger, dm, model, res, metrics) -> None:
    """Per-label test table and a few test faces with their predictions."""
    names = dm.task_spec.names
    test = res["metrics"]
    cols = ["label"] + sorted({k.split("/")[0] for k in test if "/" in k})
    data = [[n] + [test.get(f"{c}/{n}") for c in cols[1:]] for n in names]
    logger.log_table("test/per_label", columns=cols, data=data)
    for k, v in test.items():
        if "/" not in k:
            logger.experiment.summary[f"test/{k}"] = v
    try:
        ds = dm.split_sources["test"]
        preds = res["predictions"]
        idx = preds["sample"][:8].numpy()
        images, captions = [], []
        for i, r in enumerate(idx):
            images.append(np.asarray(ds.images[int(r)]))
            s = preds["scores"][i].numpy()
            if dm.task_spec.kind == "expression":
                captions.append(f"pred {names[int(s.argmax())]}")
            else:
                thr = 0.5 if dm.task_spec.kind == "au" else dm.task_spec.positive_threshold
                captions.append("pred " + ",".join(n for n, v in zip(names, s) if v >= thr))
        logger.log_image("test/samples", images=images, caption=captions)
    except Exception as e:  # images are a convenience; never fail a finished cell over them
        print(f"warning: could not log sample images to W&B: {e}", file=sys.stderr)


def evaluate_checkpoint(ckpt: str | Path, out_json: str | Path, devices: int = 1, data_root: str | None = None,
                        accelerator: str = "cpu") -> dict | None:
    """Test a stored checkpoint on its fold with ``devices`` processes (DDP when > 1); rank 0 writes metrics.

    Every test sample is scored exactly once whatever the number of processes (UnrepeatedDistributedSampler
    in the DataModule, cat-reduced metric states), so the result must equal a single-process run.
    """
    import torch

    from aurecog.models.registry import family_class

    ckpt = checkpoint_path(Path(ckpt))
    if not ckpt.exists():
        raise FileNotFoundError(f"no checkpoint {ckpt} (give a .ckpt file or a run folder that has "
                                f"{CHECKPOINT})")
    hp = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    cfg = hp["cfg"]
    model = family_class(cfg["model"]["family"]).load_from_checkpoint(ckpt, map_location="cpu")
    dm = build_datamodule(cfg, int(cfg.get("fold", 0)), data_root, progress=False)
    precision = (cfg.get("trainer") or {}).get("precision", "32-true")  # as the cell tested (bf16: autocast)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision=precision, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, enable_checkpointing=False)
    trainer.test(model, datamodule=dm, verbose=False)
    if trainer.global_rank != 0:
        return None
    res = model.test_results
    out = {"metrics": res["metrics"], "n_test": int(len(res["predictions"]["sample"])),
           "samples": sorted(res["predictions"]["sample"].tolist()), "world_size": trainer.world_size}
    atomic_write_json(Path(out_json), out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m aurecog.runner.cell <spec.json>", file=sys.stderr)
        return 2
    from aurecog.runner.launchers import guard_process

    guard_process()  # die with the process that started this one (the runner, or rank 0 for DDP ranks)
    spec = json.loads(Path(argv[0]).read_text())
    run_cell(spec["config"], spec["fold"], spec["seed"], Path(spec["run_dir"]), data_root=spec.get("data_root"),
             wandb_mode=spec.get("wandb_mode", "offline"), progress=spec.get("progress", True),
             status_path=spec.get("status_path"), identity=spec.get("identity"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
