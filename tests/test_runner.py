"""The benchmark runner end to end on SynthAU: run folders, resume after a kill, leaderboards, launchers, W&B,
and DDP evaluation (2 CPU processes) equal to a single process. Cells are shrunk with config overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from aurecog.config import REPO_ROOT
from aurecog.data.synth import GENERATOR_VERSION, default_cache_dir
from aurecog.runner import grid

TINY = ["--set", "trainer.max_epochs=1", "--set", "trainer.limit_train_batches=3", "--set",
        "data.eval_batch_size=256"]


def _bench(results: Path, *extra: str, env_extra: dict | None = None, popen: bool = False):
    cmd = [sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "synth", "--models", "baseline",
           "--results", str(results), *TINY, *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_grid_expansion_groups_and_errors():
    assert grid.select_models("baseline") == ["baseline"]
    default = grid.select_models("default")
    assert "baseline" in default
    cells = grid.expand("synth", "baseline", "all", "0,1", "quick")
    assert [(c.fold, c.seed) for c in cells] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert cells[0].run_dir.parts[-3:] == ("synth", "baseline", "0-0")
    with pytest.raises(grid.GridError, match="unknown model or group 'nope'"):
        grid.select_models("nope")
    with pytest.raises(grid.GridError, match="out of range"):
        grid.expand("synth", "baseline", "5", "0", "quick")
    # another protocol or task gets its own run folders (never skipped as the default protocol's finished cells)
    default_dir = grid.expand("synth-fermix", "iern", "0", "0")[0].run_dir
    bias90 = grid.expand("synth-fermix", "iern", "0", "0", protocol="bias90")[0]
    assert default_dir.parts[-3:] == ("synth-fermix", "iern", "0-0")
    assert bias90.run_dir.parts[-4:] == ("synth-fermix", "iern", "bias90", "0-0")
    assert bias90.config["protocol"] == "bias90"
    inten = grid.expand("synth-disfa", "renet", "0", "0", task="intensity")[0]
    assert inten.run_dir.parts[-3:] == ("renet", "kfold3-intensity", "0-0") and inten.config["task"] == "intensity"
    with pytest.raises(grid.GridError, match="unknown task 'ocurrence'"):
        grid.expand("synth", "baseline", "0", "0", task="ocurrence")
    c = grid.set_dotted({"a": {"b": 1}}, ["a.c=2", "d=[1, 2]"], validate=False)
    assert c == {"a": {"b": 1, "c": 2}, "d": [1, 2]}
    c = grid.set_dotted({"a": {"b": 1}, "d": None}, ["a.b=3", "d=[1, 2]"])  # validated: known keys
    assert c == {"a": {"b": 3}, "d": [1, 2]}


def test_unknown_dataset_fails_fast_with_the_list():
    r = subprocess.run([sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "bp5d"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown dataset 'bp5d'" in r.stderr and "synth" in r.stderr


def test_kill_during_a_cell_then_rerun_finishes_only_unfinished_cells(tmp_path):
    results = tmp_path / "results"
    p = _bench(results, "--folds", "0,1", "--no-leaderboard", popen=True)
    first = results / "runs" / "synth" / "baseline" / "0-0" / "metrics.json"
    second_log = results / "logs" / "synth" / "baseline" / "1-0.log"
    deadline = time.time() + 600
    while time.time() < deadline and not (first.exists() and second_log.exists()
                                          and second_log.stat().st_mtime >= first.stat().st_mtime):
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.2)
    assert first.exists(), "first cell did not finish in time"
    os.killpg(p.pid, signal.SIGKILL)  # the runner and the cell in flight die at once
    p.wait()
    second = results / "runs" / "synth" / "baseline" / "1-0" / "metrics.json"
    assert not second.exists()
    before = (first.stat().st_mtime_ns, first.read_bytes())
    r = _bench(results, "--folds", "0,1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 finished cell(s) of the same identity skipped" in r.stderr
    assert (first.stat().st_mtime_ns, first.read_bytes()) == before  # finished work untouched
    m = json.loads(second.read_text())
    assert m["fold"] == 1 and m["n_test"] > 0
    run = second.parent
    for name in ("config.json", "history.csv", "predictions.parquet", "environment.json"):
        assert (run / name).exists(), name
    preds = pd.read_parquet(run / "predictions.parquet")
    assert len(preds) == m["n_test"] and preds["sample"].is_unique
    assert set(preds["subject"]).isdisjoint(m["train_subjects"])
    # SynthAU ground truth for the bias breakdown: fold 1's test subjects, its contrarian among them
    meta = json.loads((default_cache_dir() / f"synth-seed0-v{GENERATOR_VERSION}" / "meta.json").read_text())
    assert set(m["test_habits"]) == set(preds["subject"])
    assert {s for s, h in m["test_habits"].items() if h["contrarian"]} == {
        s for s in preds["subject"] if meta["habits"][s]["contrarian"]} != set()
    # leaderboard from stored runs only, byte-identical when rebuilt
    md, csv = results / "synth" / "leaderboard.md", results / "synth" / "leaderboard.csv"
    first_md, first_csv = md.read_bytes(), csv.read_bytes()
    r = subprocess.run([sys.executable, "-m", "aurecog.cli", "leaderboard", "--dataset", "synth", "--results",
                        str(results)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert md.read_bytes() == first_md and csv.read_bytes() == first_csv
    table = pd.read_csv(csv)
    row = table[table.model == "baseline"].iloc[0]
    folds = [json.loads((results / "runs/synth/baseline" / f"{f}-0/metrics.json").read_text()) for f in (0, 1)]
    assert row["f1"] == pytest.approx(sum(f["test"]["f1"] for f in folds) / 2, abs=1e-6)  # mean over folds
    assert row["runs"] == 2


def test_submitit_local_launcher_with_wandb_offline(tmp_path):
    results = tmp_path / "results"
    r = _bench(results, "--folds", "2", "--launcher", "submitit-local", "--wandb", "offline",
               env_extra={"WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stdout + r.stderr
    run = results / "runs" / "synth" / "baseline" / "2-0"
    m = json.loads((run / "metrics.json").read_text())
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, list((run / "wandb").iterdir())
    blob = next(offline[0].glob("*.wandb")).read_bytes()
    # the run file holds the summary records: key and JSON value of the test metric
    assert b"test/f1" in blob and json.dumps(m["test"]["f1"]).encode()[:8] in blob


def test_ddp_two_process_evaluation_equals_single_process(tmp_path, baseline_fold0):
    """``aurecog evaluate`` of a finished cell (the session's tiny baseline fold 0, conftest.py) on 2 DDP processes
    equals 1 process and the cell's stored test metrics."""
    results = baseline_fold0
    run = results / "runs" / "synth" / "baseline" / "0-0"
    ckpt = run / "checkpoints" / "best.ckpt"  # the checkpoint belongs to its run folder
    assert ckpt.exists()
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"eval{devices}.json"
        # its own process: Lightning's DDP launcher re-executes this command for rank 1; --ckpt takes the run
        # folder (2 processes) or the checkpoint file (1 process)
        e = subprocess.run([sys.executable, "-m", "aurecog.cli", "evaluate", "--ckpt", str(run if devices == 2 else
                            ckpt), "--out", str(out),
                            "--devices", str(devices)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, WANDB_MODE="disabled"))
        assert e.returncode == 0, e.stdout + e.stderr
        outs[devices] = json.loads(out.read_text())
    one, two = outs[1], outs[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["n_test"] == one["n_test"] and two["samples"] == one["samples"]  # every sample exactly once
    assert len(set(two["samples"])) == len(two["samples"])
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    stored = json.loads((results / "runs/synth/baseline/0-0/metrics.json").read_text())
    assert one["metrics"]["f1"] == pytest.approx(stored["test"]["f1"], abs=1e-6)
