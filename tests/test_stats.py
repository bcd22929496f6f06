"""The leaderboard's bootstrap, floors and threshold-free metrics against independent computations: a plain
numpy/sklearn re-evaluation of every resampled table, an analytical bootstrap variance, hand-computed floors."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import f1_score, roc_auc_score

from aurecog.metrics import AU_THRESHOLD, icc31
from aurecog.runner import stats as S

LABELS = ["AU1", "AU2", "AU4"]


def _au_frame(rng, subjects, per=12, labels=LABELS, quality=1.0, unknown=0.1):
    rows = []
    for s in subjects:
        for i in range(per):
            rows.append({"sample": len(rows), "dataset": "d", "subject": s, "frame": i})
    df = pd.DataFrame(rows)
    for lab in labels:
        t = (rng.random(len(df)) < 0.35).astype(float)
        df[f"target_{lab}"] = np.where(rng.random(len(df)) < unknown, -1.0, t)
        df[f"score_{lab}"] = np.clip(0.5 * quality * t + rng.random(len(df)) * (1 - 0.5 * quality), 0, 1)
    return df


def _row(kind, labels, frames: dict, key="ds/p/t"):
    row = S.RowData(kind, labels, key)
    for (fold, seed), df in frames.items():
        row.add(fold, seed, df)
    subjects = {}
    for fold in {f for f, _ in frames}:
        subjects[f"{key}/{fold}"] = row.subjects(fold)
    return row, subjects


def _plain_indices(seed, key, n, draws):
    """The documented draw schedule, written out independently of Resampler."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, n, size=(draws, n))


def _resampled(df, subjects, idx):
    parts = [df[(df["dataset"] + "/" + df["subject"]) == subjects[i]] for i in idx]
    return pd.concat(parts, ignore_index=True)


def _sk_f1_mean(df, labels):
    vals = []
    for lab in labels:
        t, p = df[f"target_{lab}"].to_numpy(), df[f"score_{lab}"].to_numpy() > 0.5
        k = t >= 0
        vals.append(f1_score(t[k] > 0.5, p[k], zero_division=0))
    return float(np.mean(vals))


def test_au_bootstrap_matches_plain_resampling_with_sklearn():
    rng = np.random.default_rng(1)
    frames = {(f, s): _au_frame(rng, [f"S{f}{i}" for i in range(4)], quality=0.6) for f in (0, 1) for s in (0, 1)}
    row, subjects = _row("au", LABELS, frames)
    draws = 12
    boot = S.Bootstrap(S.Resampler(draws, seed=7), subjects)
    point, got = boot.evaluate(row, boot.cell_sums(row))
    expected = np.zeros(draws)
    idx = {f: _plain_indices(7, f"ds/p/t/{f}", len(subjects[f"ds/p/t/{f}"]), draws) for f in (0, 1)}
    for b in range(draws):
        per_seed = []
        for seed in (0, 1):
            per_fold = []
            for fold in (0, 1):
                resampled = _resampled(frames[(fold, seed)], subjects[f"ds/p/t/{fold}"], idx[fold][b])
                per_fold.append(_sk_f1_mean(resampled, LABELS))
            per_seed.append(np.mean(per_fold))
        expected[b] = np.mean(per_seed)
    np.testing.assert_allclose(got["f1"], expected, atol=1e-12)
    plain = np.mean([np.mean([_sk_f1_mean(frames[(f, s)], LABELS) for f in (0, 1)]) for s in (0, 1)])
    assert point["f1"] == pytest.approx(plain, abs=1e-12)


def test_expression_bootstrap_pools_folds_like_measure_acc():
    rng = np.random.default_rng(2)
    classes = ["a", "b", "c"]
    frames = {}
    for fold in (0, 1):
        df = _au_frame(rng, [f"T{fold}{i}" for i in range(5)], labels=[])
        df["target"] = rng.integers(0, 3, len(df))
        for j, c in enumerate(classes):
            df[f"score_{c}"] = rng.random(len(df)) + 0.8 * (df["target"] == j)
        frames[(fold, 0)] = df
    row, subjects = _row("expression", classes, frames)
    boot = S.Bootstrap(S.Resampler(30, seed=3), subjects)
    _, got = boot.evaluate(row, boot.cell_sums(row))
    for b in range(30):
        pooled = pd.concat([_resampled(frames[(f, 0)], subjects[f"ds/p/t/{f}"],
                                       _plain_indices(3, f"ds/p/t/{f}", 5, 30)[b]) for f in (0, 1)])
        pred = pooled[[f"score_{c}" for c in classes]].to_numpy().argmax(1)
        t = pooled["target"].to_numpy()
        recalls = [np.mean(pred[t == j] == j) for j in range(3) if (t == j).any()]
        assert got["acc"][b] == pytest.approx(np.mean(recalls), abs=1e-12)
        assert got["acc_overall"][b] == pytest.approx(np.mean(pred == t), abs=1e-12)


def test_icc_and_mae_from_sums_match_the_metric_module():
    assert S.AU_THRESHOLD == AU_THRESHOLD  # stats keeps its own copy so the leaderboard needs no torch import
    rng = np.random.default_rng(3)
    df = _au_frame(rng, ["A", "B", "C"], per=30, unknown=0.0)
    for lab in LABELS:
        t = rng.integers(-1, 6, len(df)).astype(float)
        df[f"target_{lab}"] = t
        df[f"score_{lab}"] = np.clip(np.where(t >= 0, t, 0) + rng.normal(0, 1, len(df)), 0, 5)
    sums = S.subject_sums(df, "intensity", LABELS, sorted(set(S.clusters(df)))).sum(0)
    out = S.metrics_from_sums("intensity", sums, LABELS)
    for lab in LABELS:
        k = df[f"target_{lab}"].to_numpy() >= 0
        p = torch.tensor(df[f"score_{lab}"].to_numpy()[k])
        t = torch.tensor(df[f"target_{lab}"].to_numpy()[k])
        assert out[f"icc/{lab}"] == pytest.approx(float(icc31(p, t)[0]), abs=1e-10)
        assert out[f"mae/{lab}"] == pytest.approx(float((p - t).abs().mean()), abs=1e-12)


def test_bootstrap_variance_matches_the_analytical_plug_in_variance():
    """One fold, n subjects of m frames each: overall accuracy is the mean of the subjects' accuracies x_i, so the
    bootstrap distribution has mean x-bar and variance (1/n) * (1/n) sum (x_i - x-bar)^2 exactly."""
    rng = np.random.default_rng(4)
    n, m = 40, 10
    correct = rng.integers(0, m + 1, n)
    rows = [{"sample": i * m + j, "dataset": "d", "subject": f"S{i:02d}", "target": 0,
             "score_a": 1.0 if j < correct[i] else 0.0, "score_b": 0.0 if j < correct[i] else 1.0}
            for i in range(n) for j in range(m)]
    df = pd.DataFrame(rows)
    row, subjects = _row("expression", ["a", "b"], {(0, 0): df})
    boot = S.Bootstrap(S.Resampler(20000, seed=0), subjects)
    point, draws = boot.evaluate(row, boot.cell_sums(row))
    x = correct / m
    assert point["acc_overall"] == pytest.approx(x.mean())
    sd = np.sqrt(x.var() / n)  # plug-in variance of the mean (np.var: ddof=0)
    assert draws["acc_overall"].mean() == pytest.approx(x.mean(), abs=0.05 * sd)
    assert draws["acc_overall"].std() == pytest.approx(sd, rel=0.03)
    lo, hi = S.interval(draws["acc_overall"])
    assert lo == pytest.approx(x.mean() - 1.96 * sd, abs=0.15 * sd)
    assert hi == pytest.approx(x.mean() + 1.96 * sd, abs=0.15 * sd)


def test_paired_difference_shares_draws():
    rng = np.random.default_rng(5)
    frames_a = {(f, 0): _au_frame(rng, [f"S{f}{i}" for i in range(5)], quality=0.8) for f in (0, 1)}
    frames_b = {k: df.assign(**{f"score_{lab}": rng.random(len(df)) for lab in LABELS}) for k, df in frames_a.items()}
    row_a, subjects = _row("au", LABELS, frames_a)
    row_b, _ = _row("au", LABELS, frames_b)
    boot = S.Bootstrap(S.Resampler(500, seed=0), subjects)
    sa, sb = boot.cell_sums(row_a), boot.cell_sums(row_b)
    same = S.paired_difference(boot, row_a, sa, row_a, sa, "f1")
    assert same["diff"] == 0 and same["lo"] == 0 and same["hi"] == 0  # identical predictions: no spread at all
    d = S.paired_difference(boot, row_a, sa, row_b, sb, "f1")
    _, da = boot.evaluate(row_a, sa)
    _, db = boot.evaluate(row_b, sb)
    assert (d["lo"], d["hi"]) == S.interval(da["f1"] - db["f1"])
    # pairing narrows the interval: the unpaired spread (independent draws for B) is wider
    _, db_other = S.Bootstrap(S.Resampler(500, seed=1), subjects).evaluate(row_b, sb)
    lo_u, hi_u = S.interval(da["f1"] - db_other["f1"])
    assert d["hi"] - d["lo"] < hi_u - lo_u
    assert d["lo"] > 0  # quality 0.8 vs random scores


def test_floors_hand_computed():
    df = pd.DataFrame({"sample": range(6), "dataset": "d", "subject": ["A", "A", "A", "B", "B", "B"],
                       "target_AU1": [1, 0, 0, 1, -1, 0], "score_AU1": 0.3,
                       "target_AU2": [1, 1, 1, 0, 1, -1], "score_AU2": 0.3})
    labels = ["AU1", "AU2"]
    subjects = ["d/A", "d/B"]
    floors = S.floor_frames(df, "au", labels, prior=None)
    got = {n: S.metrics_from_sums("au", S.subject_sums(f, "au", labels, subjects).sum(0), labels)
           for n, (f, _) in floors.items()}
    # all-positive: F1 = 2p / (1 + p) with p the positive fraction of known labels (AU1 2/5, AU2 4/5)
    assert got["all-positive"]["f1/AU1"] == pytest.approx(2 * 0.4 / 1.4)
    assert got["all-positive"]["f1/AU2"] == pytest.approx(2 * 0.8 / 1.8)
    # prevalence (test prevalence without training stats): AU2's 0.8 > 0.5 predicts present, AU1's 0.4 absent
    assert got["prevalence"]["f1/AU1"] == 0.0
    assert got["prevalence"]["f1/AU2"] == pytest.approx(2 * 0.8 / 1.8)
    assert floors["prevalence"][1] == "test labels"
    # training prevalence stored: used instead, and said so
    fl = S.floor_frames(df, "au", labels, prior={"AU1": 0.6, "AU2": 0.1})
    m = S.metrics_from_sums("au", S.subject_sums(fl["prevalence"][0], "au", labels, subjects).sum(0), labels)
    assert m["f1/AU1"] == pytest.approx(2 * 0.4 / 1.4) and m["f1/AU2"] == 0.0
    assert fl["prevalence"][1] == "training labels"
    # expression: majority class -> per-class recall 1 for it, 0 for the others; overall = its share
    ex = pd.DataFrame({"sample": range(5), "dataset": "d", "subject": list("AABBB"), "target": [0, 1, 1, 2, 1],
                       "score_x": 0.0, "score_y": 0.0, "score_z": 0.0})
    maj = S.floor_frames(ex, "expression", ["x", "y", "z"], None)["majority class"][0]
    me = S.metrics_from_sums("expression", S.subject_sums(maj, "expression", ["x", "y", "z"], ["d/A", "d/B"]).sum(0),
                             ["x", "y", "z"])
    assert me["acc"] == pytest.approx(1 / 3) and me["acc_overall"] == pytest.approx(3 / 5)
    # intensity: all-zero MAE = mean level; a constant has ICC exactly 0
    it = pd.DataFrame({"sample": range(4), "dataset": "d", "subject": list("AABB"),
                       "target_AU1": [0.0, 2.0, 4.0, -1.0], "score_AU1": 1.0})
    fz = S.floor_frames(it, "intensity", ["AU1"], None)
    zero_sums = S.subject_sums(fz["all-zero"][0], "intensity", ["AU1"], ["d/A", "d/B"]).sum(0)
    mz = S.metrics_from_sums("intensity", zero_sums, ["AU1"])
    assert mz["mae"] == pytest.approx(2.0) and mz["icc"] == 0.0
    mm = S.metrics_from_sums("intensity", S.subject_sums(fz["mean intensity"][0], "intensity", ["AU1"],
                                                         ["d/A", "d/B"]).sum(0), ["AU1"])
    assert mm["mae"] == pytest.approx(4 / 3) and mm["icc"] == 0.0


def test_auc_and_f1_micro_match_independent_references():
    rng = np.random.default_rng(6)
    df = _au_frame(rng, ["A", "B", "C"], per=40, quality=0.5)
    auc = S.roc_auc(df, LABELS)
    for lab in LABELS:
        t, s = df[f"target_{lab}"].to_numpy(), df[f"score_{lab}"].to_numpy()
        k = t >= 0
        y, s = t[k] > 0.5, s[k]
        r = rankdata(s)  # Mann-Whitney: AUC = (rank sum of positives - n+(n+ + 1)/2) / (n+ n-)
        n_pos, n_neg = y.sum(), (~y).sum()
        assert auc[f"auc/{lab}"] == pytest.approx((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
        assert auc[f"auc/{lab}"] == pytest.approx(roc_auc_score(y, s))
    sums = S.subject_sums(df, "au", LABELS, ["d/A", "d/B", "d/C"]).sum(0)
    m = S.metrics_from_sums("au", sums, LABELS)
    t = df[[f"target_{lab}" for lab in LABELS]].to_numpy()
    p = df[[f"score_{lab}" for lab in LABELS]].to_numpy() > 0.5
    k = t >= 0  # micro-F1 over AUs = binary F1 of the flattened known (frame, AU) entries
    assert m["f1_micro"] == pytest.approx(f1_score(t[k] > 0.5, p[k]))
    assert m["f1"] == pytest.approx(_sk_f1_mean(df, LABELS))
    one_class = df.assign(target_AU1=0.0)
    assert np.isnan(S.roc_auc(one_class, LABELS)["auc/AU1"])
