"""Slurm requests: what a cell asks the scheduler for, and what the scheduler says back.

The request of a cell is its config's ``slurm:`` section (configs/profiles/*.yaml) with the ``aurecog bench``
flags on top (:func:`slurm_request`); :func:`submitit_parameters` turns it into submitit's sbatch options (no GPU
option at all on a CPU-only request, one task per GPU otherwise). Submission and polling live in
aurecog/runner/launchers.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from aurecog.runner.grid import GridError


class LauncherError(GridError):
    """A launcher problem the user must fix (refused submission, unschedulable job): one line, exit 2."""


SLURM_KEYS = {"partition", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "pending_grace_s",
              "poll_s", "additional"}
SLURM_DEFAULTS = {"partition": None, "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": None,
                  "timeout_min": 60, "pending_grace_s": 120, "poll_s": 5, "additional": {}}
# PENDING reasons that waiting does not fix (the request exceeds what the partition / nodes can ever give, or the
# nodes it needs are down): the job is cancelled after ``pending_grace_s``. Priority / Resources / Dependency /
# BeginTime are ordinary queueing and are waited on (shown in the progress bar).
HOPELESS_REASONS = ("BadConstraints", "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "PartitionDown",
                    "PartitionInactive", "ReqNodeNotAvail", "NodeDown", "Nodes_required_for_job_are_DOWN",
                    "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob",
                    "QOSMaxMemoryPerJob", "QOSMaxWallDurationPerJobLimit", "DependencyNeverSatisfied",
                    "AssocMaxWallDurationPerJobLimit", "AccountNotAllowed", "JobHeldAdmin")
DONE_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
               "BOOT_FAIL", "DEADLINE")


def slurm_request(section: dict | None, cli: dict | None = None, where: str = "the config's `slurm:` section") -> dict:
    """The Slurm request of one cell: defaults < the config's ``slurm:`` section < CLI flags (those not None)."""
    section = dict(section or {})
    unknown = sorted(set(section) - SLURM_KEYS)
    if unknown:
        raise LauncherError(f"unknown key(s) {unknown} in {where}; valid: {', '.join(sorted(SLURM_KEYS))}")
    req = {**SLURM_DEFAULTS, **{k: v for k, v in section.items() if v is not None or k == "partition"}}
    req.update({k: v for k, v in (cli or {}).items() if v is not None})
    for k in ("nodes", "cpus_per_task", "timeout_min"):
        if not isinstance(req[k], int) or isinstance(req[k], bool) or req[k] < 1:
            raise LauncherError(f"slurm.{k} must be a positive integer, got {req[k]!r} ({where} or --{_flag(k)})")
    if not isinstance(req["gpus_per_node"], int) or isinstance(req["gpus_per_node"], bool) or req["gpus_per_node"] < 0:
        raise LauncherError(f"slurm.gpus_per_node must be an integer >= 0, got {req['gpus_per_node']!r} ({where} or "
                            "--gpus-per-node)")
    if req["mem_gb"] is not None and (not isinstance(req["mem_gb"], (int, float)) or req["mem_gb"] <= 0):
        raise LauncherError(f"slurm.mem_gb must be a positive number or null, got {req['mem_gb']!r} ({where} or "
                            "--mem-gb)")
    if not isinstance(req["additional"], dict):
        raise LauncherError(f"slurm.additional must be a mapping of sbatch options, got {req['additional']!r}")
    return req


def _flag(k: str) -> str:
    return {"partition": "slurm-partition"}.get(k, k.replace("_", "-"))


def submitit_parameters(req: dict) -> dict:
    """submitit ``SlurmExecutor`` parameters: one task per GPU (Lightning DDP reads the Slurm environment), one task
    on a CPU-only request, and no GPU option at all when ``gpus_per_node`` is 0."""
    gpus = int(req["gpus_per_node"])
    p = {"job_name": "aurecog", "nodes": int(req["nodes"]), "ntasks_per_node": max(1, gpus),
         "cpus_per_task": int(req["cpus_per_task"]), "time": int(req["timeout_min"])}
    if gpus > 0:
        p["gpus_per_node"] = gpus
    if req.get("mem_gb"):
        mem = float(req["mem_gb"])
        p["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if req.get("partition"):
        p["partition"] = str(req["partition"])
    if req.get("additional"):
        p["additional_parameters"] = dict(req["additional"])
    return p


def slurm_trainer_overrides(req: dict) -> list[str]:
    """Trainer settings that match the allocation: with GPUs one DDP process per GPU on each node; CPU-only
    requests keep the config's trainer (one process), only ``num_nodes`` follows ``nodes``."""
    gpus, nodes = int(req["gpus_per_node"]), int(req["nodes"])
    if gpus > 0:
        return ["trainer.accelerator=gpu", f"trainer.devices={gpus}", f"trainer.num_nodes={nodes}"]
    return [f"trainer.num_nodes={nodes}"] if nodes > 1 else []


def describe_request(req: dict) -> str:
    p = submitit_parameters(req)
    skip = ("job_name", "additional_parameters")
    return " ".join(f"--{k.replace('_', '-')}={v}" for k, v in p.items() if k not in skip)


def sbatch_error(e: BaseException) -> str:
    """The scheduler's own words from a failed submission (``sbatch: error: ...`` lines), on one line."""
    if isinstance(e, FileNotFoundError):
        return "sbatch not found (is this a Slurm login node?)"
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if "error:" in ln]
    if not lines:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:]
    return "; ".join(dict.fromkeys(re.sub(r"^.*?(sbatch: error:)", r"\1", ln) for ln in lines)) or type(e).__name__


def slurm_job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) from ``scontrol show job``; ("UNKNOWN", why) when the scheduler cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return "UNKNOWN", str(e)
    if out.returncode != 0:
        return ("GONE" if "Invalid job id" in out.stderr else "UNKNOWN"), out.stderr.strip()
    state = re.search(r"\bJobState=(\S+)", out.stdout)
    reason = re.search(r"\bReason=(\S+)", out.stdout)
    return (state.group(1) if state else "UNKNOWN"), (reason.group(1) if reason else "None")


def slurm_available() -> str | None:
    """None when ``sbatch`` exists and the controller answers, else why not (for skips and messages)."""
    if not shutil.which("sbatch"):
        return "sbatch is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    if out.returncode != 0:
        return f"the Slurm controller does not answer: {out.stderr.strip()}"
    if not {s.strip("*~#") for s in out.stdout.split()} & {"idle", "mixed", "allocated", "completing"}:
        return f"no usable Slurm node (states: {out.stdout.split()})"
    return None
