"""The subject-bias gap and the study's questions (aurecog/runner/bias.py) against independent references:
sklearn F1 per habit stratum, a plain re-evaluation of resampled frames, and constructed models whose gap is
known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.runner import bias as B
from aurecog.runner import leaderboard as LB
from aurecog.runner import stats as S

AUS = ["AU1", "AU2", "AU4"]


def _preds(fold: int, seed: int, n_subj: int, per: int, contrarian: set[str], q_common: float, q_contr: float):
    """Targets fixed by the fold; scores of quality q (0 noise, 1 perfect at 0.5), per habit stratum."""
    trng, srng = np.random.default_rng(50 + fold), np.random.default_rng(1000 * seed + fold)
    subj = np.repeat([f"F{fold}S{i}" for i in range(n_subj)], per)
    df = pd.DataFrame({"sample": np.arange(len(subj)), "dataset": "synth", "subject": subj, "session": "T1",
                       "frame": np.tile(np.arange(per), n_subj)})
    q = np.where(pd.Series(subj).isin(contrarian), q_contr, q_common)
    for lab in AUS:
        t = (trng.random(len(df)) < 0.35).astype(np.float32)
        t[trng.random(len(df)) < 0.05] = -1  # unknown labels count nowhere
        df[f"target_{lab}"] = t
        df[f"score_{lab}"] = (q * (t.clip(0) - 0.5) + 0.5 + (1 - q) * (srng.random(len(df)) - 0.5)).astype(np.float32)
    return df


def _write(results, model, fold, df, contrarian, seed=0):
    d = results / "runs" / "synth" / model / f"{fold}-{seed}"
    d.mkdir(parents=True)
    df.to_parquet(d / "predictions.parquet")
    sums = S.subject_sums(df, "au", AUS, sorted(set(S.clusters(df)))).sum(0)
    habits = {s: {"group": "g", "contrarian": s in contrarian} for s in sorted(set(df["subject"]))}
    (d / "metrics.json").write_text(json.dumps({
        "model": model, "group": model, "family": model.split("-")[0], "task": "au", "seed": seed, "fold": fold,
        "labels": AUS, "profile": "quick", "protocol": "kfold3", "test_habits": habits,
        "test": {k: float(v) for k, v in S.metrics_from_sums("au", sums, AUS).items()}}))


def _grid(results, models: dict[str, tuple[float, float]], n_subj=6, n_contr=2, per=25, seeds=(0,)):
    for fold in range(3):
        contr = {f"F{fold}S{i}" for i in range(n_subj - n_contr, n_subj)}
        for model, (qc, qk) in models.items():
            for seed in seeds:
                _write(results, model, fold, _preds(fold, seed, n_subj, per, contr, qc, qk), contr, seed)


def _gaps(results, draws=200):
    runs = LB.load_runs(results, "synth")
    agg = LB.aggregate(runs)
    groups: dict = {}
    for r in runs:
        groups.setdefault(LB._row_key(r), []).append(r)
    row_runs = {i: groups[LB._row_key_of(a)] for i, a in agg.iterrows()}
    return agg, row_runs, B.HabitGaps("synth", agg, row_runs, draws, 0)


def test_gap_point_values_are_sklearn_f1_per_stratum_averaged_over_folds(tmp_path):
    _grid(tmp_path, {"baseline": (0.7, 0.3)})
    agg, _, gaps = _gaps(tmp_path)
    expected = {"common": [], "contrarian": []}
    for fold in range(3):
        d = tmp_path / "runs" / "synth" / "baseline" / f"{fold}-0"
        df, m = pd.read_parquet(d / "predictions.parquet"), json.loads((d / "metrics.json").read_text())
        is_c = df["subject"].map({s: h["contrarian"] for s, h in m["test_habits"].items()})
        for key, part in (("common", df[~is_c]), ("contrarian", df[is_c])):
            f1s = []
            for lab in AUS:
                k = part[f"target_{lab}"] >= 0
                f1s.append(f1_score(part[f"target_{lab}"][k], part[f"score_{lab}"][k] > 0.5, zero_division=0))
            expected[key].append(np.mean(f1s))
    g = gaps.row(0)
    assert g["common"] == pytest.approx(np.mean(expected["common"]), abs=1e-9)
    assert g["contrarian"] == pytest.approx(np.mean(expected["contrarian"]), abs=1e-9)
    assert g["gap"] == pytest.approx(g["common"] - g["contrarian"])
    assert g["gap"] > 0.1 and g["gap_lo"] < g["gap"] < g["gap_hi"] and (g["cells"], g["seeds"]) == (3, 1)


def test_a_score_of_exactly_one_half_is_a_negative_as_for_the_test_metric(tmp_path):
    import torch
    from torchmetrics.classification import MultilabelF1Score

    _grid(tmp_path, {"baseline": (0.7, 0.3)}, per=4)
    for fold in range(3):  # every score on the threshold, targets unchanged
        f = tmp_path / "runs" / "synth" / "baseline" / f"{fold}-0" / "predictions.parquet"
        df = pd.read_parquet(f)
        df.loc[::2, [f"score_{lab}" for lab in AUS]] = 0.5
        df.to_parquet(f)
    _, _, gaps = _gaps(tmp_path)
    vals = []
    for fold in range(3):
        d = tmp_path / "runs" / "synth" / "baseline" / f"{fold}-0"
        df, m = pd.read_parquet(d / "predictions.parquet"), json.loads((d / "metrics.json").read_text())
        part = df[~df["subject"].map({s: h["contrarian"] for s, h in m["test_habits"].items()})]
        t = torch.tensor(part[[f"target_{lab}" for lab in AUS]].to_numpy()).long()
        metric = MultilabelF1Score(len(AUS), threshold=0.5, average="macro", ignore_index=-1)
        vals.append(float(metric(torch.tensor(part[[f"score_{lab}" for lab in AUS]].to_numpy()), t)))
    assert gaps.row(0)["common"] == pytest.approx(np.mean(vals), abs=1e-6)


def test_gap_interval_matches_a_plain_reevaluation_of_resampled_frames(tmp_path):
    """Draw b resamples each fold's common and contrarian subjects separately (stratified, Resampler contract);
    re-evaluating the concatenated frames with sklearn gives the same gap per draw, so the same interval."""
    _grid(tmp_path, {"baseline": (0.6, 0.4)}, per=15)
    draws = 60
    _, _, gaps = _gaps(tmp_path, draws)
    res = S.Resampler(draws, 0)
    per_draw = np.zeros((draws, 3, 2))
    for fold in range(3):
        d = tmp_path / "runs" / "synth" / "baseline" / f"{fold}-0"
        df, m = pd.read_parquet(d / "predictions.parquet"), json.loads((d / "metrics.json").read_text())
        for j, sp in enumerate(B.SPLITS):
            subs = sorted(f"synth/{s}" for s, h in m["test_habits"].items() if h["contrarian"] == (sp == "contrarian"))
            idx = res.indices(f"synth/kfold3/au/{sp}/{fold}", len(subs))
            for b in range(draws):
                part = pd.concat([df[("synth/" + df["subject"]) == subs[i]] for i in idx[b]])
                f1s = [f1_score(part[f"target_{lab}"][part[f"target_{lab}"] >= 0],
                                part[f"score_{lab}"][part[f"target_{lab}"] >= 0] > 0.5, zero_division=0)
                       for lab in AUS]
                per_draw[b, fold, j] = np.mean(f1s)
    gap_draws = per_draw[:, :, 0].mean(1) - per_draw[:, :, 1].mean(1)
    g = gaps.row(0)
    assert (g["gap_lo"], g["gap_hi"]) == pytest.approx(S.interval(gap_draws), abs=1e-9)


def test_a_model_without_the_gap_shrinks_it_and_identical_models_are_inconclusive(tmp_path):
    _grid(tmp_path, {"cisnet": (0.7, 0.7), "cisnet-resnet34-wo": (0.7, 0.2), "ac2d": (0.6, 0.5),
                     "ac2d-av": (0.6, 0.5)}, n_contr=3)
    out = LB.render("synth", tmp_path, plots=False, draws=300)
    answers = pd.read_csv(tmp_path / "synth" / "study.csv")
    cis = answers[(answers["model"] == "cisnet") & (answers["kind"] == "gap")].iloc[0]
    assert cis["verdict"] == "shrinks the gap" and cis["lo"] > 0
    ac = answers[(answers["model"] == "ac2d") & (answers["kind"] == "gap")].iloc[0]
    # same score generator and seeds except the model name: the two rows are identical, so the paired
    # difference is exactly 0 in every draw
    assert ac["diff"] == pytest.approx(0.0, abs=1e-9) and ac["lo"] == pytest.approx(0.0, abs=1e-9)
    assert ac["verdict"] == "inconclusive"
    md = out[0].read_text()
    assert "gap [95% CI]" in md and "Caution" not in md


def test_one_contrarian_per_fold_is_flagged_and_never_a_verdict(tmp_path):
    _grid(tmp_path, {"cisnet": (0.7, 0.7), "cisnet-resnet34-wo": (0.7, 0.1)}, n_contr=1)
    out = LB.render("synth", tmp_path, plots=False, draws=200)
    answers = pd.read_csv(tmp_path / "synth" / "study.csv")
    assert answers.iloc[0]["verdict"].startswith("inconclusive (1 subject per fold")
    assert "**Caution:** a fold has a single contrarian test subject" in out[0].read_text()


def test_study_file_names_registered_models_and_its_keys_are_checked(tmp_path):
    variants, tables = C.model_variants(), C.table_groups()
    from aurecog.cli import load_study

    doc = load_study(REPO_ROOT / "configs" / "study.yaml")
    assert len(doc["seeds"]) >= 3
    for r in doc["runs"]:
        assert C.load_dataset(r["dataset"])
        for m in r["models"]:
            assert m in variants or m in tables or m == "default", m
    for q in B.load_questions():
        assert q["model"] in variants and q["ablation"] in variants, q
    bad = tmp_path / "study.yaml"
    bad.write_text("seeds: [0]\nrun: []\n")
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['run'\]"):
        load_study(bad)
    bad.write_text("questions:\n  - {model: cisnet, ablation: cisnet-resnet34-wo, kind: gaps}\n")
    with pytest.raises(ValueError, match="kind='gaps'"):
        B.load_questions(bad)


def test_study_dry_run_prints_one_bench_per_run(capsys):
    from aurecog.cli import main

    assert main(["study", "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("aurecog bench")]
    assert len(lines) == 3 and all("--seeds 0,1,2" in x for x in lines)
    assert "--protocol bias90" in lines[2]
