"""Leaderboard figures (PNG, deterministic bytes: no timestamp metadata), written next to leaderboard.md.

* ``<task>_heatmap.png``: model x label headline metric with the values printed (replaces the per-label bar chart,
  unreadable with 26 variants);
* ``<task>_points.png``: every row's mean with its 95% bootstrap interval, each (fold, seed) cell as a dot and each
  seed's mean as a square, the row's best trivial floor as a red tick;
* ``<task>_main_models.png`` (grids with many variants): the papers' main models and the baseline per label;
* ``claims_forest.png``: every tested claim's paired difference with its interval and the reported difference;
* ``pcc_similarity.png`` (CISNet Fig. 5 analysis) and ``training_curves.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from aurecog.models.cisnet import BANK_ONLY_MONITOR_VALUE

META = {"Software": None}  # no version/timestamp in the PNG: same runs -> same bytes
MANY = 8  # more rows than this: also draw the main-models figure
VERDICT_COLOURS = {"reproduced": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray",
                   "inconclusive (at floor)": "lightgray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, metadata=META, bbox_inches="tight")
    _plt().close(fig)
    return path


def _row_name(r) -> str:
    name = str(r["model"])
    if r.get("protocol_label"):
        name += f" [{r['protocol_label']}]"
    return name


def heatmap(dataset: str, task: str, metric: str, labels: list[str], rows: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    cols = labels + ["mean"]
    vals = np.array([[r[f"{metric}/{n}"] for n in labels] + [r[metric]] for _, r in rows.iterrows()], dtype=float)
    scale = 100.0 if metric != "icc" else 1.0
    fig, ax = plt.subplots(figsize=(0.62 * len(cols) + 3.2, 0.34 * len(rows) + 1.6))
    im = ax.imshow(vals * scale, cmap="viridis", aspect="auto", vmin=0, vmax=scale)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j] * scale
            if v == v:
                ax.text(j, i, f"{v:.0f}" if scale == 100 else f"{v + 0.0:.2f}".replace("-0.00", "0.00"),
                        ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * scale else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [_row_name(r) for _, r in rows.iterrows()], fontsize=8)
    ax.axvline(len(labels) - 0.5, color="white", lw=2)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label=metric if scale == 1 else f"{metric} x {scale:g}")
    ax.set_title(f"{dataset}: {metric} per label ({task})")
    fig.tight_layout()
    return _save(fig, out / f"{task}_heatmap.png")


def points(dataset: str, task: str, metric: str, rows: pd.DataFrame, cells: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    scale = 100.0 if metric != "icc" else 1.0
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.8))
    folds = sorted(cells["fold"].unique()) if len(cells) else []
    colours = plt.get_cmap("tab10")
    drawn: set = set()
    for i, (_, r) in enumerate(rows.iterrows()):
        y = len(rows) - 1 - i
        ax.plot([r[f"{metric}_lo"] * scale, r[f"{metric}_hi"] * scale], [y, y], color="black", lw=2, zorder=2)
        ax.scatter([r[metric] * scale], [y], marker="D", color="black", s=28, zorder=3)
        c = cells[cells["row_id"] == r["row_id"]]
        for k, f in enumerate(folds):
            v = c[c["fold"] == f]["value"].to_numpy() * scale
            ax.scatter(v, np.full(len(v), y + 0.22), s=12, color=colours(k % 10), zorder=4,
                       label=f"fold {f}" if i == 0 else None)
        fv = r.get("floor_value", np.nan)
        if fv == fv:  # this row's best floor (floors depend on the protocol's test labels)
            ax.plot([fv * scale] * 2, [y - 0.38, y + 0.38], color="tab:red", lw=1.5, zorder=1,
                    label=f"best floor ({r['floor']})" if r["floor"] not in drawn else None)
            drawn.add(r["floor"])
        seeds = c.groupby("seed")["value"].mean().to_numpy() * scale
        if len(seeds) > 1:
            ax.scatter(seeds, np.full(len(seeds), y - 0.22), s=16, marker="s", facecolors="none",
                       edgecolors="tab:purple", zorder=4, label="seed mean" if i == 0 else None)
    ax.set_yticks(range(len(rows)), [_row_name(r) for _, r in rows.iloc[::-1].iterrows()], fontsize=8)
    ax.set_xlabel(f"{metric} x {scale:g}: mean (diamond) with 95% bootstrap interval; dots: one (fold, seed) cell")
    ax.set_title(f"{dataset}: {task} rows, folds and seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, out / f"{task}_points.png")


def main_models(dataset: str, task: str, metric: str, labels: list[str], rows: pd.DataFrame, floor: dict | None,
                out: Path) -> Path:
    plt = _plt()
    scale = 100.0 if metric != "icc" else 1.0
    fig, ax = plt.subplots(figsize=(max(7, 0.75 * len(labels) + 3), 4.2))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(labels) + 1)
    colours = plt.get_cmap("tab10")
    for i, (_, r) in enumerate(rows.iterrows()):
        vals = np.array([r[f"{metric}/{n}"] for n in labels] + [r[metric]]) * scale
        xs = x + i * width - 0.4 + width / 2
        ax.bar(xs, vals, width, color=colours(i % 10), label=_row_name(r))
        err = [[vals[-1] - r[f"{metric}_lo"] * scale], [r[f"{metric}_hi"] * scale - vals[-1]]]
        ax.errorbar(xs[-1], vals[-1], yerr=err, color="black", capsize=3, lw=1)
    if floor is not None:  # the best floor per label: a red tick across each label's group of bars
        fv = np.array([floor.get(f"{metric}/{n}", np.nan) for n in labels] + [floor[metric]]) * scale
        ax.hlines(fv, x - 0.42, x + 0.42, color="tab:red", lw=1.5, label=floor["model"])
    ax.set_xticks(x, labels + ["mean"], rotation=45)
    ax.set_ylabel(f"{metric} x {scale:g}")
    ax.set_title(f"{dataset}: the papers' main models (mean with 95% bootstrap interval)")
    ax.legend(fontsize=7, ncol=min(4, len(rows) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    return _save(fig, out / f"{task}_main_models.png")


def forest(dataset: str, res: pd.DataFrame, out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12, 0.38 * len(res) + 1.9))
    names = []
    for i, (_, r) in enumerate(res.iterrows()):
        y = len(res) - 1 - i
        col = VERDICT_COLOURS.get(r["verdict"], "black")
        ax.plot([r["lo"], r["hi"]], [y, y], color=col, lw=2.5)
        ax.scatter([r["diff"]], [y], color=col, s=30, zorder=3)
        if r["reported_diff"] == r["reported_diff"]:
            ax.scatter([r["reported_diff"]], [y], marker="x", color="black", s=30, zorder=4,
                       label="reported" if "reported" not in ax.get_legend_handles_labels()[1] else None)
        if r["direction"] == "~" and r["margin"] == r["margin"]:
            seen = "equivalence margin" in ax.get_legend_handles_labels()[1]
            ax.plot([-r["margin"], r["margin"]], [y - 0.3, y - 0.3], color="tab:blue", lw=1,
                    label=None if seen else "equivalence margin")
        names.append(f"{r['paper']} {r['table']}: {r['model_a']} - {r['model_b']} ({r['metric']}, {r['protocol']})")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(res)), names[::-1], fontsize=7)
    for v, c in VERDICT_COLOURS.items():
        if (res["verdict"] == v).any():
            ax.plot([], [], color=c, lw=2.5, label=v)
    ax.set_xlabel("A - B (x100 for F1 / accuracy): dot and bar = ours with its 95% paired bootstrap interval")
    ax.set_title(f"{dataset}: the papers' claims" + (" (SynthAU, via the reference protocol)"
                                                     if bool(res["synthetic"].iloc[0]) else ""), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, out / "claims_forest.png")


def pcc_similarity(dataset: str, runs: list[dict], out: Path) -> Path | None:
    rows = [(r["model"], s, v) for r in runs if r["task"] == "au"
            for s, v in (r.get("pcc_similarity") or {}).items() if v == v]
    if not rows:
        return None
    plt = _plt()
    df = pd.DataFrame(rows, columns=["model", "subject", "pcc"])
    models = sorted(df["model"].unique())
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(models) + 2), 4))
    ax.boxplot([df[df.model == m]["pcc"].to_numpy() for m in models], tick_labels=models)
    for i, m in enumerate(models):
        v = df[df.model == m]["pcc"].to_numpy()
        ax.scatter(np.full(len(v), i + 1) + np.linspace(-0.15, 0.15, len(v)), v, s=8, alpha=0.6)
    ax.set_ylabel("cosine sim. of AU correlation matrices")
    ax.set_title(f"{dataset}: per-test-subject PCC similarity (CISNet Fig. 5)")
    import matplotlib.pyplot as mplt

    mplt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    return _save(fig, out / "pcc_similarity.png")


def training_curves(dataset: str, runs: list[dict], out: Path) -> Path | None:
    curves: dict[str, list] = {}
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
            # CISNet's bank-only first epoch is not validated: it logs a sentinel below any real score
            series = hist.set_index("epoch")[mon]
            curves.setdefault(r["model"], []).append(series.mask(series == BANK_ONLY_MONITOR_VALUE))
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(sorted(curves)):
        s = pd.concat(curves[m], axis=1).mean(axis=1)
        ax.plot(s.index + 1, s.values, marker="o", ms=3, label=m, color=cmap(i % 20),
                ls="-" if i < 20 else "--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation monitor")
    ax.set_title(f"{dataset}: validation curves (mean over folds and seeds)")
    ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, out / "training_curves.png")
