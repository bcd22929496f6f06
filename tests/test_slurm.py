"""The Slurm launcher (aurecog/runner/launchers.py): the request from the config's ``slurm:`` section and flags,
what reaches sbatch, one-line refusals, and a stop with the scheduler's reason on a job that cannot start.

The integration tests need a real Slurm cluster: ``sudo scripts/slurm-single-node.sh`` starts a single-node one
on this machine (.ci/run does so before ``make test`` and sets AURECOG_REQUIRE_SLURM=1, so in CI they fail
instead of skipping when the cluster does not answer)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from aurecog.config import REPO_ROOT
from aurecog.runner import grid, launchers
from aurecog.runner import slurm as S
from aurecog.runner.slurm import LauncherError, sbatch_error, slurm_request, submitit_parameters

TINY = ["--set", "trainer.max_epochs=1", "--set", "trainer.limit_train_batches=3", "--set",
        "data.eval_batch_size=256"]


def _sbatch_script(req: dict, tmp_path: Path) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="true", folder=tmp_path, **submitit_parameters(req))


def test_request_comes_from_the_config_and_flags_override(tmp_path):
    cell = grid.expand("synth", "baseline", "0", "0", "quick")[0]
    req = slurm_request(cell.config["slurm"], {"cpus_per_task": None, "mem_gb": None})
    assert (req["gpus_per_node"], req["cpus_per_task"], req["mem_gb"], req["timeout_min"]) == (0, 2, 4, 60)
    script = _sbatch_script(req, tmp_path)
    # CPU-only: no GPU option at all, one task per node (the two submissions Slurm 22.05 refused before)
    assert "gpu" not in script and "gres" not in script
    assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --cpus-per-task=2\n" in script
    assert "#SBATCH --mem=4GB\n" in script and "#SBATCH --time=60\n" in script
    assert "--partition" not in script  # null: the cluster's default partition
    assert S.slurm_trainer_overrides(req) == []  # the config's own trainer (one process)

    req = slurm_request(cell.config["slurm"], {"gpus_per_node": 2, "cpus_per_task": 6, "mem_gb": 1.5,
                                               "partition": "gpu", "timeout_min": None})
    script = _sbatch_script(req, tmp_path)
    assert "#SBATCH --gpus-per-node=2\n" in script and "#SBATCH --ntasks-per-node=2\n" in script
    assert "#SBATCH --cpus-per-task=6\n" in script and "#SBATCH --mem=1536MB\n" in script
    assert "#SBATCH --partition=gpu\n" in script and "#SBATCH --time=60\n" in script
    assert S.slurm_trainer_overrides(req) == ["trainer.accelerator=gpu", "trainer.devices=2",
                                                      "trainer.num_nodes=1"]
    paper = grid.expand("synth", "baseline", "0", "0", "paper")[0].config["slurm"]
    assert slurm_request(paper)["gpus_per_node"] == 1 and slurm_request(paper)["cpus_per_task"] == 8
    extra = slurm_request({"additional": {"account": "proj", "qos": "normal"}})
    assert "#SBATCH --account=proj\n" in _sbatch_script(extra, tmp_path)


def test_bad_requests_fail_with_one_line_naming_the_key():
    with pytest.raises(LauncherError, match=r"unknown key\(s\) \['cpus'\] in the config's `slurm:` section"):
        slurm_request({"cpus": 4})
    with pytest.raises(LauncherError, match=r"slurm.cpus_per_task must be a positive integer, got 0 .*--cpus-per-task"):
        slurm_request({}, {"cpus_per_task": 0})
    with pytest.raises(LauncherError, match=r"slurm.gpus_per_node must be an integer >= 0, got -1"):
        slurm_request({"gpus_per_node": -1})


def test_sbatch_refusal_is_reduced_to_the_schedulers_words():
    from submitit.core.utils import FailedJobError

    e = FailedJobError('Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most '
                       'recent call last):\n  File "x.py", line 1\nsubprocess.CalledProcessError: Command '
                       '\'[\'sbatch\', \'/tmp/s.sh\']\' returned non-zero exit status 1.\n\nThe above exception...\n'
                       'sbatch: error: Invalid generic resource (gres) specification\n')
    assert sbatch_error(e) == "sbatch: error: Invalid generic resource (gres) specification"
    assert sbatch_error(FileNotFoundError("sbatch")).startswith("sbatch not found")


class _FakeJob:
    def __init__(self, job_id: str, folder: Path):
        self.job_id = job_id
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl", stdout=folder / "o",
                                     stderr=folder / "e")


def test_waiting_stops_with_the_reason_of_a_job_that_cannot_start(tmp_path):
    from rich.console import Console
    from rich.progress import Progress

    cell = grid.expand("synth", "baseline", "0", "0", "quick", results=tmp_path / "results")[0]
    req = slurm_request({"pending_grace_s": 0.3, "poll_s": 0.1})
    seen = []

    def state(job_id):  # Resources is ordinary queueing (waited on); PartitionConfig never resolves itself
        seen.append(job_id)
        return ("PENDING", "Resources") if len(seen) < 4 else ("PENDING", "PartitionConfig")

    console = Console(file=io.StringIO(), width=200)
    with Progress(console=console) as progress:
        tid = progress.add_task("x", total=1)
        jobs = [(cell, _FakeJob("41", tmp_path), tid, req)]
        with pytest.raises(LauncherError, match=r"Slurm job 41 \(baseline fold 0 seed 0\) cannot start: PENDING "
                                                r"with Reason=PartitionConfig for \d+ s \(request: --nodes=1"):
            launchers._wait_slurm(jobs, progress, progress.add_task("grid", total=1), {}, state_fn=state)
    assert len(seen) >= 5  # it polled through the Resources phase and then waited out the grace period
    assert "PENDING, Reason=PartitionConfig" in console.file.getvalue()  # said so while waiting


# ------------------------------------------------------------------------------------------------------------
# against a real cluster

def _cluster() -> None:
    why = S.slurm_available()
    if why:
        msg = f"no usable Slurm cluster ({why}); start one with `sudo scripts/slurm-single-node.sh`"
        if os.environ.get("AURECOG_REQUIRE_SLURM"):
            pytest.fail(msg + " (AURECOG_REQUIRE_SLURM is set: CI must run these tests)")
        pytest.skip(msg)


def _bench(results: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "synth", "--models", "baseline", "--folds",
           "0", "--results", str(results), "--no-leaderboard", *TINY, *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "AURECOG_CHECKPOINTS": str(results.parent / "ckpt")}
    p = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _done(p) if wait else p


def _done(p: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = p.communicate(timeout=900)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _our_jobs(results: Path) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, timeout=30).stdout
    return [ln for ln in out.splitlines() if str(results.parent) in ln]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """The runners of the cluster tests below, all started at once (their start-up, mostly imports, overlaps)."""
    _cluster()
    cpus = max(int(c) for c in subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                                              timeout=30).stdout.split())
    d = {k: tmp_path_factory.mktemp(k) for k in ("slurm", "local", "refused", "unschedulable")}
    started = {
        "slurm": _bench(d["slurm"] / "results", "--launcher", "slurm", wait=False),
        "local": _bench(d["local"] / "results", wait=False),  # the same cell, local launcher
        "refused": _bench(d["refused"] / "results", "--launcher", "slurm", "--slurm-partition", "no-such-partition",
                          wait=False),
        "unschedulable": _bench(d["unschedulable"] / "results", "--launcher", "slurm", "--cpus-per-task",
                                str(cpus + 1), "--pending-grace-s", "2", wait=False),
    }
    yield {k: (d[k] / "results", p) for k, p in started.items()}, cpus
    for p in started.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def test_slurm_run_folder_equals_a_local_run(runners):
    (slurm, p_slurm), (local, p_local) = runners[0]["slurm"], runners[0]["local"]
    r, r_local = _done(p_slurm), _done(p_local)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted baseline fold 0 seed 0 as Slurm job" in r.stderr
    assert r_local.returncode == 0, r_local.stdout + r_local.stderr
    a, b = (d / "runs" / "synth" / "baseline" / "0-0" for d in (slurm, local))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["test"].keys() == mb["test"].keys()
    for k, v in mb["test"].items():
        assert ma["test"][k] == pytest.approx(v, abs=1e-6, nan_ok=True), k
    assert (ma["n_train"], ma["n_test"], ma["selected_epoch"]) == (mb["n_train"], mb["n_test"], mb["selected_epoch"])
    pa, pb = (pd.read_parquet(d / "predictions.parquet") for d in (a, b))
    pd.testing.assert_frame_equal(pa, pb)


def test_a_refused_submission_is_one_line_and_exit_2(runners):
    r = _done(runners[0]["refused"][1])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "Slurm refused the job for baseline fold 0 seed 0: sbatch: error:" in errors[0]
    assert "Invalid partition name specified" in errors[0] and "--partition=no-such-partition" in errors[0]


def test_a_job_that_cannot_start_stops_with_the_schedulers_reason(runners):
    (results, p), cpus = runners[0]["unschedulable"], runners[1]
    r = _done(p)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "cannot start: PENDING with Reason=" in errors[0] and f"--cpus-per-task={cpus + 1}" in errors[0]
    assert not _our_jobs(results), "the job was not cancelled"
