"""Metrics against independent references: sklearn, Shrout & Fleiss's worked example, hand computations."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score

from aurecog.metrics import TaskMetrics, icc31, icc31_ratings, pcc_similarity, pearson_matrix


def test_au_f1_matches_sklearn_per_au_with_unknown_labels_excluded():
    rng = np.random.default_rng(0)
    n, c = 300, 5
    target = (rng.random((n, c)) < 0.3).astype(np.int64)
    target[rng.random((n, c)) < 0.1] = -1
    scores = rng.random((n, c)).astype(np.float32)
    m = TaskMetrics("au", [f"AU{i}" for i in range(c)])
    for chunk in np.array_split(np.arange(n), 7):  # several updates, as over batches
        m.update(torch.from_numpy(scores[chunk]), torch.from_numpy(target[chunk]).float())
    out = m.compute()
    f1s = []
    for j in range(c):
        known = target[:, j] >= 0
        ref = f1_score(target[known, j], scores[known, j] >= 0.5)
        acc = accuracy_score(target[known, j], scores[known, j] >= 0.5)
        assert out[f"f1/AU{j}"] == pytest.approx(ref, abs=1e-6)
        assert out[f"acc/AU{j}"] == pytest.approx(acc, abs=1e-6)
        f1s.append(ref)
    assert out["f1"] == pytest.approx(np.mean(f1s), abs=1e-6)


def test_icc31_reproduces_shrout_fleiss_1979_example():
    # Shrout & Fleiss (1979) Table 2: 6 targets rated by 4 judges; they report ICC(3,1) = .71.
    ratings = torch.tensor([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    assert float(icc31_ratings(ratings)[0]) == pytest.approx(0.7148, abs=5e-4)


def test_icc31_two_raters_matches_direct_anova_formula():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, size=50).astype(float)
    p = np.clip(y + rng.normal(0, 1.0, 50), 0, 5)
    x = np.stack([p, y], 1)
    n, k = x.shape
    gm = x.mean()
    msr = k * ((x.mean(1) - gm) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(0) - gm) ** 2).sum() / (k - 1)
    mse = (((x - gm) ** 2).sum() - msr * (n - 1) - msc * (k - 1)) / ((n - 1) * (k - 1))
    ref = (msr - mse) / (msr + (k - 1) * mse)
    assert float(icc31(torch.tensor(p), torch.tensor(y))[0]) == pytest.approx(ref, abs=1e-9)
    # perfect agreement up to an additive offset is perfect consistency
    assert float(icc31(torch.tensor(y + 1.0), torch.tensor(y))[0]) == pytest.approx(1.0)


def test_intensity_metrics_icc_mae_and_derived_f1():
    rng = np.random.default_rng(2)
    target = rng.integers(0, 6, size=(80, 3)).astype(np.float32)
    target[:5, 0] = -1
    pred = np.clip(target + rng.normal(0, 0.7, target.shape), 0, 5).astype(np.float32)
    m = TaskMetrics("intensity", ["AU6", "AU10", "AU12"], positive_threshold=2)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    out = m.compute()
    known = target[:, 0] >= 0
    assert out["mae/AU6"] == pytest.approx(np.abs(pred[known, 0] - target[known, 0]).mean(), abs=1e-5)
    ref_icc = float(icc31(torch.tensor(pred[known, 0]), torch.tensor(target[known, 0]))[0])
    assert out["icc/AU6"] == pytest.approx(ref_icc, abs=1e-5)
    assert out["f1/AU10"] == pytest.approx(f1_score(target[:, 1] >= 2, pred[:, 1] >= 2), abs=1e-6)


def test_expression_per_class_accuracy_is_sklearn_recall():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, 200)
    probs = rng.random((200, 6)).astype(np.float32)
    probs[np.arange(200), y] += rng.random(200).astype(np.float32) * 0.8
    m = TaskMetrics("expression", list("abcdef"))
    m.update(torch.from_numpy(probs), torch.from_numpy(y))
    out = m.compute()
    rec = recall_score(y, probs.argmax(1), average=None)
    for j, name in enumerate("abcdef"):
        assert out[f"acc/{name}"] == pytest.approx(rec[j], abs=1e-6)
    assert out["acc"] == pytest.approx(rec.mean(), abs=1e-6)
    assert out["acc_overall"] == pytest.approx(accuracy_score(y, probs.argmax(1)), abs=1e-6)


def test_pcc_similarity_hand_computed():
    rng = np.random.default_rng(4)
    t = (rng.random((40, 4)) < 0.4).astype(np.float64)
    p = t.copy()
    assert float(pcc_similarity(torch.tensor(p), torch.tensor(t))) == pytest.approx(1.0)
    p[:, 1] = 1 - p[:, 1]  # one AU inverted: its correlations flip sign
    a, b = np.corrcoef(p.T), np.corrcoef(t.T)
    ref = (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    assert float(pcc_similarity(torch.tensor(p), torch.tensor(t))) == pytest.approx(ref, abs=1e-9)
    np.testing.assert_allclose(pearson_matrix(torch.tensor(t)).numpy(), b, atol=1e-9)
