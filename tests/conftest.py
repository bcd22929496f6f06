"""Session fixtures shared by several test modules (each one trains a cell, so it is trained once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import bench_baseline


@pytest.fixture(scope="session")
def baseline_fold0(tmp_path_factory) -> Path:
    """A results folder holding the tiny baseline cell (helpers.bench_baseline), fold 0 seed 0, benched once with
    ``--jobs 1``; tests read it (or copy it) and never write into it (test_identity.py, test_runner.py)."""
    results = tmp_path_factory.mktemp("baseline-fold0") / "results"
    r = bench_baseline(results, "--jobs", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    return results
