"""Leaderboards, generated only from stored run folders (``results/runs/<dataset>/<model>/<fold>-<seed>/``).

Aggregation, as the papers do it:

* AU occurrence / intensity: the metric per fold (per-AU F1, ICC, MAE), averaged over the folds of a seed
  (JAA-Net and the four papers report the 3-fold average);
* expression: per-class accuracy pooled over the folds' test predictions (IERN's ``measure_acc`` pools
  TP/GT over the three folds);
* then mean +/- standard deviation over seeds.

The papers' reported numbers come from ``results/reported/*.csv`` (long format: paper, table, dataset,
protocol, model, paper_row, metric, label, value); rows of our registered variants sit in the same table,
marked *reported*, with a gap column on our rows. On SynthAU presets the rows of the real dataset the preset
mirrors (dataset config key ``reference``) are shown for orientation only, without a gap.

Outputs ``results/<dataset>/leaderboard.{md,csv}`` (deterministic: same run folders -> same bytes) and PNG
plots: per-label scores by model, per-subject PCC similarity (CISNet Fig. 5 analysis), training curves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from aurecog import config as C
from aurecog.config import REPO_ROOT

PRIMARY = {"au": "f1", "intensity": "icc", "expression": "acc"}
SECONDARY = {"intensity": ["mae"]}


def load_runs(results: Path, dataset: str) -> list[dict]:
    runs = []
    base = results / "runs" / dataset
    # <model>/<fold>-<seed>/ (default protocol and task) and <model>/<protocol>[-<task>]/<fold>-<seed>/
    for mfile in sorted([*base.glob("*/*/metrics.json"), *base.glob("*/*/*/metrics.json")]):
        m = json.loads(mfile.read_text())
        m["_dir"] = mfile.parent
        runs.append(m)
    return runs


def _pooled_expression(run_dirs: list[Path], labels: list[str]) -> dict[str, float]:
    frames = [pd.read_parquet(d / "predictions.parquet") for d in run_dirs]
    df = pd.concat(frames, ignore_index=True)
    scores = df[[f"score_{n}" for n in labels]].to_numpy()
    pred, target = scores.argmax(1), df["target"].to_numpy()
    out = {}
    for j, n in enumerate(labels):
        m = target == j
        out[f"acc/{n}"] = float((pred[m] == j).mean()) if m.any() else float("nan")
    out["acc"] = float(np.nanmean([out[f"acc/{n}"] for n in labels]))
    out["acc_overall"] = float((pred == target).mean())
    return out


def aggregate(runs: list[dict]) -> pd.DataFrame:
    """One row per (model, protocol, profile): per-label means and stds over seeds."""
    rows = []
    key = lambda r: (r["model"], r.get("protocol"), r["profile"], r["task"])  # noqa: E731
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    for (model, protocol, profile, task), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        labels = rs[0]["labels"]
        metric = PRIMARY[task]
        names = [metric] + SECONDARY.get(task, [])
        per_seed: dict[int, dict[str, float]] = {}
        for seed in sorted({r["seed"] for r in rs}):
            srs = sorted((r for r in rs if r["seed"] == seed), key=lambda r: r["fold"])
            if task == "expression":
                per_seed[seed] = _pooled_expression([r["_dir"] for r in srs], labels)
            else:
                vals: dict[str, float] = {}
                for n in names:
                    for lab in [None] + labels:
                        k = n if lab is None else f"{n}/{lab}"
                        vals[k] = float(np.nanmean([r["test"].get(k, np.nan) for r in srs]))
                per_seed[seed] = vals
        seeds = sorted(per_seed)
        row = {"model": model, "group": rs[0]["group"], "family": rs[0]["family"], "protocol": protocol,
               "profile": profile, "task": task, "source": "ours", "runs": len(rs), "seeds": len(seeds),
               "folds": len({r["fold"] for r in rs})}
        for n in names:
            for lab in labels + [None]:
                k = n if lab is None else f"{n}/{lab}"
                v = np.array([per_seed[s].get(k, np.nan) for s in seeds], dtype=float)
                row[k] = float(np.nanmean(v)) if len(v) else np.nan
                row[f"{k}_std"] = float(np.nanstd(v)) if len(v) > 1 else np.nan
        pcc = [v for r in rs for v in (r.get("pcc_similarity") or {}).values() if v == v]
        row["pcc_similarity"] = float(np.mean(pcc)) if pcc else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _f1_mean(df: pd.DataFrame, labels: list[str]) -> float:
    """Mean over labels of frame-based F1 (threshold 0.5, unknown targets excluded); labels without any
    positive target or prediction in ``df`` are left out (F1 undefined)."""
    vals = []
    for n in labels:
        t, p = df[f"target_{n}"].to_numpy(), df[f"score_{n}"].to_numpy() >= 0.5
        known = t >= 0
        pos = t[known] > 0.5
        tp = float((pos & p[known]).sum())
        den = 2 * tp + float((~pos & p[known]).sum()) + float((pos & ~p[known]).sum())
        if den > 0:
            vals.append(2 * tp / den)
    return float(np.mean(vals)) if vals else float("nan")


def habit_breakdown(runs: list[dict]) -> pd.DataFrame:
    """SynthAU subject-bias analysis (AU tasks): mean F1 on the test subjects whose habits some training
    subject shares ('common') and on the contrarian subjects whose habits contradict those of the same-looking
    training subjects, per fold, then mean over folds and seeds. Needs ``test_habits`` in metrics.json."""
    rows = []
    for r in runs:
        if r["task"] != "au" or not r.get("test_habits"):
            continue
        preds = pd.read_parquet(r["_dir"] / "predictions.parquet")
        contrarian = {s for s, h in r["test_habits"].items() if h["contrarian"]}
        is_c = preds["subject"].astype(str).isin(contrarian).to_numpy()
        rows.append({"model": r["model"], "group": r["group"], "family": r["family"], "seed": r["seed"],
                     "fold": r["fold"], "common": _f1_mean(preds[~is_c], r["labels"]),
                     "contrarian": _f1_mean(preds[is_c], r["labels"]) if is_c.any() else float("nan")})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    per_seed = df.groupby(["family", "group", "model", "seed"])[["common", "contrarian"]].mean().reset_index()
    out = per_seed.groupby(["family", "group", "model"])[["common", "contrarian"]].mean().reset_index()
    out["drop"] = out["common"] - out["contrarian"]
    out["runs"] = df.groupby(["family", "group", "model"]).size().to_numpy()
    return out


def load_reported(results: Path, reported_dataset: str | None) -> pd.DataFrame:
    """Reported rows of one dataset from every ``results/reported/*.csv``."""
    files = sorted((results / "reported").glob("*.csv"))
    if not files or not reported_dataset:
        return pd.DataFrame()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return df[df["dataset"].astype(str).str.lower() == reported_dataset.lower()].reset_index(drop=True)


def _fmt(v: float, scale: float = 100.0) -> str:
    return "" if v is None or v != v else f"{v * scale:.1f}"


def render(dataset: str, results: Path | None = None, plots: bool = True) -> tuple[Path, Path] | None:
    """Write the leaderboard files of ``dataset``; returns (md, csv) paths, or None without runs."""
    results = Path(results or REPO_ROOT / "results")
    runs = load_runs(results, dataset)
    if not runs:
        return None
    ds_cfg = C.load_dataset(dataset)
    agg = aggregate(runs)
    out_dir = results / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic = ds_cfg.get("source") == "synth"
    ref = ds_cfg.get("reference") or {"dataset": dataset}
    reported = load_reported(results, ref.get("dataset"))
    variants = C.model_variants()
    if not reported.empty:
        reported = reported[reported["model"].isin(list(variants))]

    lines = [f"# Leaderboard: {dataset}", "",
             "Generated by `make leaderboard` (`aurecog leaderboard --dataset " + dataset + "`) from "
             f"`results/runs/{dataset}/`; do not edit by hand.", ""]
    if synthetic and not reported.empty:
        lines += [f"Rows marked *reported* are the papers' numbers on {ref['dataset'].upper()} (the real dataset this "
                  "SynthAU preset mirrors), for orientation only: the data differ, so no gap is computed.", ""]
    for task, tdf in agg.groupby("task", sort=True):
        metric = PRIMARY[task]
        labels = next(r["labels"] for r in runs if r["task"] == task)
        how = "pooled over folds" if task == "expression" else "mean over folds"
        lines += [f"## Task: {task} ({metric} x 100, {how}, mean +/- std over seeds)", ""]
        header = ["model", "group"] + labels + ["mean", "+/-"]
        if task == "au":
            header.append("PCC sim.")
        if task == "intensity":
            header += ["MAE"]
        header += ["gap to reported", "profile", "protocol", "runs"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * len(header)) + "|")
        protocols = set(tdf["protocol"].astype(str))
        rep = pd.DataFrame()
        if not reported.empty:
            rep = reported[(reported["metric"] == metric)]
            theirs = {(ref.get("protocols") or {}).get(p, p) for p in protocols}
            rep = rep[rep["protocol"].astype(str).isin(theirs)]
        for _, r in tdf.sort_values(["family", "group", "model"]).iterrows():
            gap = ""
            if not synthetic and not rep.empty:
                mine = rep[(rep["model"] == r["model"]) & (rep["label"] == "mean")
                           & (rep["protocol"].astype(str) == str(r["protocol"]))]
                if len(mine):
                    gap = f"{r[metric] * 100 - float(mine['value'].iloc[0]):+.1f}"
            cells = [r["model"], r["group"]] + [_fmt(r[f"{metric}/{n}"]) for n in labels]
            cells += [_fmt(r[metric]), _fmt(r[f"{metric}_std"])]
            if task == "au":
                cells.append(f"{r['pcc_similarity']:.3f}" if r["pcc_similarity"] == r["pcc_similarity"] else "")
            if task == "intensity":
                cells.append(_fmt(r["mae"], 1.0) if "mae" in r else "")
            cells += [gap, r["profile"], str(r["protocol"]), str(r["runs"])]
            lines.append("| " + " | ".join(cells) + " |")
        if not rep.empty:
            piv = rep.pivot_table(index=["paper", "table", "model", "paper_row", "protocol"], columns="label",
                                  values="value", aggfunc="first").reset_index()
            for _, pr in piv.sort_values(["model", "paper", "table"]).iterrows():
                who = f"reported: {str(pr['paper']).split(',')[0]}, {pr['table']}"
                cells = [f"{pr['model']} (*{pr['paper_row']}*)", who]
                cells += ["" if n not in piv.columns or pd.isna(pr[n]) else f"{float(pr[n]):.1f}" for n in labels]
                cells += ["" if "mean" not in piv.columns or pd.isna(pr["mean"]) else f"{float(pr['mean']):.1f}", ""]
                cells += [""] * (len(header) - len(cells) - 2) + [str(pr["protocol"]), "reported"]
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    habits = habit_breakdown(runs) if synthetic else pd.DataFrame()
    if not habits.empty:
        lines += ["## Subject bias (SynthAU ground-truth habits)", "",
                  "Mean F1 x 100 on test subjects whose expression habits training subjects share (*common*) and on "
                  "the *contrarian* subjects, whose habits contradict those of the same-looking training subjects "
                  "(e.g. smiles without AU6). A model that leans on training-subject co-occurrence loses F1 on "
                  "the contrarians: compare the drop across models.", "",
                  "| model | group | F1 common | F1 contrarian | drop | runs |", "|---|---|---|---|---|---|"]
        for _, h in habits.sort_values(["family", "group", "model"]).iterrows():
            lines.append(f"| {h['model']} | {h['group']} | {_fmt(h['common'])} | {_fmt(h['contrarian'])} | "
                         f"{_fmt(h['drop'])} | {h['runs']} |")
        lines.append("")
    if plots:
        pngs = write_plots(dataset, runs, agg, out_dir)
        if pngs:
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    md = out_dir / "leaderboard.md"
    csv = out_dir / "leaderboard.csv"
    md.write_text("\n".join(lines))
    cols = [c for c in agg.columns]
    agg[cols].sort_values(["task", "family", "model"]).to_csv(csv, index=False, float_format="%.6f")
    return md, csv


def write_plots(dataset: str, runs: list[dict], agg: pd.DataFrame, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    meta = {"Software": None}
    for task, tdf in agg.groupby("task", sort=True):
        metric = PRIMARY[task]
        labels = next(r["labels"] for r in runs if r["task"] == task)
        tdf = tdf.sort_values(["family", "model"])
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
        width = 0.8 / max(1, len(tdf))
        x = np.arange(len(labels) + 1)
        for i, (_, r) in enumerate(tdf.iterrows()):
            vals = [r[f"{metric}/{n}"] * 100 for n in labels] + [r[metric] * 100]
            ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=r["model"])
        ax.set_xticks(x, labels + ["mean"], rotation=45)
        ax.set_ylabel(f"{metric} x 100")
        ax.set_title(f"{dataset}: per-label {metric}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / f"{task}_{metric}_per_label.png"
        fig.savefig(p, dpi=110, metadata=meta)
        plt.close(fig)
        out.append(p)
    # per-subject PCC similarity (AU tasks)
    pcc_rows = [(r["model"], s, v) for r in runs if r["task"] == "au"
                for s, v in (r.get("pcc_similarity") or {}).items() if v == v]
    if pcc_rows:
        df = pd.DataFrame(pcc_rows, columns=["model", "subject", "pcc"])
        models = sorted(df["model"].unique())
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(models) + 2), 4))
        ax.boxplot([df[df.model == m]["pcc"].to_numpy() for m in models], tick_labels=models)
        for i, m in enumerate(models):
            v = df[df.model == m]["pcc"].to_numpy()
            ax.scatter(np.full(len(v), i + 1) + np.linspace(-0.15, 0.15, len(v)), v, s=8, alpha=0.6)
        ax.set_ylabel("cosine sim. of AU correlation matrices")
        ax.set_title(f"{dataset}: per-test-subject PCC similarity (CISNet Fig. 5)")
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
        fig.tight_layout()
        p = out_dir / "pcc_similarity.png"
        fig.savefig(p, dpi=110, metadata=meta)
        plt.close(fig)
        out.append(p)
    # training curves: validation monitor per epoch, mean over folds/seeds
    curves = {}
    for r in runs:
        h = r["_dir"] / "history.csv"
        if not h.exists() or h.stat().st_size == 0:
            continue
        try:
            hist = pd.read_csv(h)
        except pd.errors.EmptyDataError:
            continue
        mon = r.get("monitor")
        if mon in hist.columns:
            curves.setdefault(r["model"], []).append(hist.set_index("epoch")[mon])
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in sorted(curves):
            s = pd.concat(curves[m], axis=1).mean(axis=1)
            ax.plot(s.index + 1, s.values, marker="o", ms=3, label=m)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation monitor")
        ax.set_title(f"{dataset}: validation curves (mean over folds and seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        p = out_dir / "training_curves.png"
        fig.savefig(p, dpi=110, metadata=meta)
        plt.close(fig)
        out.append(p)
    return out

