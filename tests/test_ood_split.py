"""The in-distribution test set of the expression mix (heldout_cells ``id_fraction``) end to end: the runner's own
cell code scores it apart from the held-out cells (the headline), and the leaderboard's bias section turns the
two into an in-distribution - held-out gap that matches a direct recomputation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import recall_score

from aurecog import config as C
from aurecog.data.synth import label_table
from aurecog.runner import bias as B
from aurecog.runner import leaderboard as LB
from aurecog.runner import stats as S

EMOTIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.precision=32-true",
        "trainer.channels_last=false"]


@pytest.fixture(scope="module")
def fermix_cell(tmp_path_factory):
    from aurecog.runner import grid
    from aurecog.runner.cell import run_cell

    res = tmp_path_factory.mktemp("res")
    cell = grid.expand("synth-fermix", "baseline", "0", "0", "quick", "bias100", res, TINY)[0]
    metrics = run_cell(cell.config, 0, 0, cell.run_dir, wandb_mode="disabled", progress=False)
    return cell, metrics


def test_cell_scores_the_in_distribution_sequences_apart_from_the_held_out_cells(fermix_cell):
    cell, metrics = fermix_cell
    proto = C.load_dataset("synth-fermix")["protocols"]["bias100"]
    idx, _ = label_table("synth-fermix")
    held = {(d, EMOTIONS.index(e)) for d, es in proto["folds"][0].items() for e in es}
    test = pd.read_parquet(cell.run_dir / "predictions.parquet")
    ind = pd.read_parquet(cell.run_dir / B.ID_PREDICTIONS)
    assert set(zip(test["dataset"], test["target"])) <= held  # the headline stays the held-out cells
    assert len(ind) and not set(zip(ind["dataset"], ind["target"])) & held
    seq = lambda df: set(df["subject"].astype(str) + "/" + df["session"].astype(str))  # noqa: E731
    assert not seq(ind) & seq(test)
    # whole sequences: every frame of an in-distribution sequence is scored
    rows = idx[(idx["subject"] + "/" + idx["session"]).isin(seq(ind))]
    assert len(rows) == len(ind)
    # the cell's in-distribution metric is the mean per-class recall of its own predictions (sklearn)
    pred = ind[[f"score_{e}" for e in EMOTIONS]].to_numpy().argmax(1)
    present = sorted(set(ind["target"]))
    ref = recall_score(ind["target"], pred, labels=present, average="macro")
    assert metrics["test_in_distribution"]["acc"] == pytest.approx(ref, abs=1e-6)
    assert metrics["n_test_in_distribution"] == len(ind)
    assert metrics["n_test"] == len(test)


def _write(results, model, fold, seed, test, ind):
    d = results / "runs" / "synth-fermix" / model / "bias100" / f"{fold}-{seed}"
    d.mkdir(parents=True)
    test.to_parquet(d / "predictions.parquet")
    ind.to_parquet(d / B.ID_PREDICTIONS)
    sums = S.subject_sums(test, "expression", EMOTIONS, sorted(set(S.clusters(test)))).sum(0)
    (d / "metrics.json").write_text(json.dumps({
        "model": model, "group": model, "family": model.split("-")[0], "task": "expression", "seed": seed,
        "fold": fold, "labels": EMOTIONS, "profile": "quick", "protocol": "bias100",
        "test": {k: float(v) for k, v in S.metrics_from_sums("expression", sums, EMOTIONS).items()}}))


def _frames(rng, fold, n_subj, per, p_correct):
    subj = np.repeat([f"F{fold}S{i}" for i in range(n_subj)], per)
    target = rng.integers(0, 6, len(subj))
    pred = np.where(rng.random(len(subj)) < p_correct, target, (target + 1) % 6)
    df = pd.DataFrame({"sample": np.arange(len(subj)), "dataset": "ckplus", "subject": subj, "session": "q",
                       "frame": 0, "target": target})
    for j, e in enumerate(EMOTIONS):
        df[f"score_{e}"] = (pred == j).astype(np.float32)
    return df


def test_in_distribution_gap_and_its_reduction_match_a_direct_recomputation(tmp_path):
    rng = np.random.default_rng(0)
    # cisnet: same accuracy in and out (gap ~0); its ablation loses 50 points on the held-out cells
    spec = {"cisnet": (0.8, 0.8), "cisnet-resnet34-wo": (0.8, 0.3)}
    frames = {}
    for model, (p_in, p_out) in spec.items():
        for fold in range(3):
            ind, test = _frames(rng, fold, 6, 20, p_in), _frames(rng, fold, 6, 40, p_out)
            frames[(model, fold)] = (ind, test)
            _write(tmp_path, model, fold, 0, test, ind)
    out = LB.render("synth-fermix", tmp_path, plots=False, draws=300)
    md = out[0].read_text()
    assert "## Dataset bias (in-distribution vs held-out cells)" in md
    runs = LB.load_runs(tmp_path, "synth-fermix")
    agg = LB.aggregate(runs)
    groups = {i: [r for r in runs if r["model"] == a["model"]] for i, a in agg.iterrows()}
    gaps = B.HabitGaps("synth-fermix", agg, groups, 300, 0)

    def macro_recall(df):
        pred = df[[f"score_{e}" for e in EMOTIONS]].to_numpy().argmax(1)
        return recall_score(df["target"], pred, labels=sorted(set(df["target"])), average="macro")

    for i, a in agg.iterrows():
        g = gaps.row(i)
        # expression: the three folds' test sets pooled (IERN's convention, stats.per_seed_value)
        ref_in = macro_recall(pd.concat([frames[(a["model"], f)][0] for f in range(3)]))
        ref_out = macro_recall(pd.concat([frames[(a["model"], f)][1] for f in range(3)]))
        assert g["in-distribution"] == pytest.approx(ref_in, abs=1e-9)
        assert g["held-out"] == pytest.approx(ref_out, abs=1e-9)
        assert g["gap"] == pytest.approx(ref_in - ref_out, abs=1e-9)
    answers = pd.read_csv(tmp_path / "synth-fermix" / "study.csv")
    q = answers[(answers["model"] == "cisnet") & (answers["kind"] == "gap")]
    assert len(q) == 1 and q.iloc[0]["verdict"] == "shrinks the gap" and q.iloc[0]["lo"] > 0
    assert "acc x100" in q.iloc[0]["measure"]
