"""A result is a function of its inputs (issue #14): cell identity, validated overrides, checkpoints that belong to
their results folder, thread-invariant results, early failures, and the pinned environment."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import bench_baseline

from aurecog.config import REPO_ROOT
from aurecog.runner import grid
from aurecog.runner import identity as I

_bench = bench_baseline  # the tiny baseline cell, fold 0 (helpers.py)


def _run(results: Path) -> Path:
    return results / "runs" / "synth" / "baseline" / "0-0"


# ----------------------------------------------------------------------------------------------- overrides
def test_misspelt_override_fails_before_any_cell_with_the_closest_names():
    with pytest.raises(grid.GridError, match=r"unknown config key 'trainer.max_epoch'; did you mean "
                                             r"trainer.max_epochs"):
        grid.expand("synth", "baseline", "0", "0", overrides=["trainer.max_epoch=1"])
    with pytest.raises(grid.GridError, match=r"'data.augment.flip'.*data.augment.flip_p"):
        grid.expand("synth", "baseline", "0", "0", overrides=["data.augment.flip=0.3"])


def test_override_of_the_wrong_type_names_key_value_and_type():
    with pytest.raises(grid.GridError, match=r"--set trainer.max_epochs=two: expected int .*has 6.*got str 'two'"):
        grid.expand("synth", "baseline", "0", "0", overrides=["trainer.max_epochs=two"])
    with pytest.raises(grid.GridError, match=r"expected bool"):
        grid.expand("synth", "baseline", "0", "0", overrides=["data.augment.enabled=3"])
    # valid ones pass, including the polymorphic Lightning keys and a float key given an int
    cells = grid.expand("synth", "baseline", "0", "0", overrides=[
        "trainer.max_epochs=2", "trainer.devices=auto", "optim.lr=1", "trainer.limit_train_batches=0.5"])
    t = cells[0].config["trainer"]
    assert (t["max_epochs"], t["devices"], t["limit_train_batches"], cells[0].config["optim"]["lr"]) == \
        (2, "auto", 0.5, 1)


def test_cli_reports_a_bad_override_in_one_line_with_exit_2(tmp_path):
    r = _bench(tmp_path / "res", "--set", "trainer.max_epoch=1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --set trainer.max_epoch=1: unknown config key")
    assert "Traceback" not in r.stderr and not (tmp_path / "res" / "runs").exists()


# ------------------------------------------------------------------------------------------------ identity
def test_identity_covers_config_threads_data_and_code_but_not_fold_in_the_row():
    a = grid.expand("synth", "baseline", "0,1", "0")
    grid.assign_identities(a, jobs=1)
    b = grid.expand("synth", "baseline", "0", "0", overrides=["trainer.max_epochs=7"])
    grid.assign_identities(b, jobs=1)
    c = grid.expand("synth", "baseline", "0", "0", overrides=["trainer.threads=2"])
    grid.assign_identities(c, jobs=1)
    assert a[0].identity["row"] == a[1].identity["row"] and a[0].identity["cell"] != a[1].identity["cell"]
    assert b[0].identity["row"] != a[0].identity["row"]  # an override is part of the identity
    assert c[0].identity["row"] != a[0].identity["row"] and c[0].identity["threads"] == 2
    assert a[0].identity["threads"] == 1  # the quick profile fixes threads: --jobs does not change them
    d = grid.expand("synth", "baseline", "0", "0")
    grid.assign_identities(d, jobs=2)
    assert d[0].identity == a[0].identity
    assert a[0].identity["data"].startswith("synthau-v") and len(a[0].identity["code"]) == 16
    # the launcher's resource request is not part of the identity
    e = grid.expand("synth", "baseline", "0", "0")
    e[0].config = dict(e[0].config, slurm={"partition": "other"})
    grid.assign_identities(e, jobs=1)
    assert e[0].identity["row"] == a[0].identity["row"]


def test_code_fingerprint_follows_code_content_not_report_modules(tmp_path):
    root = tmp_path / "repo"
    (root / "aurecog" / "runner").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "aurecog" / "a.py").write_text("x = 1\n")
    (root / "configs" / "c.yaml").write_text("k: 1\n")
    (root / "aurecog" / "runner" / "leaderboard.py").write_text("y = 1\n")
    fp = I.code_fingerprint(root)
    (root / "aurecog" / "runner" / "leaderboard.py").write_text("y = 2\n")
    (root / "README.md").write_text("text")
    assert I.code_fingerprint(root) == fp
    (root / "configs" / "c.yaml").write_text("k: 2\n")
    assert I.code_fingerprint(root) != fp


def test_dirty_means_the_code_differs_not_the_results(tmp_path, monkeypatch):
    """A rerun rewrites tracked result files; that must not mark its own environment.json / W&B tag ``-dirty``
    (session 4: all 42 committed synth cells said -dirty while their identity said clean)."""
    from aurecog.runner import cell

    root = tmp_path / "repo"
    for d in ("aurecog", "configs", "results"):
        (root / d).mkdir(parents=True)
    (root / "aurecog" / "a.py").write_text("x = 1\n")
    (root / "results" / "m.json").write_text("{}\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    monkeypatch.setattr(I, "REPO_ROOT", root)
    monkeypatch.setattr(I.git_state, "__defaults__", (root,))
    (root / "results" / "m.json").write_text('{"f1": 0.5}\n')
    assert I.git_state(root)["dirty"] is False
    assert not cell.git_revision().endswith("-dirty")
    (root / "aurecog" / "a.py").write_text("x = 2\n")
    assert I.git_state(root)["dirty"] is True
    assert cell.git_revision().endswith("-dirty")


def test_running_a_cell_does_not_import_the_report_only_modules():
    code = ("import sys; import aurecog.runner.cell, aurecog.runner.grid, aurecog.models.registry, "
            "aurecog.data.datamodule, aurecog.data.synth; "
            "from aurecog.models.registry import family_class; [family_class(f) for f in "
            "('baseline', 'cisnet', 'ac2d', 'iern', 'renet')]; "
            "print(sorted(m for m in sys.modules if m.startswith('aurecog')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = set(eval(r.stdout.strip().splitlines()[-1]))
    report = {p.removesuffix(".py").replace("/", ".") for p in I.REPORT_ONLY}
    assert loaded and not (loaded & report), loaded & report


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def two_runs(baseline_fold0, tmp_path_factory):
    """The same baseline cell benched into two results folders, ``--jobs 1`` (the session's, conftest.py) and
    ``--jobs 2``; shared read-only by the tests below (each bench trains a cell, so they are not repeated)."""
    b = tmp_path_factory.mktemp("identity-runs") / "b"
    rb = _bench(b, "--jobs", "2")
    assert rb.returncode == 0, rb.stdout + rb.stderr
    return baseline_fold0, b


def test_an_override_redoes_a_finished_cell_and_a_rerun_reuses_it(tmp_path, two_runs):
    """On a copy of a finished results folder: a rerun skips the cell, ``--keep-stale`` keeps it, a changed
    override redoes it (never touching the original folder's checkpoint), a corrupt metrics.json is redone."""
    import shutil

    first = two_runs[0]
    res = tmp_path / "res"
    shutil.copytree(first, res)
    m = json.loads((_run(res) / "metrics.json").read_text())
    assert m["identity"]["threads"] == 1 and m["identity"]["lock"] == I.lock_fingerprint()
    # training prevalence for the leaderboard's floors: from the fitted subjects' frames, recomputed here
    from aurecog.data.prepared import PreparedDataset
    from aurecog.data.synth import generate

    idx = PreparedDataset.open(generate("synth", progress=False)).index
    fit = idx[idx["subject"].astype(str).isin(m["train_subjects"])]
    for au, v in m["train_prevalence"].items():
        known = fit[au][fit[au] >= 0]
        assert v == pytest.approx(float((known == 1).mean()), abs=1e-12), au
    r = _bench(res)
    assert "1 finished cell(s) of the same identity skipped" in r.stderr
    r = _bench(res, "--set", "trainer.limit_train_batches=2", "--keep-stale")
    assert "kept stale cell baseline fold 0 seed 0 (config)" in r.stderr, r.stderr
    assert json.loads((_run(res) / "metrics.json").read_text())["identity"] == m["identity"]
    ck = _run(first) / "checkpoints" / "best.ckpt"
    before = _sha(ck)
    r = _bench(res, "--set", "trainer.limit_train_batches=2")
    assert r.returncode == 0 and "redoing stale cell baseline fold 0 seed 0: config" in r.stderr, r.stderr
    m2 = json.loads((_run(res) / "metrics.json").read_text())
    assert m2["identity"]["row"] != m["identity"]["row"]
    assert json.loads((_run(res) / "config.json").read_text())["trainer"]["limit_train_batches"] == 2
    # checkpoints stay in their results folder: the retrain into the copy left the original's untouched
    assert (_run(res) / "checkpoints" / "best.ckpt").exists() and _sha(ck) == before
    assert not (REPO_ROOT / "checkpoints" / "synth" / "baseline" / "0-0").exists() or \
        (REPO_ROOT / "checkpoints" / "synth" / "baseline" / "0-0" / "best.ckpt").stat().st_mtime < ck.stat().st_mtime
    # a corrupt metrics.json is named and its cell redone
    (_run(res) / "metrics.json").write_text("{not json")
    r = _bench(res, "--set", "trainer.limit_train_batches=2")
    assert r.returncode == 0 and "redoing corrupt cell" in r.stderr and "metrics.json" in r.stderr, r.stderr
    assert json.loads((_run(res) / "metrics.json").read_text())["identity"] == m2["identity"]


def test_jobs_do_not_change_numbers_and_checkpoints_stay_in_their_results_folder(two_runs):
    """Same identity -> bit-identical metrics and predictions with --jobs 1 and --jobs 2 (threads come from the
    config), each folder with its own checkpoint. (That a retrain into another results folder never touches the
    first one's checkpoint is checked by the override test's redo, on its copy.)"""
    a, b = two_runs
    ma, mb = (json.loads((_run(x) / "metrics.json").read_text()) for x in (a, b))
    assert ma["test"] == mb["test"] and ma["identity"] == mb["identity"]
    pa, pb = (pd.read_parquet(_run(x) / "predictions.parquet") for x in (a, b))
    pd.testing.assert_frame_equal(pa, pb, check_exact=True)
    assert (_run(a) / "checkpoints" / "best.ckpt").exists() and (_run(b) / "checkpoints" / "best.ckpt").exists()


def test_an_unwritable_results_folder_fails_before_training(tmp_path):
    res = tmp_path / "res"
    (res / "runs" / "synth").mkdir(parents=True)
    (res / "runs" / "synth" / "baseline").write_text("a file where the model's run folders should go")
    r = _bench(res, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot write to" in r.stderr and "--results" in r.stderr and "Traceback" not in r.stderr
    assert not (res / "logs" / "synth" / "baseline" / "0-0.log").exists()  # no cell was started


def test_the_environment_is_the_lock():
    """.venv holds exactly the packages of requirements.lock, at its versions (make env installs it)."""
    lock = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, ver = line.split("==")
            lock[name.lower().replace("_", "-")] = ver
    r = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                       timeout=120)
    have = {}
    for line in r.stdout.splitlines():
        if "==" in line:
            name, ver = line.split("==")
            have[name.lower().replace("_", "-")] = ver
    missing = {k: v for k, v in lock.items() if have.get(k) != v}
    extra = sorted(set(have) - set(lock))
    assert not missing and not extra, f"differs from requirements.lock: {missing}; not in the lock: {extra} " \
                                      "(make env rebuilds .venv; make lock re-pins)"
    assert lock["torch"] == "2.14.1" and lock["torchvision"] == "0.29.1"  # within the pip cap some machines carry


def test_committed_results_come_from_clean_revisions_and_one_identity_per_row():
    """Every committed run folder records an identity made from a committed (clean) tree and the pinned lock,
    and the cells of one leaderboard row (dataset, model, protocol level) share one row identity."""
    runs = sorted((REPO_ROOT / "results" / "runs").glob("**/metrics.json"))
    tracked = subprocess.run(["git", "ls-files", "results/runs"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=60).stdout.split()
    committed = [p for p in runs if str(p.relative_to(REPO_ROOT)) in set(tracked)]
    assert committed, "no committed run folders"
    rows: dict[str, set] = {}
    for p in committed:
        m = json.loads(p.read_text())
        ident = m.get("identity")
        assert ident, f"{p} has no identity (made before identities existed): regenerate it"
        assert not ident["dirty"], f"{p} was made from an uncommitted tree"
        assert len(ident["revision"]) == 40 and ident["lock"] != "no-lock", p
        rows.setdefault(str(p.parent.parent.relative_to(REPO_ROOT)), set()).add(ident["row"])
    mixed = {k: v for k, v in rows.items() if len(v) > 1}
    assert not mixed, f"rows mixing identities: {mixed}"
