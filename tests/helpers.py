"""Test fixtures shared by the test modules: a tiny prepared dataset with random faces and known labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from aurecog.config import REPO_ROOT
from aurecog.data.prepared import PreparedWriter

BP4D_AUS = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]
INTENSITY_AUS = ["AU6", "AU10", "AU12"]
EXPRESSIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]


def make_prepared(root: Path, n_subjects: int = 6, per_subject: int = 12, size: int = 32, seed: int = 0,
                  aus=BP4D_AUS, intensity_aus=INTENSITY_AUS, expressions=EXPRESSIONS, datasets=("d0",),
                  unknown_rate: float = 0.05) -> Path:
    """Write a prepared dataset whose images carry a weak signal of AU1 (brighter top-left quadrant)."""
    rng = np.random.default_rng(seed)
    n = n_subjects * per_subject
    w = PreparedWriter(root, n, size, "ibug68")
    rows = []
    base_lm = rng.uniform(size * 0.2, size * 0.8, size=(68, 2)).astype(np.float32)
    for i in range(n):
        s = i // per_subject
        occ = (rng.random(len(aus)) < 0.35).astype(np.int8)
        img = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
        if occ[0]:
            img[: size // 2, : size // 2] += 120
        w.images[i] = img
        w.landmarks[i] = base_lm + rng.normal(0, 0.5, size=base_lm.shape)
        occ_l = occ.copy()
        occ_l[rng.random(len(aus)) < unknown_rate] = -1
        row = {"dataset": datasets[s % len(datasets)], "subject": f"S{s:02d}", "session": f"T{i % 2}",
               "frame": i}
        row.update({a: int(v) for a, v in zip(aus, occ_l)})
        row.update({f"{a}_int": int(rng.integers(0, 6)) for a in intensity_aus})
        row["expression"] = int(rng.integers(0, len(expressions))) if expressions else -1
        rows.append(row)
    df = pd.DataFrame(rows)
    for a in aus:
        df[a] = df[a].astype(np.int8)
    meta = {"name": root.name, "aus": list(aus), "intensity_aus": list(intensity_aus),
            "expressions": list(expressions), "datasets": list(datasets), "positive_threshold": 2}
    return w.finalize(df, meta)


def dataset_config(name: str = "fake", protocol: dict | None = None, **extra) -> dict:
    """An inline dataset config reading the prepared folder ``<data_root>/<name>``."""
    cfg = {"name": name, "source": "prepared", "task": "au", "confounder": "subject", "default_protocol": "p",
           "protocols": {"p": protocol or {"type": "subject_kfold", "k": 3}}}
    cfg.update(extra)
    return cfg


#: the tiny baseline cell of the runner tests (test_identity.py, conftest.py's baseline_fold0)
TINY_BASELINE = ["--set", "trainer.max_epochs=1", "--set", "trainer.limit_train_batches=3", "--set",
                 "data.eval_batch_size=256"]


def bench_baseline(results: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``aurecog bench`` of the tiny baseline cell, fold 0, into ``results`` (no leaderboard)."""
    cmd = [sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "synth", "--models", "baseline", "--folds", "0",
           "--results", str(results), "--no-leaderboard", *TINY_BASELINE, *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                          text=True, timeout=timeout)
