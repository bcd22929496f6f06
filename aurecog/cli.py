"""``aurecog`` command line: bench, study, speed, leaderboard, evaluate, synth, prepare, predict, models, datasets."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

from aurecog.config import REPO_ROOT


def _wandb_mode(arg: str | None) -> str:
    """W&B mode: explicit flag > WANDB env/var (online|offline|disabled) > offline. Never waits on the network."""
    mode = (arg or os.environ.get("WANDB") or os.environ.get("WANDB_MODE") or "offline").lower()
    if mode in ("dryrun",):
        mode = "offline"
    if mode not in ("online", "offline", "disabled"):
        raise SystemExit(f"error: W&B mode must be online, offline or disabled, got {mode!r}")
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path.home().joinpath(".netrc").exists()):
        print("W&B online requested but no credentials found (WANDB_API_KEY or `wandb login`); logging offline. "
              "Upload later with `wandb sync results/runs/<dataset>/*/*/wandb/offline-run-*`.", file=sys.stderr)
        mode = "offline"
    return mode


def cmd_bench(a) -> int:
    from rich.console import Console

    from aurecog.runner import grid, leaderboard

    console = Console(stderr=True)
    if a.data_root and not Path(a.data_root).is_dir():
        raise SystemExit(f"error: DATA_ROOT {a.data_root} is not a folder. Prepare datasets with "
                         "`make prepare DATASET=<name> SRC=<distribution> DATA_ROOT=<folder>`.")
    overrides = list(a.set)
    slurm = {"partition": a.slurm_partition, "gpus_per_node": a.gpus_per_node, "cpus_per_task": a.cpus_per_task,
             "mem_gb": a.mem_gb, "nodes": a.nodes, "timeout_min": a.timeout_min, "pending_grace_s": a.pending_grace_s}
    if a.launcher == "slurm":  # request: the config's `slurm:` section < flags; one DDP task per GPU when GPUs
        from aurecog.runner.slurm import slurm_request, slurm_trainer_overrides

        probe = grid.expand(a.dataset, a.models, a.folds, a.seeds, a.profile, a.protocol, Path(a.results),
                            overrides, task=a.task)[0]
        overrides += slurm_trainer_overrides(slurm_request(probe.config.get("slurm"), slurm))
    cells = grid.expand(a.dataset, a.models, a.folds, a.seeds, a.profile, a.protocol, Path(a.results), overrides,
                        task=a.task)
    if a.launcher != "slurm":
        _check_devices(cells)
    _check_pretrained(cells)
    mode = _wandb_mode(a.wandb)
    _check_data(a.dataset, a.data_root)
    c0 = cells[0].config
    console.print(f"[bold]aurecog bench[/bold] dataset={a.dataset} profile={c0['profile']} "
                  f"protocol={c0['protocol']} task={c0['task']} models={len({c.model for c in cells})} "
                  f"cells={len(cells)} wandb={mode} launcher={a.launcher}")
    _prepare_synth(a.dataset)
    t0 = time.time()
    res = grid.run_grid(cells, a.data_root, mode, a.jobs, a.launcher, slurm, console, keep_stale=a.keep_stale)
    console.print(f"done {len(res['done'])}, skipped {len(res['skipped'])}, failed {len(res['failed'])} "
                  f"in {time.time() - t0:.0f} s")
    if not a.no_leaderboard:
        out = leaderboard.render(a.dataset, Path(a.results))
        if out:
            console.print(f"leaderboard: {out[0]}")
            print(out[0].read_text().split("## Plots")[0])
            from aurecog.runner import dashboard

            dashboard.log_summary_to_wandb(a.dataset, out[0], out[1], mode)
    for c, _ in res["failed"]:
        console.print(f"[red]failed: {c.key} (log {c.log_path})[/red]")
    return 1 if res["failed"] else 0

STUDY_KEYS = {"seeds", "folds", "runs", "questions"}
STUDY_RUN_KEYS = {"dataset", "models", "protocol"}


def load_study(path: Path) -> dict:
    """``configs/study.yaml``: every key checked (an unknown one names the file and the allowed keys)."""
    import yaml

    doc = yaml.safe_load(path.read_text()) or {}
    bad = set(doc) - STUDY_KEYS
    if bad:
        raise SystemExit(f"error: {path}: unknown key(s) {sorted(bad)}; allowed: {sorted(STUDY_KEYS)}")
    for i, r in enumerate(doc.get("runs") or []):
        bad = set(r) - STUDY_RUN_KEYS
        if bad or "dataset" not in r or "models" not in r:
            raise SystemExit(f"error: {path}: runs[{i}] needs dataset and models (allowed keys: "
                             f"{sorted(STUDY_RUN_KEYS)}), got {sorted(r)}")
    return doc


def cmd_study(a) -> int:
    """Every `runs` entry of the study file through `bench` (same results folder, reused cells), then the
    leaderboards of the datasets it touched (their subject-bias section answers the file's questions)."""
    from aurecog.runner import leaderboard

    path = Path(a.file)
    doc = load_study(path)
    seeds = a.seeds or ",".join(str(s) for s in doc.get("seeds", [0]))
    folds = a.folds or str(doc.get("folds", "all"))
    parser = build_parser()
    rc = 0
    for r in doc.get("runs") or []:
        argv = ["bench", "--dataset", r["dataset"], "--models", ",".join(r["models"]), "--seeds", seeds,
                "--folds", folds, "--jobs", str(a.jobs), "--results", a.results, "--no-leaderboard"]
        if r.get("protocol"):
            argv += ["--protocol", r["protocol"]]
        if a.wandb:
            argv += ["--wandb", a.wandb]
        for kv in a.set:
            argv += ["--set", kv]
        print("aurecog " + " ".join(argv), flush=True)
        if a.dry_run:
            continue
        rc |= cmd_bench(parser.parse_args(argv))
    if not a.dry_run:
        for d in dict.fromkeys(r["dataset"] for r in doc.get("runs") or []):
            out = leaderboard.render(d, Path(a.results))
            print(f"{d}: {out[0] if out else 'no finished runs'}")
    return rc


def cmd_speed(a) -> int:
    """The execution setting each variant gets on this machine (measured once and cached, or again)."""
    from aurecog.runner import grid, speed

    cells = grid.expand(a.dataset, a.models, "0", "0", a.profile, None, Path(a.results), list(a.set))
    print(f"machine: {speed.machine_key()}  (cache {speed.CACHE})")
    for c in {c.model: c for c in cells}.values():
        threads = grid.resolve_threads(c.config, a.jobs)
        r = speed.resolve(c.config, threads, remeasure=a.remeasure)
        rates = "  ".join(f"{k} {v:.0f}" for k, v in (r.get("rates") or {}).items())
        print(f"{c.model:22s} -> precision {r['precision']}, channels_last {r['channels_last']}"
              f"{'  (train img/s: ' + rates + ')' if rates else '  (explicit in the config)'}")
    return 0


def _check_devices(cells) -> None:
    """A GPU-only setting on a machine without a GPU fails here, before any cell starts."""
    import torch

    t = cells[0].config.get("trainer", {})
    if t.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise SystemExit("error: the config asks for a GPU (trainer.accelerator=gpu) but no CUDA GPU is visible. "
                         "Use --set trainer.accelerator=auto (or cpu), or run on a GPU machine.")
    devices = t.get("devices", 1)
    if isinstance(devices, int) and devices > 1 and t.get("accelerator") == "gpu" and \
            torch.cuda.device_count() < devices:
        raise SystemExit(f"error: trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible")


def _check_pretrained(cells) -> None:
    """ImageNet weights a paper profile needs are found (file, weights folder, cache or hub) before any cell
    trains; otherwise one line naming the option to set."""
    from aurecog.models.backbones import PretrainedUnavailable, check_pretrained

    seen = set()
    for c in cells:
        if c.model in seen:
            continue
        seen.add(c.model)
        try:
            check_pretrained(c.config)
        except PretrainedUnavailable as e:
            raise SystemExit(f"error: {c.model}: {e}") from None


def _check_data(dataset: str, data_root: str | None) -> None:
    from aurecog import config as C
    from aurecog.data.datamodule import DataRootError, open_source

    cfg = C.load_dataset(dataset)
    if cfg.get("source") == "synth":
        return
    try:
        open_source(cfg, data_root)
    except (DataRootError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _prepare_synth(dataset: str) -> None:
    """Generate SynthAU presets once before the cells start (they would race to generate it otherwise)."""
    from aurecog import config as C

    names = [dataset]
    cfg = C.load_dataset(dataset)
    for p in (cfg.get("protocols") or {}).values():
        if p.get("type") == "cross_dataset":
            names.append(p["test_dataset"])
        if p.get("type") == "leave_one_dataset_out":
            names += list(p["train_datasets"])
    for n in dict.fromkeys(names):
        c = C.load_dataset(n)
        if c.get("source") == "synth":
            from aurecog.data.synth import generate

            generate(c.get("preset", n))


def cmd_leaderboard(a) -> int:
    from aurecog.runner import leaderboard

    results = Path(a.results)
    datasets = [a.dataset] if a.dataset else sorted(p.name for p in (results / "runs").glob("*") if p.is_dir())
    for d in datasets:
        out = leaderboard.render(d, results, plots=not a.no_plots)
        print(f"{d}: {out[0] if out else 'no finished runs'}")
    return 0


def cmd_evaluate(a) -> int:
    from aurecog.runner.cell import evaluate_checkpoint

    evaluate_checkpoint(a.ckpt, a.out, devices=a.devices, data_root=a.data_root)
    return 0


def cmd_synth(a) -> int:
    from aurecog.data.synth import contact_sheet, generate

    path = generate(a.preset, seed=a.seed)
    print(f"{a.preset}: {path}")
    if a.sheet:
        out = Path(a.sheet_out or REPO_ROOT / "results" / "synth" / f"contact_sheet_{a.preset}.png")
        contact_sheet(a.preset, out, seed=a.seed)
        print(f"contact sheet: {out}")
    return 0


def cmd_prepare(a) -> int:
    from aurecog.data import prepare

    bad = [kv for kv in a.option if "=" not in kv]
    if bad:
        raise prepare.PrepareError(f"--option takes KEY=VALUE, got {bad}")
    opts = dict(kv.split("=", 1) for kv in a.option)
    prepare.run(a.dataset, a.src, a.out, workers=a.workers, image_size=a.size, progress=True, **opts)
    return 0


def cmd_predict(a) -> int:
    from aurecog.data.prepare import PrepareError
    from aurecog.predict import PredictError, load_predictor, open_source, predict

    try:
        for src in a.sources:  # an unreadable file stops before the model is loaded
            open_source(src, a.fps)
        predictor = load_predictor(a.model, a.device)
        if not predictor.preprocessing.get("alignment"):
            print(f"warning: {predictor.path} was trained on crops that `aurecog prepare` did not align (rendered "
                  "SynthAU faces, whose eyes sit elsewhere in the crop than prepare's canonical positions): its "
                  "predictions on real faces check the pipeline, they do not measure a real-face model",
                  file=sys.stderr)
        table = predict(a.sources, predictor, a.out, overlay=a.overlay, batch_size=a.batch_size, fps=a.fps,
                        progress=not a.no_progress)
    except (PredictError, PrepareError) as e:
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    t = table.attrs["timing"]
    found = int(table["success"].sum())
    print(f"{a.out}: {len(table)} rows ({t['frames']} frames, {found} faces found) by {predictor.name} "
          f"[{predictor.task.kind}: {len(predictor.task.names)} labels]; detection {t['detect_s']:.1f} s, "
          f"model {t['model_s']:.1f} s")
    return 0


def _lazy_epilog(parser: argparse.ArgumentParser, make) -> None:
    """Compute ``parser``'s epilog only when its help is shown (the readers are not imported otherwise)."""
    def format_help():
        parser.epilog = make()
        return argparse.ArgumentParser.format_help(parser)

    parser.format_help = format_help


def cmd_models(a) -> int:
    from aurecog import config as C
    from aurecog.config import model_variants

    for name, v in sorted(model_variants().items(), key=lambda kv: (kv[1]["file"], not kv[1]["main"], kv[0])):
        flag = "*" if v["main"] else " "
        print(f"{flag} {name:28s} group={v['group']:18s} class={v['family']:9s} {v['description']}")
    print("* = a paper's main model (MODELS=default runs these and the baseline)")
    print("\npaper tables (MODELS=<table>; a table reported under its own protocol runs under it):")
    for n, t in C.table_groups().items():
        print(f"  {n:16s} [{t['protocol'] or 'dataset default protocol'}] {', '.join(t['models'])}")
    return 0


def cmd_datasets(a) -> int:
    from aurecog import config as C

    for n in C.dataset_names():
        cfg = C.load_dataset(n)
        protocols = ",".join(cfg.get("protocols", {}))
        print(f"{n:16s} source={cfg.get('source')} task={cfg.get('task')} protocols={protocols}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aurecog", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="run the model x fold x seed grid on one dataset and rebuild its leaderboard")
    b.add_argument("--dataset", default="synth")
    b.add_argument("--models", default="default", help="default | all | group | variant, comma-separated")
    b.add_argument("--folds", default="all", help="all or comma-separated fold indices")
    b.add_argument("--seeds", default="0", help="comma-separated seeds")
    b.add_argument("--profile", default=None, help="quick | paper (default: the dataset's default_profile)")
    b.add_argument("--protocol", default=None)
    b.add_argument("--task", default=None, choices=["au", "intensity", "expression"],
                   help="task kind (default: the dataset's; e.g. intensity on synth-disfa / disfa)")
    b.add_argument("--data-root", default=os.environ.get("DATA_ROOT") or None)
    b.add_argument("--results", default=str(REPO_ROOT / "results"))
    b.add_argument("--jobs", type=int, default=1, help="cells run at once (local launcher)")
    b.add_argument("--launcher", default="local", choices=["local", "submitit-local", "slurm"])
    # Slurm request (--launcher slurm): each flag overrides the same key of the profile's `slurm:` section
    b.add_argument("--slurm-partition", default=None, help="Slurm partition (default: slurm.partition)")
    b.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one DDP task each; 0 = CPU-only, no GPU request (default: slurm.gpus_per_node)")
    b.add_argument("--cpus-per-task", type=int, default=None, help="default: slurm.cpus_per_task")
    b.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: slurm.mem_gb)")
    b.add_argument("--nodes", type=int, default=None, help="default: slurm.nodes")
    b.add_argument("--timeout-min", type=int, default=None, help="job time limit (default: slurm.timeout_min)")
    b.add_argument("--pending-grace-s", type=int, default=None,
                   help="stop after a job is PENDING this long for a reason waiting cannot fix "
                        "(default: slurm.pending_grace_s)")
    b.add_argument("--wandb", default=None, help="online | offline | disabled (default: $WANDB or offline)")
    b.add_argument("--set", action="append", default=[], help="config override key.sub=value (repeatable)")
    b.add_argument("--no-leaderboard", action="store_true")
    b.add_argument("--keep-stale", action="store_true",
                   help="keep finished cells whose identity (config, code, lock, data, threads, device) differs from "
                        "now instead of redoing them (a warning names each)")
    b.set_defaults(fn=cmd_bench)

    st = sub.add_parser("study", help="the embedded experiment: configs/study.yaml's runs (all folds, several seeds) "
                                      "and the leaderboards with its questions answered")
    st.add_argument("--file", default=str(REPO_ROOT / "configs" / "study.yaml"))
    st.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's)")
    st.add_argument("--folds", default=None, help="all or comma-separated folds (default: the file's)")
    st.add_argument("--jobs", type=int, default=2)
    st.add_argument("--results", default=str(REPO_ROOT / "results"))
    st.add_argument("--wandb", default=None)
    st.add_argument("--set", action="append", default=[], help="config override for every run (repeatable)")
    st.add_argument("--dry-run", action="store_true", help="print the bench commands only")
    st.set_defaults(fn=cmd_study)

    sp = sub.add_parser("speed", help="the execution setting (precision, channels_last) each model gets on this "
                                      "machine, measured once per machine and cached (cache/speed.json)")
    sp.add_argument("--dataset", default="synth")
    sp.add_argument("--models", default="default")
    sp.add_argument("--profile", default=None)
    sp.add_argument("--jobs", type=int, default=2, help="cells at once (sets the threads per cell measured)")
    sp.add_argument("--results", default=str(REPO_ROOT / "results"))
    sp.add_argument("--set", action="append", default=[])
    sp.add_argument("--remeasure", action="store_true", help="measure again and replace the cached rates")
    sp.set_defaults(fn=cmd_speed)

    lb = sub.add_parser("leaderboard", help="rebuild leaderboards from stored run folders (no training)")
    lb.add_argument("--dataset", default=None)
    lb.add_argument("--results", default=str(REPO_ROOT / "results"))
    lb.add_argument("--no-plots", action="store_true")
    lb.set_defaults(fn=cmd_leaderboard)

    e = sub.add_parser("evaluate", help="test a checkpoint on its fold (devices > 1: DDP, each sample once)")
    e.add_argument("--ckpt", required=True, help="a .ckpt file or a run folder (uses its checkpoints/best.ckpt)")
    e.add_argument("--out", required=True)
    e.add_argument("--devices", type=int, default=1)
    e.add_argument("--data-root", default=os.environ.get("DATA_ROOT") or None)
    e.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("synth", help="generate a SynthAU preset (cached) and optionally its contact sheet")
    s.add_argument("--preset", default="synth")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sheet", action="store_true")
    s.add_argument("--sheet-out", default=None)
    s.set_defaults(fn=cmd_synth)

    pr = sub.add_parser("prepare", help="convert a dataset distribution into the prepared format",
                        description=textwrap.fill(
                            "Convert a dataset distribution, as shipped, into the prepared format. Frames that cannot "
                            "be prepared are listed in <out>/report.csv and counted in the printed summary; a "
                            "distribution that is not what the reader expects stops with one error line naming the "
                            "file (exit code 2).", 100),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("dataset", help="dataset to prepare (listed below)")
    pr.add_argument("--src", required=True, help="the distribution folder, as shipped")
    pr.add_argument("--out", required=True, help="the prepared folder to write (<DATA_ROOT>/<dataset>)")
    pr.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: cores)")
    pr.add_argument("--size", type=int, default=256, help="aligned crop size in pixels (default 256)")
    pr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="preparer option (repeatable), keys per dataset below")
    pr.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    pr.set_defaults(fn=cmd_prepare)

    def _datasets_and_options():
        from aurecog.data.prepare import options_help

        return options_help()

    _lazy_epilog(pr, _datasets_and_options)

    pd_ = sub.add_parser("predict", help="run a trained model on images, folders of frames or videos (OpenFace-style "
                         "CSV)", description=textwrap.fill(
                             "Detect every face (dlib), align it exactly as `aurecog prepare` does, and run a "
                             "checkpoint the runner trained; its labels, thresholds, input size and normalisation come "
                             "from the checkpoint. Writes one CSV in the OpenFace 2.x conventions: frame, face_id, "
                             "timestamp, confidence, success, then AUxx_r (intensity models), AUxx_c, AUxx_p, or "
                             "p_<class> and expression; one row per frame and face, success = 0 where a face is "
                             "missing.", 100), formatter_class=argparse.RawDescriptionHelpFormatter)
    pd_.add_argument("sources", nargs="+", metavar="SOURCE", help="image files, folders of frames or video files")
    pd_.add_argument("--model", required=True, help="a run folder (results/runs/<dataset>/<model>/<fold>-<seed>) "
                     "or a .ckpt file")
    pd_.add_argument("--out", required=True, help="the CSV to write")
    pd_.add_argument("--overlay", default=None, metavar="DIR", help="write each frame with landmarks and predictions")
    pd_.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    pd_.add_argument("--batch-size", type=int, default=32, help="faces per model call (default 32)")
    pd_.add_argument("--fps", type=float, default=None,
                     help="frame rate of folders of frames, for their timestamps (default 30; videos: the container's)")
    pd_.add_argument("--no-progress", action="store_true", help="no progress bar")
    pd_.set_defaults(fn=cmd_predict)

    sub.add_parser("pretrain", add_help=False, help="pretrain the quick trunks on SynthAU once (make pretrain; "
                   "aurecog/pretrain.py, `aurecog pretrain --help` for its options)")
    sub.add_parser("models", help="list registered model variants and groups").set_defaults(fn=cmd_models)
    sub.add_parser("datasets", help="list dataset configs").set_defaults(fn=cmd_datasets)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:  # its own parser (aurecog/pretrain.py)
        from aurecog.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except RuntimeError as e:
        from aurecog.data.prepare import PrepareError

        if not isinstance(e, PrepareError):
            raise
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as e:
        from aurecog.config import ConfigError
        from aurecog.runner.grid import GridError

        if isinstance(e, (ConfigError, GridError, FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
