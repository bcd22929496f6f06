"""Process safety of the grid runner (aurecog/runner/launchers.py): a signal to ``aurecog bench`` leaves no cell
running, two runners never train one cell, and an interrupted cell's W&B offline run is marked so that exactly
one run per cell is synced. Cells are the tiny SynthAU baseline cells of tests/test_runner.py; each test kills
its runner as soon as the cell process is up (or its W&B run folder exists), so no test trains to the end except
the W&B rerun."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aurecog.config import REPO_ROOT
from aurecog.runner.launchers import CellLock, guard_process, lock_path, retire_wandb_runs, set_parent_death_signal

TINY = ["--set", "trainer.max_epochs=1", "--set", "trainer.limit_train_batches=3", "--set",
        "data.eval_batch_size=256"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks read /proc (Linux)")


def _cmd(results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "aurecog.cli", "bench", "--dataset", "synth", "--models", "baseline", "--folds",
            "0", "--results", str(results), "--no-leaderboard", *TINY, *extra]


def _env(tmp_path: Path, wandb: str = "disabled") -> dict:
    return {**os.environ, "WANDB_MODE": wandb, "AURECOG_CHECKPOINTS": str(tmp_path / "ckpt")}


def _start(tmp_path: Path, *extra: str, wandb: str = "disabled", name: str = "runner") -> subprocess.Popen:
    out = open(tmp_path / f"{name}.out", "w")
    p = subprocess.Popen(_cmd(tmp_path / "results", *extra), cwd=REPO_ROOT, env=_env(tmp_path, wandb),
                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return p


def _procs(marker: str, exclude: set[int] = frozenset()) -> dict[int, str]:
    """Live processes (not zombies) whose command line mentions ``marker``: the cells of one test's runner."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in exclude or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found[int(d.name)] = cmd
    return found


def _run_dir(tmp_path: Path) -> Path:
    return tmp_path / "results" / "runs" / "synth" / "baseline" / "0-0"


def _wait_cell(tmp_path: Path, runner: subprocess.Popen, timeout: float = 300) -> int:
    """The cell's pid, read from its lock file once the cell process is alive."""
    lock = lock_path(_run_dir(tmp_path))
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert runner.poll() is None, (tmp_path / "runner.out").read_text()
        for pid in _procs(str(tmp_path), {runner.pid}):  # paused by an earlier test's _ready: let it start
            os.kill(pid, signal.SIGCONT)
        try:
            pid = json.loads(lock.read_text())["pid"]
            if pid in _procs(str(tmp_path)):
                return pid
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError("the cell did not start in time")


def _cleanup(tmp_path: Path, *runners: subprocess.Popen) -> None:
    for r in runners:
        if r.poll() is None:
            os.killpg(r.pid, signal.SIGKILL)
            r.wait()
    for pid in _procs(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)


def _gone_within(tmp_path: Path, seconds: float, exclude: set[int] = frozenset()) -> dict[int, str]:
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = _procs(str(tmp_path), exclude)
        if not left:
            return {}
        time.sleep(0.1)
    return _procs(str(tmp_path), exclude)


LONG = ["--set", "trainer.max_epochs=100"]  # cells that never finish during a test (they are paused meanwhile)
KINDS = ("SIGTERM", "SIGINT", "SIGKILL", "second-runner", "wandb")
WANDB = ("SIGTERM", "wandb")  # runners logging to W&B offline


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """One runner per test below, all started at once (their start-up, mostly imports, overlaps); each cell is
    paused (SIGSTOP) as soon as it is up, so the waiting cells cost no CPU, and resumed by its test. The SynthAU
    preset is generated first: a cell paused while it held the generation lock would block every other runner
    (seen on a fresh clone, where no cache exists yet)."""
    from aurecog.data.synth import generate

    generate("synth", progress=False)
    started = {k: (tmp_path_factory.mktemp(k.lower()), None) for k in KINDS}
    started = {k: (d, _start(d, *LONG, *(["--wandb", "offline"] if k in WANDB else []),
                             wandb="offline" if k in WANDB else "disabled")) for k, (d, _) in started.items()}
    yield started
    for d, r in started.values():
        for pid in _procs(str(d)):
            os.kill(pid, signal.SIGCONT)
        _cleanup(d, r)


def _ready(runners, kind: str) -> tuple[Path, subprocess.Popen, int]:
    d, runner = runners[kind]
    cell = _wait_cell(d, runner)
    for k, (dk, rk) in runners.items():  # pause the other tests' cells that are up already
        if k != kind and rk.poll() is None:
            # cells only: a runner's child forked but not yet exec'd carries the runner's command line, and
            # stopping it would leave that runner waiting on the exec forever (seen on a fresh clone)
            for pid, cmd in _procs(str(dk), {rk.pid}).items():
                if "aurecog.runner.cell" in cmd:
                    os.kill(pid, signal.SIGSTOP)
    for pid in _procs(str(d), {runner.pid}):
        os.kill(pid, signal.SIGCONT)
    return d, runner, cell


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_signal_to_the_runner_leaves_no_cell_running(runners, sig):
    tmp_path, runner, cell = _ready(runners, sig.name)
    time.sleep(1.0)  # into the cell's imports / training
    if sig.name in WANDB:
        _wait_wandb_run(_run_dir(tmp_path), runner)
    os.kill(runner.pid, sig)  # the runner only, as `kill` or Ctrl-C in its terminal would
    rc = runner.wait(timeout=30)
    left = _gone_within(tmp_path, 5.0)
    assert not left, f"cell processes outlived the runner ({sig.name}): {left}"
    out = " ".join((tmp_path / "runner.out").read_text().split())
    if sig != signal.SIGKILL:
        assert rc == 128 + sig, out
        assert f"runner interrupted by {sig.name}: stopped 1 running cell(s)" in out, out
    assert not (_run_dir(tmp_path) / "metrics.json").exists()
    if sig.name in WANDB:  # the runner marked its interrupted cell's W&B run: `wandb sync .../offline-run-*` skips it
        wdir = _run_dir(tmp_path) / "wandb"
        assert not list(wdir.glob("offline-run-*")) and len(list(wdir.glob("interrupted-offline-run-*"))) == 1
    lock = CellLock(_run_dir(tmp_path))  # released with the cell (its last descriptor closes as it exits)
    deadline = time.time() + 5
    while not lock.acquire() and time.time() < deadline:
        time.sleep(0.05)
    assert lock.fd is not None, "the cell's lock outlived it"
    lock.close()


def test_a_second_runner_does_not_train_a_cell_in_training(runners):
    tmp_path, first, cell = _ready(runners, "second-runner")
    log = sorted(tmp_path.rglob("0-0.log"))
    r = subprocess.run(_cmd(tmp_path / "results", *LONG), cwd=REPO_ROOT, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 1, out
    assert f"cell synth baseline fold 0 seed 0 is being trained by pid {cell} " in out, out
    assert "done 0, skipped 0, failed 1" in out, out
    # the first runner's cell is untouched: alive, still the only cell process, its log still there
    assert [p for p, c in _procs(str(tmp_path), {first.pid}).items() if "aurecog.runner.cell" in c] == [cell]
    assert log and log[0].stat().st_size > 0
    assert first.poll() is None
    _cleanup(tmp_path, first)  # its cell would train on, slowing the tests after this one


def _wait_wandb_run(run: Path, runner: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not list((run / "wandb").glob("offline-run-*")) and time.time() < deadline:
        assert runner.poll() is None
        time.sleep(0.1)
    assert list((run / "wandb").glob("offline-run-*")), "no W&B offline run appeared"


def test_an_interrupted_cells_wandb_run_is_marked_and_one_run_per_cell_syncs(runners):
    """SIGKILL: no handler runs, so the rerun marks the dead attempt's offline run before it starts the cell (the
    SIGTERM test above checks that a runner stopped by a signal marks it itself)."""
    tmp_path, runner, _ = _ready(runners, "wandb")
    run = _run_dir(tmp_path)
    _wait_wandb_run(run, runner)
    os.kill(runner.pid, signal.SIGKILL)
    runner.wait(timeout=30)
    assert not _gone_within(tmp_path, 5.0)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # the dead attempt's run, not yet marked
    r = subprocess.run(_cmd(tmp_path / "results", "--wandb", "offline"), cwd=REPO_ROOT,
                       env=_env(tmp_path, "offline"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((run / "metrics.json").read_text())
    synced = sorted((run / "wandb").glob("offline-run-*"))  # what `wandb sync .../wandb/offline-run-*` uploads
    assert len(synced) == 1, sorted(p.name for p in (run / "wandb").iterdir())
    blob = next(synced[0].glob("*.wandb")).read_bytes()
    assert b"test/f1" in blob and json.dumps(m["test"]["f1"]).encode()[:8] in blob  # the finished attempt
    marked = sorted(p.name for p in (run / "wandb").glob("interrupted-offline-run-*"))
    assert len(marked) == 1, sorted(p.name for p in (run / "wandb").iterdir())


def test_retire_wandb_runs_names(tmp_path):
    w = tmp_path / "0-0" / "wandb"
    (w / "offline-run-20260101_000000-abc").mkdir(parents=True)
    (w / "latest-run").symlink_to(w / "offline-run-20260101_000000-abc")
    assert [p.name for p in retire_wandb_runs(tmp_path / "0-0")] == ["interrupted-offline-run-20260101_000000-abc"]
    assert not (w / "latest-run").is_symlink()  # the dangling link is gone
    (w / "offline-run-20260102_000000-def").mkdir()
    (tmp_path / "0-0" / "metrics.json").write_text("{}")  # a finished (stale) cell being redone
    assert [p.name for p in retire_wandb_runs(tmp_path / "0-0")] == ["superseded-offline-run-20260102_000000-def"]
    assert retire_wandb_runs(tmp_path / "missing") == []


def _in_child(fn) -> int:
    """Exit status of ``fn()`` run in a forked child (cheap: no new interpreter)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(int(fn() or 0))
        except BaseException:
            os._exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_parent_death_signal_and_guard(monkeypatch):
    """prctl really arms the signal, and a guarded process whose recorded parent is not its parent exits."""
    def armed():
        assert set_parent_death_signal(signal.SIGKILL)
        v = ctypes.c_int()
        ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0)  # PR_GET_PDEATHSIG
        return 0 if v.value == signal.SIGKILL else 1

    assert _in_child(armed) == 0
    monkeypatch.setenv("AURECOG_PARENT_PID", "1")  # not the child's parent: the runner that started it is gone
    assert _in_child(lambda: guard_process() or 0) == 1
    monkeypatch.setenv("AURECOG_PARENT_PID", str(os.getpid()))

    def guarded():  # its parent is the recorded one: it lives on and records itself for its own children
        guard_process()
        return 0 if os.environ["AURECOG_PARENT_PID"] == str(os.getpid()) else 4

    assert _in_child(guarded) == 0
