"""Uncertainty of leaderboard numbers: per-subject sufficient statistics, a subject-level bootstrap stratified by
fold, paired differences, trivial floors and threshold-free metrics, all computed from a run's stored test
predictions (``predictions.parquet``).

The papers' statistic of a row (what the leaderboard headline reports):

* AU occurrence / intensity: the metric per fold (per-AU F1 at 0.5, or ICC(3,1) / MAE), its mean over AUs, the
  mean over the folds of a seed, then the mean over seeds;
* expression: per-class accuracy pooled over the folds of a seed (IERN's ``measure_acc``), its mean over classes,
  then the mean over seeds.

Bootstrap. Frames of one subject are strongly correlated, so the resampling unit is the test subject (cluster
``dataset/subject``), drawn with replacement *within each fold* (stratified: each fold keeps its size); all seeds of
a row see the same draw (seeds are pooled: a draw re-evaluates every seed's predictions on the same resampled
subjects and averages them as the papers do). Every metric here is a function of per-subject sums (TP/FP/FN per
AU; the six moments of (prediction, target) for ICC; per-class counts), so one draw is ``weights @ sums``: a
matrix product, not a re-evaluation of frames.

Why hand-written and not ``scipy.stats.bootstrap`` or ``rliable``: scipy resamples the observations of each
sample and evaluates one statistic per call, and rliable's stratified bootstrap resamples *runs* within tasks.
Here the unit is a subject inside a fold, and the same draws must be shared by every row, floor and claim of a
leaderboard so that differences are *paired* (same folds, seeds and resampled subjects for model A and model B).
One explicit weight matrix per fold gives that directly. The draw schedule is part of the contract
(:meth:`Resampler.indices`), which lets the tests check every draw against a plain re-evaluation of the resampled
frames with sklearn. Intervals are percentile intervals: BCa needs a jackknife over the clusters, which is
unstable with the six test subjects a SynthAU fold has.
"""

from __future__ import annotations

import warnings
import zlib
from collections import defaultdict

import numpy as np
import pandas as pd

DRAWS = 2000  # draws per leaderboard: on the committed synth runs, CI end points move <= 0.35 F1 points between seeds
SEED = 0  # base seed of the draws: the same run folders give the same bytes
LEVEL = 0.95  # two-sided confidence level of every interval
AU_THRESHOLD = 0.5  # = aurecog.metrics.AU_THRESHOLD (tested; no torch import here): F1 of score > 0.5, all four papers

HEADLINE = {"au": "f1", "intensity": "icc", "expression": "acc"}
# metrics (besides per-label ones) that a row reports with an interval
ROW_METRICS = {"au": ["f1", "f1_micro"], "intensity": ["icc", "mae"], "expression": ["acc", "acc_overall"]}
LOWER_IS_BETTER = {"mae"}


def clusters(df: pd.DataFrame) -> np.ndarray:
    """Bootstrap cluster of each frame: ``dataset/subject`` (subject ids may repeat across source datasets)."""
    return (df["dataset"].astype(str) + "/" + df["subject"].astype(str)).to_numpy()


def frame_stats(df: pd.DataFrame, kind: str, labels: list[str]) -> np.ndarray:
    """(frames, K) per-frame terms whose sums over frames determine every metric of :func:`metrics_from_sums`.

    au: [tp, fp, fn] per AU (unknown targets, -1, contribute nothing); intensity: [n, p, t, p^2, t^2, p*t, |p-t|]
    per AU over known targets; expression: [count, correct] per class."""
    if kind == "expression":
        scores = df[[f"score_{n}" for n in labels]].to_numpy()
        pred, target = scores.argmax(1), df["target"].to_numpy().astype(int)
        k = len(labels)
        count = (target[:, None] == np.arange(k)[None, :]).astype(float)
        correct = count * (pred == target)[:, None]
        return np.concatenate([count, correct], axis=1)
    t = df[[f"target_{n}" for n in labels]].to_numpy().astype(float)
    p = df[[f"score_{n}" for n in labels]].to_numpy().astype(float)
    known = (t >= 0).astype(float)
    if kind == "au":
        pos, hit = t > 0.5, p > AU_THRESHOLD  # torchmetrics binarises with preds > threshold
        tp = (pos & hit) * known
        fp = (~pos & hit) * known
        fn = (pos & ~hit) * known
        return np.concatenate([tp, fp, fn], axis=1)
    if kind == "intensity":
        p, t = p * known, np.where(known > 0, t, 0.0)
        return np.concatenate([known, p, t, p * p, t * t, p * t, np.abs(p - t)], axis=1)
    raise ValueError(f"unknown task kind {kind!r}")


def subject_sums(df: pd.DataFrame, kind: str, labels: list[str], subjects: list[str]) -> np.ndarray:
    """(len(subjects), K) sums of :func:`frame_stats` per cluster, in the order of ``subjects`` (zeros for a
    subject this cell has no frames of)."""
    terms = frame_stats(df, kind, labels)
    index = {s: i for i, s in enumerate(subjects)}
    rows = np.array([index[c] for c in clusters(df)], dtype=int)
    out = np.zeros((len(subjects), terms.shape[1]))
    np.add.at(out, rows, terms)
    return out


def _icc31(n, sp, st, spp, stt, spt):
    """ICC(3,1) (Shrout & Fleiss 1979, two-way mixed, *consistency*, single rater) of the two raters (prediction,
    target) from sums: (BMS - EMS) / (BMS + EMS); 0 where undefined, as :func:`aurecog.metrics.icc31_ratings`."""
    with np.errstate(invalid="ignore", divide="ignore"):
        grand = (sp + st) / (2 * n)
        ss_rows = 2 * ((spp + 2 * spt + stt) / 4 - n * grand**2)
        ss_cols = n * ((sp / n - grand) ** 2 + (st / n - grand) ** 2)
        ss_total = spp + stt - 2 * n * grand**2
        ss_err = ss_total - ss_rows - ss_cols
        bms, ems = ss_rows / (n - 1), ss_err / (n - 1)
        denom = bms + ems
        icc = (bms - ems) / denom
    icc = np.where((n > 1) & (denom > 1e-12), icc, 0.0)
    return np.where(np.abs(icc) < 1e-9, 0.0, icc)  # a constant prediction: exactly 0, not rounding noise


def metrics_from_sums(kind: str, sums: np.ndarray, labels: list[str]) -> dict[str, np.ndarray]:
    """Metrics of summed :func:`frame_stats` (``sums`` (..., K)); every value has shape ``sums.shape[:-1]``.

    au: ``f1/<AU>`` (0 where TP+FP+FN = 0, torchmetrics' zero_division), ``f1`` (mean over AUs), ``f1_micro``
    (pooled TP/FP/FN over AUs); intensity: ``icc/<AU>``, ``icc``, ``mae/<AU>``, ``mae`` (NaN-free means over AUs
    with labels); expression: ``acc/<class>`` (recall), ``acc`` (mean over classes present), ``acc_overall``."""
    n_lab = len(labels)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        if kind == "au":
            tp, fp, fn = (sums[..., i * n_lab:(i + 1) * n_lab] for i in range(3))
            den = 2 * tp + fp + fn
            f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
            for j, n in enumerate(labels):
                out[f"f1/{n}"] = f1[..., j]
            out["f1"] = f1.mean(-1)
            tps, den_s = tp.sum(-1), den.sum(-1)
            out["f1_micro"] = np.where(den_s > 0, 2 * tps / np.where(den_s > 0, den_s, 1), 0.0)
        elif kind == "intensity":
            n, sp, st, spp, stt, spt, sab = (sums[..., i * n_lab:(i + 1) * n_lab] for i in range(7))
            icc = _icc31(n, sp, st, spp, stt, spt)
            mae = np.where(n > 0, sab / n, np.nan)
            for j, lab in enumerate(labels):
                out[f"icc/{lab}"], out[f"mae/{lab}"] = icc[..., j], mae[..., j]
            out["icc"] = icc.mean(-1)
            out["mae"] = _nanmean(mae, -1)
        elif kind == "expression":
            count, correct = sums[..., :n_lab], sums[..., n_lab:]
            acc = np.where(count > 0, correct / np.where(count > 0, count, 1), np.nan)
            for j, lab in enumerate(labels):
                out[f"acc/{lab}"] = acc[..., j]
            out["acc"] = _nanmean(acc, -1)
            tot = count.sum(-1)
            out["acc_overall"] = np.where(tot > 0, correct.sum(-1) / np.where(tot > 0, tot, 1), np.nan)
        else:
            raise ValueError(f"unknown task kind {kind!r}")
    return out


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    ok = ~np.isnan(x)
    cnt = ok.sum(axis)
    return np.where(cnt > 0, np.where(ok, x, 0.0).sum(axis) / np.maximum(cnt, 1), np.nan)


class Resampler:
    """Subject draws shared by every row of one leaderboard: fold ``key`` with ``n`` subjects gets the index
    matrix ``default_rng([seed, crc32(key)]).integers(0, n, (draws, n))`` (draw b resamples subjects idx[b])."""

    def __init__(self, draws: int = DRAWS, seed: int = SEED):
        self.draws, self.seed = int(draws), int(seed)
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def indices(self, key: str, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        return rng.integers(0, n, size=(self.draws, n))

    def weights(self, key: str, n: int) -> np.ndarray:
        """(draws, n) multiplicities of each subject in each draw."""
        if (key, n) not in self._cache:
            idx = self.indices(key, n)
            flat = (idx + n * np.arange(self.draws)[:, None]).ravel()
            self._cache[(key, n)] = np.bincount(flat, minlength=self.draws * n).reshape(self.draws, n).astype(float)
        return self._cache[(key, n)]


def aggregate(kind: str, cells: dict[tuple[int, int], np.ndarray], labels: list[str]) -> dict[str, np.ndarray]:
    """The papers' statistic from per-cell sums ``{(fold, seed): sums (..., K)}``: per-fold metrics averaged over
    folds (au, intensity) or sums pooled over folds (expression), then the mean over seeds."""
    by_seed: dict[int, list] = defaultdict(list)
    for (_fold, seed), s in sorted(cells.items()):
        by_seed[seed].append(s)
    per_seed = [per_seed_value(kind, ss, labels) for _, ss in sorted(by_seed.items())]
    return {k: _nanmean(np.stack([p[k] for p in per_seed]), 0) for k in per_seed[0]}


def per_seed_value(kind: str, fold_sums: list[np.ndarray], labels: list[str]) -> dict[str, np.ndarray]:
    """One seed's statistic from its folds' sums (pooled for expression, mean of per-fold metrics otherwise)."""
    if kind == "expression":
        return metrics_from_sums(kind, sum(fold_sums), labels)
    per_fold = [metrics_from_sums(kind, s, labels) for s in fold_sums]
    return {k: _nanmean(np.stack([m[k] for m in per_fold]), 0) for k in per_fold[0]}


CLEAR = 1e-9  # an interval bound must exceed 0 by more than rounding noise to clear a floor


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap draws (NaN draws, a metric undefined on a resample, are left out)."""
    d = draws[~np.isnan(draws)]
    if not len(d):
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(d, [a, 100 - a])
    return float(lo), float(hi)


class RowData:
    """The test predictions of one leaderboard row reduced to per-subject sums per (fold, seed) cell, and the
    per-cell ROC-AUC (not a sum statistic, so reported without an interval)."""

    def __init__(self, kind: str, labels: list[str], fold_key: str):
        self.kind, self.labels, self.fold_key = kind, list(labels), fold_key
        self.frames: dict[tuple[int, int], pd.DataFrame] = {}
        self.prior: dict[tuple[int, int], dict | None] = {}

    def add(self, fold: int, seed: int, df: pd.DataFrame, prior: dict | None = None) -> None:
        self.frames[(fold, seed)] = df
        self.prior[(fold, seed)] = prior

    def subjects(self, fold: int) -> list[str]:
        return sorted({c for (f, _), df in self.frames.items() if f == fold for c in clusters(df)})


class Bootstrap:
    """Point values and draws of rows that share one :class:`Resampler` (and so can be differenced)."""

    def __init__(self, resampler: Resampler, fold_subjects: dict[str, list[str]]):
        self.resampler = resampler
        self.fold_subjects = fold_subjects  # "<fold_key>/<fold>" -> subjects, shared by every row of that fold

    def cell_sums(self, row: RowData, frames: dict[tuple[int, int], pd.DataFrame] | None = None):
        frames = row.frames if frames is None else frames
        out = {}
        for (fold, seed), df in frames.items():
            subjects = self.fold_subjects[f"{row.fold_key}/{fold}"]
            out[(fold, seed)] = subject_sums(df, row.kind, row.labels, subjects)
        return out

    def evaluate(self, row: RowData, sums: dict, keys=None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """(point values, draws (B,)) of every metric of ``row`` over the cells ``keys`` (default: all)."""
        keys = sorted(sums) if keys is None else sorted(keys)
        point = aggregate(row.kind, {k: sums[k].sum(0) for k in keys}, row.labels)
        drawn = {}
        for k in keys:
            fold = k[0]
            w = self.resampler.weights(f"{row.fold_key}/{fold}", sums[k].shape[0])
            drawn[k] = w @ sums[k]
        draws = aggregate(row.kind, drawn, row.labels)
        return {k: float(v) for k, v in point.items()}, draws


def paired_difference(boot: Bootstrap, row_a: RowData, sums_a: dict, row_b: RowData, sums_b: dict,
                      metric: str, level: float = LEVEL) -> dict:
    """A - B on the cells both rows have (same folds and seeds), with the same subject draws for both."""
    keys = sorted(set(sums_a) & set(sums_b))
    if not keys:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "cells": 0, "seeds": 0}
    pa, da = boot.evaluate(row_a, sums_a, keys)
    pb, db = boot.evaluate(row_b, sums_b, keys)
    lo, hi = interval(da[metric] - db[metric], level)
    return {"diff": pa[metric] - pb[metric], "lo": lo, "hi": hi, "cells": len(keys),
            "seeds": len({s for _, s in keys})}


# ------------------------------------------------------------------------------------------ leaderboard rows
class Uncertainty:
    """Bootstrap state of one leaderboard: the rows' prediction sums, their floors and the shared draws."""

    def __init__(self, dataset: str, groups: dict[int, list[dict]], agg: pd.DataFrame, draws: int, seed: int):
        """``groups``: row index of ``agg`` -> the finished cells (metrics.json dicts with ``_dir``) of that row."""
        self.draws = draws
        self.rows: dict[int, RowData] = {}
        for i, a in agg.iterrows():
            rs = groups[i]
            row = RowData(a["task"], rs[0]["labels"], f"{dataset}/{a['protocol']}/{a['task']}")
            for r in rs:
                p = r["_dir"] / "predictions.parquet"
                if not p.exists():
                    warnings.warn(f"{p} missing: row {a['model']} has no interval; rerun that cell", stacklevel=2)
                    continue
                prior = r.get("train_mean") if a["task"] == "intensity" else r.get("train_prevalence")
                row.add(r["fold"], r["seed"], pd.read_parquet(p), prior)
            self.rows[i] = row
        subjects: dict[str, set] = {}
        for row in self.rows.values():
            for fold in {f for f, _ in row.frames}:
                subjects.setdefault(f"{row.fold_key}/{fold}", set()).update(row.subjects(fold))
        self.boot = Bootstrap(Resampler(draws, seed), {k: sorted(v) for k, v in subjects.items()})
        self.sums = {i: self.boot.cell_sums(row) for i, row in self.rows.items()}
        self.floors: dict[int, dict[str, tuple]] = {}  # row -> floor name -> (RowData, sums, source)
        for i, row in self.rows.items():
            per_floor: dict[str, dict] = {}
            sources: dict[str, set] = {}
            for k, df in row.frames.items():
                for name, (fdf, src) in floor_frames(df, row.kind, row.labels, row.prior[k]).items():
                    per_floor.setdefault(name, {})[k] = fdf
                    sources.setdefault(name, set()).add(src)
            self.floors[i] = {n: (row, self.boot.cell_sums(row, fr), " + ".join(sorted(sources[n])))
                              for n, fr in sorted(per_floor.items())}

    def row_columns(self, i: int) -> dict:
        """Interval, F1-micro / MAE / overall accuracy, ROC-AUC and floor columns of row ``i``."""
        row, sums = self.rows[i], self.sums[i]
        if not sums:
            return {"at_floor": False}
        kind, head = row.kind, HEADLINE[row.kind]
        point, draws = self.boot.evaluate(row, sums)
        out: dict = {"draws": self.draws}
        for m in ROW_METRICS[kind]:
            out[f"{m}_boot"] = point[m]
            out[f"{m}_lo"], out[f"{m}_hi"] = interval(draws[m])
        if kind == "au":
            out["f1_micro"] = point["f1_micro"]
            aucs = {k: roc_auc(df, row.labels) for k, df in row.frames.items()}
            for n in ["auc"] + [f"auc/{lab}" for lab in row.labels]:
                out[n] = _seed_mean({k: v[n] for k, v in aucs.items()})
        best = None
        for name, (frow, fsums, src) in self.floors[i].items():
            fp, fd = self.boot.evaluate(frow, fsums)
            if best is None or fp[head] > best[1]:
                best = (name, fp[head], fd[head], src)
        name, value, fdraws, src = best
        lo, hi = interval(draws[head] - fdraws)
        out.update({"floor": name, "floor_source": src, "floor_value": value, "vs_floor": point[head] - value,
                    "vs_floor_lo": lo, "vs_floor_hi": hi, "at_floor": not lo > CLEAR})
        return out

    def floor_rows(self, i: int) -> list[dict]:
        """The trivial predictors evaluated on row ``i``'s cells, as leaderboard rows."""
        out = []
        for name, (frow, fsums, src) in self.floors[i].items():
            point, draws = self.boot.evaluate(frow, fsums)
            r = {"model": f"floor: {name}", "group": f"floor ({src})", **point}
            for m in ROW_METRICS[frow.kind]:
                r[f"{m}_lo"], r[f"{m}_hi"] = interval(draws[m])
            if frow.kind == "au":
                r["auc"] = 0.5  # a constant score ranks no frame above another
            out.append(r)
        return out

    def cells(self, i: int) -> list[dict]:
        """Per-(fold, seed) headline values of row ``i`` (figure points)."""
        row = self.rows[i]
        head = HEADLINE[row.kind]
        return [{"row_id": i, "fold": f, "seed": s,
                 "value": float(metrics_from_sums(row.kind, v.sum(0), row.labels)[head])}
                for (f, s), v in sorted(self.sums[i].items())]

    def difference(self, a: int, b: int, metric: str) -> dict:
        return paired_difference(self.boot, self.rows[a], self.sums[a], self.rows[b], self.sums[b], metric)


def _seed_mean(per_cell: dict[tuple[int, int], float]) -> float:
    by_seed: dict[int, list] = {}
    for (_, s), v in sorted(per_cell.items()):
        by_seed.setdefault(s, []).append(v)
    vals = [np.nanmean(v) if not np.all(np.isnan(v)) else np.nan for v in by_seed.values()]
    return float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")



# ---------------------------------------------------------------------------------------------------- floors
def floor_frames(df: pd.DataFrame, kind: str, labels: list[str], prior: dict | None) -> dict[str, tuple]:
    """Trivial predictors of one cell, as prediction frames on its test frames: {name: (frame, source)}.

    au: *all-positive* (every AU present) and *prevalence* (each AU's training prevalence as a constant score,
    which at threshold 0.5 predicts an AU present iff it is present in at least half the frames; ROC-AUC 0.5);
    intensity: *mean intensity* (each AU's mean level as a constant) and *all-zero*; expression: *majority class*.
    Training statistics come from metrics.json's ``train_prevalence`` / ``train_mean`` when stored; otherwise the
    test labels' own statistics are used (an optimistic floor), and ``source`` says which."""
    out: dict[str, tuple] = {}
    base = {c: df[c].to_numpy() for c in ("sample", "dataset", "subject") if c in df.columns}
    source = "training labels" if prior else "test labels"
    if kind == "au":
        t = df[[f"target_{n}" for n in labels]].to_numpy().astype(float)
        test_prev = np.array([np.mean(t[t[:, j] >= 0, j] > 0.5) if (t[:, j] >= 0).any() else 0.0
                              for j in range(len(labels))])
        prev = np.array([float(prior[n]) for n in labels]) if prior else test_prev
        targets = {f"target_{n}": t[:, j] for j, n in enumerate(labels)}
        allpos = _frame(base, {f"score_{n}": np.ones(len(t)) for n in labels}, targets)
        const = _frame(base, {f"score_{n}": np.full(len(t), prev[j]) for j, n in enumerate(labels)}, targets)
        out["all-positive"] = (allpos, "test labels")
        out["prevalence"] = (const, source)
    elif kind == "intensity":
        t = df[[f"target_{n}" for n in labels]].to_numpy().astype(float)
        test_mean = np.array([t[t[:, j] >= 0, j].mean() if (t[:, j] >= 0).any() else 0.0 for j in range(len(labels))])
        mean = np.array([float(prior[n]) for n in labels]) if prior else test_mean
        targets = {f"target_{n}": t[:, j] for j, n in enumerate(labels)}
        const = _frame(base, {f"score_{n}": np.full(len(t), mean[j]) for j, n in enumerate(labels)}, targets)
        zero = _frame(base, {f"score_{n}": np.zeros(len(t)) for n in labels}, targets)
        out["mean intensity"] = (const, source)
        out["all-zero"] = (zero, "test labels")
    elif kind == "expression":
        target = df["target"].to_numpy().astype(int)
        if prior:
            major = int(np.argmax([float(prior[n]) for n in labels]))
        else:
            major = int(np.argmax(np.bincount(target[target >= 0], minlength=len(labels))))
        maj = _frame(base, {f"score_{n}": np.full(len(target), float(j == major)) for j, n in enumerate(labels)},
                     {"target": target})
        out["majority class"] = (maj, source)
    return out


def _frame(*parts: dict) -> pd.DataFrame:
    cols: dict = {}
    for p in parts:
        cols.update(p)
    return pd.DataFrame(cols)


# ---------------------------------------------------------------------------------------------- ROC-AUC
def roc_auc(df: pd.DataFrame, labels: list[str]) -> dict[str, float]:
    """Per-AU ROC-AUC over known targets, NaN where a fold's test set has one class only; ``auc`` is the mean over
    the AUs where it is defined. Threshold-free, so insensitive to the skew that moves F1 (Jeni, Cohn & De la
    Torre, ACII 2013). Computed as the Mann-Whitney statistic from tie-averaged ranks (``scipy.stats.rankdata``),
    which equals ``sklearn.metrics.roc_auc_score`` (tested) at a fraction of its per-call validation cost."""
    from scipy.stats import rankdata

    out = {}
    for n in labels:
        t, s = df[f"target_{n}"].to_numpy(), df[f"score_{n}"].to_numpy()
        k = t >= 0
        y, s = t[k] > 0.5, s[k].astype(np.float64)
        n_pos = int(y.sum())
        n_neg = len(y) - n_pos
        if n_pos == 0 or n_neg == 0:
            out[f"auc/{n}"] = float("nan")
            continue
        ranks = rankdata(s)
        out[f"auc/{n}"] = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    vals = [v for v in out.values() if v == v]
    out["auc"] = float(np.mean(vals)) if vals else float("nan")
    return out
