"""W&B for one benchmark dataset: the summary run and the project dashboard, defined as code.

* :func:`log_summary_to_wandb`: one summary run per `make bench` (group ``<dataset>/summary``, job type
  ``leaderboard``) that logs the files the leaderboard wrote to ``results/<dataset>/`` (interfaces.md, point 6):
  ``leaderboard.csv`` and, when present, ``claims.csv`` as W&B tables (with their confidence-interval columns
  as written), and every PNG of the folder as an image under its file stem (``au_heatmap``, ``claims_forest``...).
* :func:`build_dashboard`: the project workspace as a ``wandb_workspaces`` object, built without any network
  access: the cell runs of the dataset grouped per model (each group's line is the mean over its fold/seed runs,
  the shading their min-max range), the leaderboard and claims tables and the figures of the summary run.
  :func:`log_summary_to_wandb` saves it to the project only in ``online`` mode.

The cell runs are logged by :mod:`aurecog.runner.cell` (group ``<dataset>/<model>``, config = the resolved cell
config, so ``dataset`` and ``model.name`` are config keys).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

#: headline metric of each task (the leaderboard's PRIMARY; duplicated here to keep the W&B layer free of the
#: leaderboard's imports), and the validation metric the cell runs log per epoch (``val/<metric>``)
TASK_METRIC = {"au": "f1", "intensity": "icc", "expression": "acc"}
SUMMARY_TABLES = ("leaderboard", "claims")
GROUP_KEY = "model.name"  # cell-run config key the dashboard groups by


def summary_files(out_dir: Path) -> dict:
    """The leaderboard files of one results folder: ``{"leaderboard": csv, "claims": csv or None, "pngs": [...]}``."""
    out_dir = Path(out_dir)
    claims = out_dir / "claims.csv"
    return {"leaderboard": out_dir / "leaderboard.csv", "claims": claims if claims.exists() else None,
            "pngs": sorted(out_dir.glob("*.png"))}


def build_dashboard(dataset: str, entity: str, project: str, tasks: list[str] | tuple[str, ...] = ("au",),
                    figures: list[str] | tuple[str, ...] = (), name: str | None = None):
    """The W&B workspace of ``dataset`` (a ``wandb_workspaces.workspaces.Workspace``; nothing is sent).

    ``tasks``: the leaderboard's tasks (picks the metrics of the curves and bars); ``figures``: the image keys
    the summary run logs (PNG stems; default ``<task>_heatmap`` and ``claims_forest``)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    tasks = [t for t in tasks if t in TASK_METRIC] or ["au"]
    figures = list(figures) or [f"{t}_heatmap" for t in tasks] + ["claims_forest"]
    metrics = [TASK_METRIC[t] for t in tasks]
    group = wr.Config(GROUP_KEY)
    curves = [wr.LinePlot(title=f"validation {m} per model (mean, min-max over folds and seeds)", x="Step",
                          y=[f"val/{m}"], groupby=group, groupby_aggfunc="mean", groupby_rangefunc="minmax")
              for m in metrics]
    curves.append(wr.LinePlot(title="training loss per model (mean, min-max over folds and seeds)", x="Step",
                              y=["train/loss"], groupby=group, groupby_aggfunc="mean", groupby_rangefunc="minmax"))
    bars = [wr.BarPlot(title=f"test {m} per model (mean +/- std over folds and seeds)", metrics=[f"test/{m}"],
                       groupby=group, groupby_aggfunc="mean", groupby_rangefunc="stddev") for m in metrics]
    sections = [
        ws.Section(name=f"{dataset}: leaderboard and claims", is_open=True, panels=[
            wr.WeavePanelSummaryTable(table_name=t) for t in SUMMARY_TABLES]),
        ws.Section(name=f"{dataset}: figures", is_open=True, panels=[
            wr.MediaBrowser(title=f, media_keys=[f], num_columns=1) for f in figures]),
        ws.Section(name=f"{dataset}: runs per model", is_open=True, panels=curves + bars),
    ]
    return ws.Workspace(
        entity=entity, project=project, name=name or f"aurecog {dataset}", sections=sections,
        runset_settings=ws.RunsetSettings(filters=[ws.Config("dataset") == dataset], groupby=[ws.Config(GROUP_KEY)]))


def log_summary_to_wandb(dataset: str, md: Path, csv: Path, wandb_mode: str) -> str | None:
    """One summary W&B run per `make bench`: the leaderboard and claims tables and the figures of ``md``'s
    folder. In ``online`` mode the dashboard (:func:`build_dashboard`) is saved to the project too; returns its
    URL (None otherwise). A dashboard that cannot be saved is a warning, never a failed benchmark."""
    if wandb_mode == "disabled":
        return None
    import wandb

    os.environ["WANDB_SILENT"] = "true"
    files = summary_files(Path(md).parent)
    project = os.environ.get("WANDB_PROJECT", "aurecog")
    run = wandb.init(project=project, group=f"{dataset}/summary", job_type="leaderboard", name=f"leaderboard-{dataset}",
                     mode=wandb_mode, dir=str(Path(md).parent), reinit="finish_previous",
                     config={"dataset": dataset, "model": {"name": "leaderboard"}})
    board = pd.read_csv(csv)
    run.log({"leaderboard": wandb.Table(dataframe=board)})
    if files["claims"] is not None:
        run.log({"claims": wandb.Table(dataframe=pd.read_csv(files["claims"]))})
    for p in files["pngs"]:
        run.log({p.stem: wandb.Image(str(p))})
    entity = run.entity
    run.finish()
    if wandb_mode != "online":
        return None
    tasks = sorted(set(board["task"].astype(str))) if "task" in board.columns else ["au"]
    try:
        view = build_dashboard(dataset, entity, project, tasks, [p.stem for p in files["pngs"]])
        view.save()
        return view.url
    except Exception as e:  # the dashboard is a convenience; the runs and tables are already logged
        print(f"warning: could not save the W&B dashboard of {dataset}: {e}", file=sys.stderr)
        return None
