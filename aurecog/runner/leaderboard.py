"""Leaderboards, generated only from stored run folders (``results/runs/<dataset>/<model>/<fold>-<seed>/``).

Aggregation, as the papers do it:

* AU occurrence / intensity: the metric per fold (per-AU F1, ICC, MAE), averaged over the folds of a seed
  (JAA-Net and the four papers report the 3-fold average);
* expression: per-class accuracy pooled over the folds' test predictions (IERN's ``measure_acc`` pools
  TP/GT over the three folds);
* then the mean over seeds, with the standard deviation over seeds beside it.

Every row also gets a 95% interval from a subject-level bootstrap of the stored test predictions, F1-micro and
ROC-AUC (AU) or MAE (intensity) or overall accuracy (expression), and its difference from the best trivial floor
(:mod:`aurecog.runner.stats`); the papers' ablation claims are tested by paired differences
(:mod:`aurecog.runner.claims`). Rows are cells of one identity (metrics.json ``identity.row``; files without one
are ``legacy``): cells of different identities are never averaged into one row.

The papers' reported numbers come from ``results/reported/*.csv`` (long format: paper, table, dataset,
protocol, model, paper_row, metric, label, value); rows of our registered variants sit in the same table,
marked *reported*, with a gap column on our rows. On SynthAU presets the rows of the real dataset the preset
mirrors (dataset config key ``reference``) are shown for orientation only, without a gap.

Outputs ``results/<dataset>/leaderboard.{md,csv}``, ``results/<dataset>/claims.csv`` (deterministic: same run
folders -> same bytes; the bootstrap is seeded) and the PNG figures of :mod:`aurecog.runner.figures`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.runner import bias as B
from aurecog.runner import claims as CL
from aurecog.runner import figures as FIG
from aurecog.runner import stats as S

PRIMARY = S.HEADLINE
SECONDARY = {"intensity": ["mae"]}
LEGACY = "legacy"


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)
    print(f"warning: {msg}", file=sys.stderr)


def _provenance(m: dict, run_dir: Path) -> tuple[str, str, bool]:
    """(identity row, revision, dirty) of one cell; cells without ``identity`` are 'legacy' and take the revision
    from environment.json."""
    ident = m.get("identity") or {}
    if ident:
        return str(ident.get("row", LEGACY)), str(ident.get("revision", "unknown")), bool(ident.get("dirty", False))
    rev = "unknown"
    env = run_dir / "environment.json"
    try:
        rev = str(json.loads(env.read_text()).get("git_revision", "unknown"))
    except (OSError, ValueError):
        pass
    return LEGACY, rev, rev.endswith("-dirty")


def load_runs(results: Path, dataset: str) -> list[dict]:
    """Finished cells of ``dataset``; an unreadable or corrupt metrics.json is skipped with a warning naming it."""
    runs = []
    base = results / "runs" / dataset
    # <model>/<fold>-<seed>/ (default protocol and task) and <model>/<protocol>[-<task>]/<fold>-<seed>/
    for mfile in sorted([*base.glob("*/*/metrics.json"), *base.glob("*/*/*/metrics.json")]):
        try:
            m = json.loads(mfile.read_text())
            if not isinstance(m, dict) or not {"model", "task", "fold", "seed", "labels"} <= set(m):
                raise ValueError("not a metrics.json of a finished cell (model/task/fold/seed/labels missing)")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            _warn(f"skipping {mfile}: unreadable metrics.json ({type(e).__name__}: {str(e)[:80]}); rerun that cell "
                  "(the runner redoes it) or delete its folder")
            continue
        m["_dir"] = mfile.parent
        m["_identity"], m["_revision"], m["_dirty"] = _provenance(m, mfile.parent)
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


def _row_key(r: dict) -> tuple:
    return (r["model"], r.get("protocol"), r.get("profile"), r["task"], r.get("_identity", LEGACY))


def _row_key_of(a: pd.Series) -> tuple:
    """The :func:`_row_key` of an aggregated row."""
    return (a["model"], a["protocol"], a["profile"], a["task"], a["identity"])


def aggregate(runs: list[dict]) -> pd.DataFrame:
    """One row per (model, protocol, profile, task, identity): per-label means and sample standard deviations
    over seeds."""
    rows = []
    groups: dict = {}
    for r in runs:
        groups.setdefault(_row_key(r), []).append(r)
    for (model, protocol, profile, task, ident), rs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
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
        revs = sorted({r.get("_revision", "unknown") for r in rs})
        row = {"model": model, "group": rs[0].get("group", model), "family": rs[0].get("family", model),
               "protocol": protocol, "profile": profile, "task": task, "identity": ident,
               "revisions": " ".join(revs), "dirty": any(r.get("_dirty") for r in rs), "source": "ours",
               "runs": len(rs), "seeds": len(seeds), "folds": len({r["fold"] for r in rs})}
        for n in names:
            for lab in labels + [None]:
                k = n if lab is None else f"{n}/{lab}"
                v = np.array([per_seed[s].get(k, np.nan) for s in seeds], dtype=float)
                row[k] = float(np.nanmean(v)) if len(v) else np.nan
                row[f"{k}_std"] = float(np.nanstd(v, ddof=1)) if len(v) > 1 else np.nan  # sample sd over seeds
        pcc = [v for r in rs for v in (r.get("pcc_similarity") or {}).values() if v == v]
        row["pcc_similarity"] = float(np.mean(pcc)) if pcc else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _f1_mean(df: pd.DataFrame, labels: list[str]) -> float:
    """Mean over labels of frame-based F1 (score > 0.5, unknown targets excluded); labels without any
    positive target or prediction in ``df`` are left out (F1 undefined)."""
    vals = []
    for n in labels:
        t, p = df[f"target_{n}"].to_numpy(), df[f"score_{n}"].to_numpy() > S.AU_THRESHOLD  # as torchmetrics
        known = t >= 0
        pos = t[known] > 0.5
        tp = float((pos & p[known]).sum())
        den = 2 * tp + float((~pos & p[known]).sum()) + float((pos & ~p[known]).sum())
        if den > 0:
            vals.append(2 * tp / den)
    return float(np.mean(vals)) if vals else float("nan")


def load_reported(results: Path, reported_dataset: str | None) -> pd.DataFrame:
    """Reported rows of one dataset from every ``results/reported/*.csv`` but the claims table."""
    files = sorted(f for f in (results / "reported").glob("*.csv") if f.name != "claims.csv")
    if not files or not reported_dataset:
        return pd.DataFrame()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return df[df["dataset"].astype(str).str.lower() == reported_dataset.lower()].reset_index(drop=True)


def _fmt(v: float, scale: float = 100.0, digits: int = 1) -> str:
    return "" if v is None or v != v else f"{v * scale:.{digits}f}"


def _ci(lo: float, hi: float, scale: float = 100.0, digits: int = 1) -> str:
    return "" if lo != lo or hi != hi else f"[{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def _val_ci(v: float, lo: float, hi: float, scale: float, digits: int) -> str:
    return f"{_fmt(v, scale, digits)} {_ci(lo, hi, scale, digits)}".strip()


def render(dataset: str, results: Path | None = None, plots: bool = True, draws: int = S.DRAWS,
           seed: int = S.SEED) -> tuple[Path, Path] | None:
    """Write the leaderboard files of ``dataset``; returns (md, csv) paths, or None without runs."""
    results = Path(results or REPO_ROOT / "results")
    runs = load_runs(results, dataset)
    if not runs:
        return None
    ds_cfg = C.load_dataset(dataset)
    agg = aggregate(runs)
    groups: dict = {}
    for r in runs:
        groups.setdefault(_row_key(r), []).append(r)
    unc = S.Uncertainty(dataset, {i: groups[_row_key_of(a)] for i, a in agg.iterrows()}, agg, draws, seed)
    extra = pd.DataFrame([unc.row_columns(i) for i in agg.index], index=agg.index)
    agg = pd.concat([agg, extra], axis=1)
    agg["row_id"] = agg.index
    out_dir = results / dataset
    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic = ds_cfg.get("source") == "synth"
    ref = ds_cfg.get("reference") or {"dataset": dataset}
    reported = load_reported(results, ref.get("dataset"))
    variants = C.model_variants()
    if not reported.empty:
        reported = reported[reported["model"].isin(list(variants))]
    claims = CL.applicable(CL.load_claims(results), dataset, ds_cfg)
    tested = CL.evaluate_claims(claims, agg, unc.difference) if not claims.empty else pd.DataFrame()
    seeds = sorted({r["seed"] for r in runs})

    lines = [f"# Leaderboard: {dataset}", "",
             "Generated by `make leaderboard` (`aurecog leaderboard --dataset " + dataset + "`) from "
             f"`results/runs/{dataset}/`; do not edit by hand.", "",
             f"Every number comes with a 95% interval from a subject-level bootstrap of the stored test predictions "
             f"({draws} draws, seed {seed}; test subjects resampled within each fold, the {len(seeds)} seed(s) "
             "pooled). *mean* is the papers' statistic; *seed sd* the sample standard deviation over seeds (empty "
             "with one seed); *vs best floor* the paired difference from the best trivial predictor, marked "
             "**at floor** when its interval does not exclude 0.", ""]
    if synthetic and not reported.empty:
        lines += [f"Rows marked *reported* are the papers' numbers on {ref['dataset'].upper()} (the real dataset this "
                  "SynthAU preset mirrors), for orientation only: the data differ, so no gap is computed.", ""]
    floor_tables, cells = {}, []
    for task, tdf in agg.groupby("task", sort=True):
        lines += _task_table(task, tdf, runs, unc, reported, ref, synthetic, floor_tables)
        for i in tdf.index:
            cells += unc.cells(i)
    lines += CL.markdown(tested, dataset, ref.get("dataset"), draws)
    answers = pd.DataFrame()
    if synthetic:
        row_runs = {i: groups[_row_key_of(a)] for i, a in agg.iterrows()}
        gaps = B.HabitGaps(dataset, agg, row_runs, draws, seed)
        answers = B.answer(B.load_questions(), dataset, agg, gaps, unc.difference)
        lines += B.markdown(agg, gaps, answers, draws)
    lines += _provenance_section(agg)
    if plots:
        pngs = write_plots(dataset, runs, agg, pd.DataFrame(cells), floor_tables, tested, variants, out_dir)
        if pngs:
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    md = out_dir / "leaderboard.md"
    csv = out_dir / "leaderboard.csv"
    md.write_text("\n".join(lines))
    cols = [c for c in agg.columns if c != "row_id"]
    agg[cols].sort_values(["task", "family", "model", "identity"]).to_csv(csv, index=False, float_format="%.6f")
    study_csv = out_dir / "study.csv"
    if not answers.empty:
        answers.to_csv(study_csv, index=False, float_format="%.4f")
    elif study_csv.exists():
        study_csv.unlink()
    claims_csv = out_dir / "claims.csv"
    if not tested.empty:
        tested.to_csv(claims_csv, index=False, float_format="%.4f")
    elif claims_csv.exists():
        claims_csv.unlink()
    return md, csv


def _task_table(task, tdf, runs, unc, reported, ref, synthetic, floor_tables) -> list[str]:
    metric = PRIMARY[task]
    labels = next(r["labels"] for r in runs if r["task"] == task)
    how = "pooled over folds" if task == "expression" else "mean over folds"
    second = {"au": ("F1-micro", "f1_micro"), "intensity": ("MAE", "mae"),
              "expression": ("overall acc.", "acc_overall")}
    s_name, s_key = second[task]
    s_scale, s_digits = (1.0, 2) if s_key == "mae" else (100.0, 1)
    title = {"au": "F1 at 0.5", "intensity": "ICC(3,1), the consistency form", "expression": "per-class accuracy"}
    unit = metric if metric == "icc" else f"{metric} x 100"
    lines = [f"## Task: {task} ({unit} = {title[task]}, {how}; mean over seeds)", ""]
    header = ["model", "group"] + labels + ["mean", "95% CI", "seed sd", f"{s_name} [95% CI]"]
    if task == "au":
        header += ["ROC-AUC", "PCC sim."]
    header += ["vs best floor", "gap to reported", "profile", "protocol", "cells (folds x seeds)", "identity"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    protocols = set(tdf["protocol"].astype(str))
    rep = pd.DataFrame()
    if not reported.empty:
        rep = reported[(reported["metric"] == metric)]
        theirs = {(ref.get("protocols") or {}).get(p, p) for p in protocols}
        rep = rep[rep["protocol"].astype(str).isin(theirs)]
    m_scale = 1.0 if metric == "icc" else 100.0
    m_digits = 2 if metric == "icc" else 1
    for _, r in tdf.sort_values(["family", "group", "model", "identity"]).iterrows():
        gap = ""
        if not synthetic and not rep.empty:
            mine = rep[(rep["model"] == r["model"]) & (rep["label"] == "mean")
                       & (rep["protocol"].astype(str) == str(r["protocol"]))]
            if len(mine):
                gap = f"{r[metric] * m_scale - float(mine['value'].iloc[0]):+.{m_digits}f}"
        name = r["model"] + (" †" if r["dirty"] else "")
        cells = [name, r["group"]] + [_fmt(r[f"{metric}/{n}"], m_scale, m_digits) for n in labels]
        cells += [_fmt(r[metric], m_scale, m_digits), _ci(r.get(f"{metric}_lo", np.nan), r.get(f"{metric}_hi", np.nan),
                                                         m_scale, m_digits),
                  _fmt(r[f"{metric}_std"], m_scale, m_digits)]
        s_val = r[s_key] if s_key in r and r[s_key] == r[s_key] else r.get(f"{s_key}_boot", np.nan)
        cells.append(_val_ci(s_val, r.get(f"{s_key}_lo", np.nan), r.get(f"{s_key}_hi", np.nan), s_scale, s_digits))
        if task == "au":
            cells.append(_fmt(r.get("auc", np.nan)))
            cells.append(f"{r['pcc_similarity']:.3f}" if r["pcc_similarity"] == r["pcc_similarity"] else "")
        vs = ""
        if r.get("floor") == r.get("floor"):
            vs = f"{r['vs_floor'] * m_scale:+.{m_digits}f} {_ci(r['vs_floor_lo'], r['vs_floor_hi'], m_scale, m_digits)}"
            vs += " **at floor**" if r["at_floor"] else ""
        cells += [vs, gap, r["profile"], str(r["protocol"]), f"{r['folds']} x {r['seeds']}", str(r["identity"])[:16]]
        lines.append("| " + " | ".join(cells) + " |")
    for proto, pdf in tdf.groupby("protocol", sort=True):
        first = pdf.sort_values(["family", "model"]).index[0]
        frows = unc.floor_rows(first)
        floor_tables[(task, proto)] = frows
        for f in frows:
            cells = [f["model"], f["group"]] + [_fmt(f.get(f"{metric}/{n}", np.nan), m_scale, m_digits) for n in labels]
            cells += [_fmt(f[metric], m_scale, m_digits), _ci(f[f"{metric}_lo"], f[f"{metric}_hi"], m_scale, m_digits)]
            cells += ["", _val_ci(f[s_key], f[f"{s_key}_lo"], f[f"{s_key}_hi"], s_scale, s_digits)]
            if task == "au":
                cells += [_fmt(f["auc"]), ""]
            cells += ["", "", "", str(proto), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    if not rep.empty:
        piv = rep.pivot_table(index=["paper", "table", "model", "paper_row", "protocol"], columns="label",
                              values="value", aggfunc="first").reset_index()
        for _, pr in piv.sort_values(["model", "paper", "table"]).iterrows():
            who = f"reported: {str(pr['paper']).split(',')[0]}, {pr['table']}"
            cells = [f"{pr['model']} (*{pr['paper_row']}*)", who]
            cells += ["" if n not in piv.columns or pd.isna(pr[n]) else f"{float(pr[n]):.1f}" for n in labels]
            cells += ["" if "mean" not in piv.columns or pd.isna(pr["mean"]) else f"{float(pr['mean']):.1f}"]
            cells += [""] * (len(header) - len(cells) - 3) + [str(pr["protocol"]), "reported", ""]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    floors = tdf.dropna(subset=["floor"]) if "floor" in tdf else tdf.iloc[:0]
    if len(floors):
        lines += ["Floors (the *floor* rows): every AU present (or the majority class) scored on each fold's test "
                  "labels, and a constant score at the training-set prevalence (or mean level) stored in each "
                  "cell's metrics.json (its row says *training labels*; *test labels* where a cell stores none, an "
                  "optimistic floor). *vs best floor* compares each model with the best of them. "
                  f"{int(floors['at_floor'].sum())} of {len(floors)} rows are **at floor**. † marks rows from an "
                  "uncommitted (dirty) tree.", ""]
    if task == "au":
        lines += _auc_table(tdf, labels)
    return lines


def _auc_table(tdf: pd.DataFrame, labels: list[str]) -> list[str]:
    lines = ["### ROC-AUC x 100 per AU (threshold-free; mean over folds, then seeds; a constant score gets 50)", "",
             "| model | " + " | ".join(labels) + " | mean |", "|" + "|".join(["---"] * (len(labels) + 2)) + "|"]
    for _, r in tdf.sort_values(["family", "group", "model", "identity"]).iterrows():
        lines.append(f"| {r['model']} | " + " | ".join(_fmt(r.get(f"auc/{n}", np.nan)) for n in labels)
                     + f" | {_fmt(r.get('auc', np.nan))} |")
    return lines + [""]


def _provenance_section(agg: pd.DataFrame) -> list[str]:
    lines = ["## Provenance", "", "Each row is made of cells of one identity (metrics.json `identity.row`; cells "
             "written before identities existed are `legacy`). Revisions the rows come from:", "",
             "| identity | revision(s) | uncommitted tree | rows |", "|---|---|---|---|"]
    for ident, g in agg.groupby("identity", sort=True):
        revs = sorted({x for s in g["revisions"] for x in str(s).split()})
        lines.append(f"| {ident} | {', '.join(revs)} | {'yes' if g['dirty'].any() else 'no'} | {len(g)} |")
    return lines + [""]


def write_plots(dataset, runs, agg, cells, floor_tables, tested, variants, out_dir: Path) -> list[Path]:
    out = []
    for task, tdf in agg.groupby("task", sort=True):
        metric = PRIMARY[task]
        labels = next(r["labels"] for r in runs if r["task"] == task)
        tdf = tdf.sort_values(["family", "group", "model", "identity"]).copy()
        several = tdf["protocol"].nunique() > 1
        tdf["protocol_label"] = tdf["protocol"].astype(str) if several else ""
        out.append(FIG.heatmap(dataset, task, metric, labels, tdf, out_dir))
        fl = [f for (t, _), fs in floor_tables.items() if t == task for f in fs]
        best = max(fl, key=lambda f: f[metric]) if fl else None
        tcells = cells[cells["row_id"].isin(tdf["row_id"])] if len(cells) else cells
        out.append(FIG.points(dataset, task, metric, tdf, tcells, out_dir))
        if tdf["model"].nunique() > FIG.MANY:
            main = tdf[[bool(variants.get(m, {}).get("main")) or m == "baseline" for m in tdf["model"]]]
            if len(main):
                out.append(FIG.main_models(dataset, task, metric, labels, main, best, out_dir))
    if not tested.empty:
        out.append(FIG.forest(dataset, tested, out_dir))
    for p in (FIG.pcc_similarity(dataset, runs, out_dir), FIG.training_curves(dataset, runs, out_dir)):
        if p is not None:
            out.append(p)
    return out

