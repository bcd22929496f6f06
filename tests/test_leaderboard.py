"""Leaderboard aggregation pieces checked against independent references (sklearn)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from aurecog.runner.leaderboard import habit_breakdown, load_runs


def _write_run(root, model, fold, preds: pd.DataFrame, habits: dict, labels: list[str]):
    d = root / "runs" / "synth" / model / f"{fold}-0"
    d.mkdir(parents=True)
    preds.to_parquet(d / "predictions.parquet")
    (d / "metrics.json").write_text(json.dumps({
        "model": model, "group": model, "family": model, "task": "au", "seed": 0, "fold": fold,
        "labels": labels, "test_habits": habits}))


def test_habit_breakdown_matches_sklearn_f1_per_subject_group(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["AU1", "AU2", "AU4"]
    expected = {"common": [], "contrarian": []}
    for fold in (0, 1):
        n = 120
        subj = rng.choice(["A", "B", "C"], n)
        df = pd.DataFrame({"subject": subj})
        for lab in labels:
            t = rng.integers(0, 2, n).astype(np.float32)
            t[rng.random(n) < 0.1] = -1  # unknown labels are excluded
            df[f"target_{lab}"] = t
            df[f"score_{lab}"] = rng.random(n).astype(np.float32)
        habits = {"A": {"group": "g0", "contrarian": False}, "B": {"group": "g1", "contrarian": False},
                  "C": {"group": "g3", "contrarian": True}}
        _write_run(tmp_path, "m", fold, df, habits, labels)
        for key, mask in (("common", df.subject != "C"), ("contrarian", df.subject == "C")):
            part = df[mask]
            f1s = []
            for lab in labels:
                k = part[f"target_{lab}"] >= 0
                f1s.append(f1_score(part[f"target_{lab}"][k], part[f"score_{lab}"][k] >= 0.5))
            expected[key].append(np.mean(f1s))
    out = habit_breakdown(load_runs(tmp_path, "synth"))
    row = out.iloc[0]
    assert row["common"] == pytest.approx(np.mean(expected["common"]), abs=1e-9)
    assert row["contrarian"] == pytest.approx(np.mean(expected["contrarian"]), abs=1e-9)
    assert row["drop"] == pytest.approx(row["common"] - row["contrarian"])
    assert row["runs"] == 2
