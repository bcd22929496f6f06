"""How the grid's cells run: ``local`` (a subprocess per cell), ``submitit-local`` and ``slurm`` (submitit).

Process safety (all launchers):

* Each local cell runs in its own session and process group, with a parent-death signal (Linux
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)``): SIGKILL to the runner kills its cells at once. Lightning's DDP ranks and
  submitit jobs call :func:`guard_process` at start, so they die with their own parent too.
* SIGTERM, SIGINT or SIGHUP to the runner: it sends SIGTERM to every running cell's process group, SIGKILL after
  :data:`STOP_GRACE_S`, marks their W&B offline runs as interrupted and exits 128 + signal (submitted Slurm jobs
  are cancelled with ``scancel``).
* A per-cell lock, ``<run folder's parent>/.<fold>-<seed>.lock`` (``fcntl.flock``), is taken before a cell starts
  and held by the cell process for its whole life (the runner hands the locked descriptor to the child and
  closes its own copy; a submitit job takes it itself), so it is released exactly when the cell dies. A second
  runner that finds a cell locked does not wait: it reports ``cell X is being trained by pid N`` and goes on with
  the other cells (two runners on one grid share the work; the second exits 1 so its grid is known to be
  incomplete). After taking a lock a runner checks again whether the cell finished meanwhile.
* W&B: a new attempt of a cell first renames the cell's earlier ``wandb/offline-run-*`` folders to
  ``interrupted-offline-run-*`` (no ``metrics.json``) or ``superseded-offline-run-*`` (a finished but stale
  cell), so ``wandb sync results/runs/.../wandb/offline-run-*`` uploads exactly one run per cell.

Slurm: the request comes from the cell config's ``slurm:`` section (configs/profiles/*.yaml), CLI flags override
(aurecog/runner/slurm.py). A refused submission is one :class:`LauncherError` line (the CLI exits 2). While jobs
wait, the runner polls ``scontrol show job`` and shows each job's state and reason; a job PENDING for a reason
that cannot resolve itself (:data:`HOPELESS_REASONS`) for longer than ``slurm.pending_grace_s`` is cancelled
with the scheduler's reason (all of the grid's jobs are cancelled, the CLI exits 2).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from aurecog.config import REPO_ROOT
from aurecog.runner.grid import Cell
from aurecog.runner.slurm import (
    DONE_STATES,
    HOPELESS_REASONS,
    SLURM_DEFAULTS,
    LauncherError,
    describe_request,
    sbatch_error,
    slurm_job_state,
    slurm_request,
    submitit_parameters,
)

STOP_GRACE_S = 3.0  # SIGTERM -> SIGKILL delay for a stopped cell's process group
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


# --------------------------------------------------------------------------------------------------------------
# process safety

def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _preexec(parent_pid: int):
    def fn():  # runs in the child between fork and exec (after setsid); the death signal survives exec
        set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent_pid:  # the runner died before prctl took effect
            os._exit(1)
    return fn


def guard_process() -> None:
    """Call first in a cell process: die with the parent that started it. ``AURECOG_PARENT_PID`` (set by the local
    launcher, then by each guarded process for its own children, e.g. Lightning's DDP ranks) says who that is."""
    expected = os.environ.get("AURECOG_PARENT_PID")
    if expected == str(os.getpid()):  # already guarded (a submitit job's run_spec_file, then the cell's main)
        return
    set_parent_death_signal(signal.SIGKILL)
    if expected and int(expected) != os.getppid():
        os._exit(1)
    os.environ["AURECOG_PARENT_PID"] = str(os.getpid())


def cell_env(threads: int, parent_pid: int | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    if parent_pid is not None:
        env["AURECOG_PARENT_PID"] = str(parent_pid)
    return env


def lock_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


class CellLock:
    """``fcntl.flock`` on the cell's lock file. The file's text names the process that trains the cell."""

    def __init__(self, run_dir: Path):
        self.path = lock_path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def write_holder(self, pid: int) -> None:
        text = json.dumps({"pid": pid, "host": socket.gethostname(), "runner": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']} since {h['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def close(self) -> None:  # the runner's copy; a child that inherited the descriptor keeps the lock
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def retire_wandb_runs(run_dir: Path, reason: str | None = None) -> list[Path]:
    """Rename the cell's ``wandb/offline-run-*`` folders to ``<reason>-offline-run-*`` (reason: ``interrupted``
    when the cell has no ``metrics.json``, else ``superseded``) so ``wandb sync .../offline-run-*`` skips them."""
    from aurecog.runner.cell import FINISHED

    wdir = Path(run_dir) / "wandb"
    if not wdir.is_dir():
        return []
    reason = reason or ("superseded" if (Path(run_dir) / FINISHED).exists() else "interrupted")
    out = []
    for d in sorted(wdir.glob("offline-run-*")):
        target = d.with_name(f"{reason}-{d.name}")
        os.replace(d, target)
        out.append(target)
    latest = wdir / "latest-run"
    if latest.is_symlink() and not latest.exists():
        latest.unlink()
    return out


@contextlib.contextmanager
def _stop_signals():
    """Turn SIGTERM/SIGINT/SIGHUP into :class:`_Stopped` in the main thread while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in _STOP_SIGNALS:  # a second signal during the clean-up must not interrupt it
            signal.signal(s, signal.SIG_IGN)
        raise _Stopped(signum)

    old = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Stopped(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_groups(pids: list[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``grace`` seconds (members outliving the leader too)."""
    def signal_all(sig):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(_group_alive(p) for p in pids):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_stopped(e: _Stopped, console, n_cells: int) -> None:
    name = signal.Signals(e.signum).name
    console.print(f"[red]runner interrupted by {name}: stopped {n_cells} running cell(s); they stay unfinished "
                  f"and are redone by the next run[/red]")
    raise SystemExit(128 + e.signum)


# --------------------------------------------------------------------------------------------------------------
# progress helpers shared by the launchers

def epoch_update(progress, task_id, cell: Cell, prefix: str = "") -> None:
    try:
        st = json.loads(cell.status_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    progress.update(task_id, total=st.get("total", 1), completed=st.get("done", 0),
                    description=f"  {cell.model} f{cell.fold} s{cell.seed} {prefix}{st.get('phase', '')}")


def finish(cell: Cell, rc: int, progress, grid_task, result) -> None:
    if rc == 0 and cell.finished():
        result["done"].append(cell)
    else:
        tail = ""
        if cell.log_path.exists():
            tail = "\n".join(cell.log_path.read_text(errors="replace").splitlines()[-25:])
        result["failed"].append((cell, tail))
        progress.console.print(f"[red]cell failed: {cell.key} (exit {rc}); log: {cell.log_path}[/red]\n{tail}")
    progress.advance(grid_task)


def _busy(cell: Cell, lock: CellLock, progress, grid_task, result) -> None:
    msg = (f"cell {cell.dataset} {cell.key} is being trained by {lock.holder()} (lock {lock.path}); not started "
           f"here, rerun when that run is done")
    progress.console.print(f"[yellow]{msg}[/yellow]")
    result.setdefault("busy", []).append(cell)
    result["failed"].append((cell, msg))
    progress.advance(grid_task)


# --------------------------------------------------------------------------------------------------------------
# local launcher

def run_local(todo: list[Cell], jobs: int, threads: int, progress, grid_task, result) -> None:
    """Each cell in its own process (``--jobs`` at a time), own process group, locked, dying with the runner."""
    pending = list(todo)
    running: list[tuple[Cell, subprocess.Popen, int]] = []
    try:
        with _stop_signals():
            while pending or running:
                while pending and len(running) < max(1, jobs):
                    c = pending.pop(0)
                    started = _start_local(c, threads, progress, grid_task, result)
                    if started is not None:
                        running.append((c, started, progress.add_task(f"  {c.model} f{c.fold} s{c.seed}", total=1)))
                time.sleep(0.5)
                for item in list(running):
                    c, p, tid = item
                    epoch_update(progress, tid, c)
                    rc = p.poll()
                    if rc is not None:
                        running.remove(item)
                        progress.remove_task(tid)
                        finish(c, rc, progress, grid_task, result)
    except _Stopped as e:
        n = len(running)
        _stop_local(running)
        _exit_stopped(e, progress.console, n)
    finally:
        _stop_local(running)  # any other way out (an error in the runner): no cell outlives it


def _start_local(c: Cell, threads: int, progress, grid_task, result) -> subprocess.Popen | None:
    lock = CellLock(c.run_dir)
    if not lock.acquire():
        _busy(c, lock, progress, grid_task, result)
        return None
    try:
        if c.finished():  # another runner finished it while this one was waiting for a slot
            result["skipped"].append(c)
            progress.advance(grid_task)
            return None
        retire_wandb_runs(c.run_dir)
        c.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "aurecog.runner.cell", str(c.log_path.with_suffix(".spec.json"))]
        # the cell's own resolved trainer.threads (part of its identity), not the runner's share of the cores
        threads = int((c.config.get("trainer") or {}).get("threads") or threads)
        with open(c.log_path, "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cell_env(threads, os.getpid()),
                                 cwd=str(REPO_ROOT), start_new_session=True, pass_fds=(lock.fd,),
                                 preexec_fn=_preexec(os.getpid()))
        lock.write_holder(p.pid)
        return p
    finally:
        lock.close()  # the child holds the inherited descriptor (and with it the lock) until it dies


def _stop_local(running: list) -> None:
    if not running:
        return
    _stop_groups([p.pid for _, p, _ in running])
    for c, p, _ in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
        if not c.finished():
            retire_wandb_runs(c.run_dir, "interrupted")
    running.clear()


# --------------------------------------------------------------------------------------------------------------
# submitit jobs (submitit-local and slurm)

_JOB_LOCK: CellLock | None = None  # held for the job's life


def run_spec_file(spec_path: str) -> int:
    """Entry point of submitit jobs (a picklable top-level function): guard, lock, retire W&B runs, run the cell."""
    global _JOB_LOCK
    from aurecog.runner.cell import main

    guard_process()
    runner = os.environ.get("AURECOG_RUNNER_PID")
    if runner and os.environ.get("SUBMITIT_EXECUTOR") == "local":
        threading.Thread(target=_watch_runner, args=(int(runner),), daemon=True).start()
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:  # DDP ranks >= 1 of a multi-task job share rank 0's lock
        lock = CellLock(run_dir)
        if not lock.acquire():
            m = spec["config"]["model"]["name"]
            raise RuntimeError(f"cell {m} fold {spec['fold']} seed {spec['seed']} is being trained by "
                               f"{lock.holder()} (lock {lock.path}); this job stops")
        lock.write_holder(os.getpid())
        _JOB_LOCK = lock
        retire_wandb_runs(run_dir)
    return main([spec_path])


def _watch_runner(pid: int) -> None:
    """submitit-local jobs are children of submitit's controller, not of the runner: die when the runner dies."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGKILL)
        except PermissionError:
            pass


def run_submitit(todo: list[Cell], launcher: str, slurm: dict, progress, grid_task, result) -> None:
    import submitit

    folder = todo[0].log_path.parents[2] / "submitit"  # <logs>/submitit
    jobs: list[tuple[Cell, object, int, dict]] = []
    try:
        with _stop_signals():
            if launcher == "slurm":
                for c in todo:
                    req = slurm_request(c.config.get("slurm"), slurm, where=_slurm_where(c))
                    executor = submitit.SlurmExecutor(folder=str(folder))
                    executor.update_parameters(**submitit_parameters(req))
                    job = _submit(executor, c, req)
                    tid = progress.add_task(f"  {c.model} f{c.fold} s{c.seed} slurm {job.job_id} submitted", total=1)
                    jobs.append((c, job, tid, req))
                    progress.console.print(f"[dim]submitted {c.key} as Slurm job {job.job_id} "
                                           f"({describe_request(req)})[/dim]")
                _wait_slurm(jobs, progress, grid_task, result)
            else:
                executor = submitit.LocalExecutor(folder=str(folder))
                executor.update_parameters(timeout_min=int(slurm.get("timeout_min") or 120))
                os.environ["AURECOG_RUNNER_PID"] = str(os.getpid())  # read by run_spec_file's watchdog
                try:
                    for c in todo:
                        job = executor.submit(run_spec_file, str(c.log_path.with_suffix(".spec.json")))
                        jobs.append((c, job, progress.add_task(f"  {c.model} f{c.fold} s{c.seed}", total=1), {}))
                        progress.console.print(f"[dim]submitted {c.key} as job {job.job_id}[/dim]")
                finally:
                    os.environ.pop("AURECOG_RUNNER_PID", None)
                _wait_local_jobs(jobs, progress, grid_task, result)
    except _Stopped as e:
        n = len(jobs)
        _cancel(jobs)
        _exit_stopped(e, progress.console, n)
    except BaseException:
        _cancel(jobs)
        raise


def _cancel(jobs) -> None:
    for c, job, _, _ in jobs:
        with contextlib.suppress(Exception):
            if not job.paths.result_pickle.exists():
                job.cancel(check=False)
                if not c.finished():
                    retire_wandb_runs(c.run_dir, "interrupted")
    jobs.clear()


def _job_failed(c: Cell, job, message: str) -> None:
    c.log_path.parent.mkdir(parents=True, exist_ok=True)
    c.log_path.write_text(f"{message}\n{_read(job.paths.stdout)}{_read(job.paths.stderr)}")


def _read(p: Path) -> str:
    try:
        return Path(p).read_text(errors="replace")
    except OSError:
        return ""


def _wait_local_jobs(jobs, progress, grid_task, result) -> None:
    while jobs:
        time.sleep(0.5)
        for item in list(jobs):
            c, job, tid, _ = item
            epoch_update(progress, tid, c)
            if not job.done():
                continue
            jobs.remove(item)
            progress.remove_task(tid)
            try:
                job.result()
                rc = 0
            except Exception as e:  # the job's own traceback is in its submitit log
                _job_failed(c, job, str(e))
                rc = 1
            finish(c, rc, progress, grid_task, result)


# --------------------------------------------------------------------------------------------------------------
# Slurm submission and polling (the request itself: aurecog/runner/slurm.py)

def _slurm_where(c: Cell) -> str:
    return f"the `slurm:` section of configs/profiles/{c.config.get('profile', '<profile>')}.yaml"


def _submit(executor, c: Cell, req: dict):
    try:
        return executor.submit(run_spec_file, str(c.log_path.with_suffix(".spec.json")))
    except Exception as e:  # sbatch refused the request, or sbatch is missing
        raise LauncherError(f"Slurm refused the job for {c.key}: {sbatch_error(e)} (request: {describe_request(req)}; "
                            f"change {_slurm_where(c)} or the --cpus-per-task/--gpus-per-node/--mem-gb/"
                            "--timeout-min/--slurm-partition flags)") from None


def _wait_slurm(jobs, progress, grid_task, result, state_fn=None) -> None:
    """Poll every job until it ends; stop (cancel the grid's jobs, LauncherError) on a hopeless PENDING reason."""
    state_fn = state_fn or slurm_job_state
    hopeless_since: dict[str, float] = {}
    last: dict[str, tuple[str, str]] = {}
    gone_since: dict[str, float] = {}
    poll = min(float(r.get("poll_s") or 5) for _, _, _, r in jobs) if jobs else 5.0
    while jobs:
        for item in list(jobs):
            c, job, tid, req = item
            if job.paths.result_pickle.exists():
                jobs.remove(item)
                progress.remove_task(tid)
                try:
                    job.result()
                    rc = 0
                except Exception as e:
                    _job_failed(c, job, f"Slurm job {job.job_id} failed: {e}")
                    rc = 1
                finish(c, rc, progress, grid_task, result)
                continue
            state, reason = state_fn(job.job_id)
            if (state, reason) != last.get(job.job_id):
                last[job.job_id] = (state, reason)
                progress.update(tid, description=f"  {c.model} f{c.fold} s{c.seed} slurm {job.job_id} {state}"
                                + (f" ({reason})" if state == "PENDING" else ""))
                if state == "PENDING" and reason not in ("None", "Priority", "Resources"):
                    progress.console.print(f"[yellow]Slurm job {job.job_id} ({c.key}) PENDING, Reason={reason}"
                                           "[/yellow]")
            if state == "RUNNING":
                epoch_update(progress, tid, c, prefix=f"slurm {job.job_id} ")
            if state == "PENDING" and reason.split(",")[0].strip("()") in HOPELESS_REASONS:
                t0 = hopeless_since.setdefault(job.job_id, time.time())
                grace = float(req.get("pending_grace_s", SLURM_DEFAULTS["pending_grace_s"]))
                if time.time() - t0 >= grace:
                    raise LauncherError(
                        f"Slurm job {job.job_id} ({c.key}) cannot start: PENDING with Reason={reason} for "
                        f"{time.time() - t0:.0f} s (request: {describe_request(req)}); cancelled the grid's jobs. "
                        f"Check `sinfo -o '%P %c %m %G'` and change {_slurm_where(c)} or the flags")
            else:
                hopeless_since.pop(job.job_id, None)
            if state in DONE_STATES or state == "GONE":
                # the job ended; its result pickle may lag on a network filesystem
                t0 = gone_since.setdefault(job.job_id, time.time())
                if time.time() - t0 > 30 and not job.paths.result_pickle.exists():
                    jobs.remove(item)
                    progress.remove_task(tid)
                    _job_failed(c, job, f"Slurm job {job.job_id} ended {state} ({reason}) without a result")
                    finish(c, 1, progress, grid_task, result)
        if jobs:
            time.sleep(poll)
