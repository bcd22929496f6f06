"""Leaderboard aggregation pieces checked against independent references (sklearn)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pandas as pd
import pytest

from aurecog.runner.leaderboard import load_runs

# ------------------------------------------------------------------ uncertainty, floors, claims, identity
AUS = ["AU1", "AU2", "AU4", "AU6"]


def _au_preds(seed: int, fold: int, quality: float, n_subjects: int = 5, per: int = 30) -> pd.DataFrame:
    """Test predictions of one fold: targets fixed by the fold (same for every model), scores of the given
    quality (0: pure noise, 1: scores separate the classes at 0.5)."""
    trng = np.random.default_rng(100 + fold)
    subj = np.repeat([f"F{fold}S{i}" for i in range(n_subjects)], per)
    df = pd.DataFrame({"sample": np.arange(len(subj)), "dataset": "synth", "subject": subj,
                       "session": "T1", "frame": np.tile(np.arange(per), n_subjects)})
    srng = np.random.default_rng(seed)
    for lab in AUS:
        t = (trng.random(len(df)) < 0.3).astype(np.float32)
        df[f"target_{lab}"] = t
        df[f"score_{lab}"] = (quality * (t - 0.5) + 0.5 + (1 - quality) * (srng.random(len(df)) - 0.5)).astype(
            np.float32)
    return df


def _write_cell(results, model, fold, preds, identity=None, seed=0, protocol="kfold3"):
    from aurecog.runner import stats as S

    d = results / "runs" / "synth" / model / f"{fold}-{seed}"
    d.mkdir(parents=True)
    preds.to_parquet(d / "predictions.parquet")
    sums = S.subject_sums(preds, "au", AUS, sorted(set(S.clusters(preds)))).sum(0)
    test = {k: float(v) for k, v in S.metrics_from_sums("au", sums, AUS).items()}
    m = {"model": model, "group": model, "family": model.split("-")[0], "task": "au", "seed": seed, "fold": fold,
         "labels": AUS, "profile": "quick", "protocol": protocol, "test": test}
    if identity:
        m["identity"] = identity
    (d / "metrics.json").write_text(json.dumps(m))
    (d / "environment.json").write_text(json.dumps({"git_revision": "abc1234"}))
    return d


def test_corrupt_metrics_json_is_skipped_with_a_warning_naming_it(tmp_path):
    _write_cell(tmp_path, "baseline", 0, _au_preds(0, 0, 0.8))
    bad = _write_cell(tmp_path, "baseline", 1, _au_preds(0, 1, 0.8)) / "metrics.json"
    bad.write_text('{"model": "baseline", "fold": ')  # truncated write
    with pytest.warns(UserWarning, match=str(bad).replace(".", r"\.")):
        runs = load_runs(tmp_path, "synth")
    assert [r["fold"] for r in runs] == [0]


def test_rows_are_split_by_identity_and_list_their_revisions(tmp_path):
    from aurecog.runner.leaderboard import aggregate, render

    a = {"row": "a" * 16, "cell": "1" * 16, "revision": "1111111", "dirty": False}
    b = {"row": "b" * 16, "cell": "2" * 16, "revision": "2222222", "dirty": True}
    _write_cell(tmp_path, "baseline", 0, _au_preds(0, 0, 0.8), identity=a)
    _write_cell(tmp_path, "baseline", 1, _au_preds(0, 1, 0.8), identity=a)
    _write_cell(tmp_path, "baseline", 2, _au_preds(0, 2, 0.2), identity=b)
    _write_cell(tmp_path, "cisnet", 0, _au_preds(1, 0, 0.8))  # legacy: no identity key
    agg = aggregate(load_runs(tmp_path, "synth"))
    base = agg[agg.model == "baseline"].set_index("identity")
    assert sorted(base.index) == ["a" * 16, "b" * 16]
    assert base.loc["a" * 16, "runs"] == 2 and base.loc["b" * 16, "runs"] == 1  # never averaged together
    assert agg[agg.model == "cisnet"]["identity"].tolist() == ["legacy"]
    md, _ = render("synth", tmp_path, plots=False, draws=200)
    text = md.read_text()
    assert "| " + "b" * 16 + " | 2222222 | yes | 1 |" in text
    assert "| " + "a" * 16 + " | 1111111 | no | 1 |" in text
    assert "| legacy | abc1234 | no | 1 |" in text
    assert "| baseline † |" in text  # the dirty row is marked


def _claims_csv(results, rows):
    from aurecog.runner.claims import COLUMNS

    (results / "reported").mkdir(parents=True, exist_ok=True)
    base = {"paper": "p", "table": "T", "claim": "c", "dataset": "bp4d", "protocol": "folds3", "metric": "f1",
            "label": "mean", "reported_a": np.nan, "reported_b": np.nan, "margin": np.nan, "note": ""}
    pd.DataFrame([{**base, **r} for r in rows])[COLUMNS].to_csv(results / "reported" / "claims.csv", index=False)


def test_claims_verdicts_floors_and_byte_identical_rebuild(tmp_path):
    from aurecog.runner.claims import verdict
    from aurecog.runner.leaderboard import render

    quality = {"cisnet-resnet18": 0.9, "cisnet-resnet50": 0.9, "cisnet-resnet18-wo": 0.4, "ac2d": 0.0,
               "ac2d-av": 0.9}
    for model, q in quality.items():
        noise = 7 if model in ("cisnet-resnet18", "cisnet-resnet50") else zlib.crc32(model.encode())  # two equal
        for fold in range(3):
            _write_cell(tmp_path, model, fold, _au_preds(noise, fold, q))
    _claims_csv(tmp_path, [
        {"model_a": "cisnet-resnet18", "model_b": "cisnet-resnet18-wo", "direction": ">", "reported_diff": 3.9},
        {"model_a": "cisnet-resnet18", "model_b": "cisnet-resnet18-wo", "direction": "<", "reported_diff": -1.0},
        {"model_a": "cisnet-resnet50", "model_b": "cisnet-resnet18", "direction": "~", "margin": 0.5,
         "reported_diff": 0.0},
        {"model_a": "ac2d-av", "model_b": "ac2d", "direction": ">", "reported_diff": 2.0},
        {"model_a": "renet", "model_b": "renet-baseline", "direction": ">", "reported_diff": 5.9},  # not in grid
        {"model_a": "cisnet", "model_b": "cisnet-resnet34-wo", "direction": ">", "dataset": "disfa",
         "reported_diff": 7.3},  # another dataset
    ])
    md, csv = render("synth", tmp_path, plots=True, draws=300)
    res = pd.read_csv(tmp_path / "synth" / "claims.csv")
    assert res["verdict"].tolist() == ["reproduced", "contradicted", "reproduced", "inconclusive (at floor)"]
    assert res["reported_in_ci"].tolist()[:3] == ["no", "no", "yes"]
    assert (res["protocol"] == "kfold3").all() and res["synthetic"].all()
    table = pd.read_csv(csv).set_index("model")
    assert bool(table.loc["ac2d", "at_floor"]) and not bool(table.loc["ac2d-av", "at_floor"])
    assert table.loc["ac2d", "floor"] == "all-positive" and table.loc["cisnet-resnet18", "draws"] == 300
    text = md.read_text()
    assert "**SynthAU.**" in text and "| ac2d | ac2d |" in text and "**at floor**" in text
    assert "| floor: all-positive | floor (test labels) |" in text
    # rebuilt from the same runs: the same bytes, figures included
    out = tmp_path / "synth"
    first = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert {"claims_forest.png", "au_heatmap.png", "au_points.png"} <= set(first)
    render("synth", tmp_path, plots=True, draws=300)
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == first
    # the verdict rule at its edges
    assert verdict(0.1, 2.0, ">", None) == "reproduced" and verdict(-0.1, 2.0, ">", None) == "inconclusive"
    assert verdict(-2.0, -0.1, ">", None) == "contradicted" and verdict(-2.0, -0.1, "<", None) == "reproduced"
    assert verdict(-0.4, 0.4, "~", 0.5) == "reproduced" and verdict(-0.4, 0.6, "~", 0.5) == "inconclusive"
    assert verdict(0.6, 0.9, "~", 0.5) == "contradicted"


