"""`make perf`: model size, training/inference throughput, data path, and the models' batched-vs-loop paths.

Writes markdown tables to results/perf/ with the command, machine and versions. Throughput is measured under
one or more *settings* (``--settings``): ``fp32``; ``bf16`` (autocast); ``bf16-cl`` (+ channels_last);
``bf16-cl-compile`` (+ torch.compile). The default is all four on a CUDA machine and ``fp32`` on a CPU (the
others are available there too). Each row reports the FLOP rate the model reaches as a fraction of the
measured bf16 matrix-multiply rate of the device.

    python benchmarks/run_all.py [--models a,b] [--settings fp32,bf16] [--no-paper-throughput] [--out results/perf]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aurecog import config as C  # noqa: E402
from aurecog.models.backbones import no_pretrained  # noqa: E402
from aurecog.models.complexity import FlopCounter  # noqa: E402
from aurecog.models.probe import probe_batch, probe_stats  # noqa: E402
from aurecog.models.registry import build_model  # noqa: E402
from aurecog.tasks import TaskSpec  # noqa: E402

BP4D_AUS = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]
#: the papers' own complexity figures (AC2D paper Table 6: CISNet 22.4M / 4.8G, AC2D 3.6M / 9.6G "FLOPs")
PAPER_TABLE6 = {"cisnet": ("22.4M", "4.8G"), "ac2d": ("3.6M", "9.6G")}


fake_stats, fake_batch = probe_stats, probe_batch  # aurecog/models/probe.py (shared with the runner)


#: confounder strata per family in its paper's setting: CISNet's BP4D training subjects (2 of 3 folds of 41),
#: IERN's three source datasets of the CK+/MMI/Oulu mix (its test-time cost grows with the number of strata)
N_CONFOUNDERS = {"cisnet": 27, "iern": 3}


def build(variant: str, profile: str, size: int | None = None, n_conf: int | None = None):
    cfg = C.resolve(variant, "synth", profile)
    size = size or cfg["data"]["input_size"]
    cfg = C.deep_merge(cfg, {"data": {"input_size": size}})
    task = TaskSpec("au", BP4D_AUS)
    n_conf = n_conf or N_CONFOUNDERS.get(cfg["model"]["family"], 27)
    with no_pretrained():  # size and speed only: the paper profiles' ImageNet weights are not needed
        model = build_model(cfg, task, fake_stats(task, n_conf))
    if hasattr(model, "prototype_ready"):  # AC2D: causal modules in use, as after the first training epoch
        model.prototype_ready.fill_(True)
    return model, cfg, task, size


def count(model, batch) -> tuple[float, float]:
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    with torch.no_grad(), FlopCounter() as fc:  # strict: attention counted, no heavy op left uncounted
        model(batch)
    return params, fc.macs  # MACs: one multiply-add = 2 FLOPs


#: throughput settings: name -> (autocast dtype, channels_last, torch.compile)
SETTINGS = {"fp32": (None, False, False), "bf16": (torch.bfloat16, False, False),
            "bf16-cl": (torch.bfloat16, True, False), "bf16-cl-compile": (torch.bfloat16, True, True)}
DEFAULT_SETTINGS = {"cuda": list(SETTINGS), "cpu": ["fp32"]}


def default_paper_batch(batch: int, device: str) -> int:
    """Batch at the paper input sizes: 64 on a GPU (enough to fill it), batch // 8 on a CPU (keeps it short)."""
    return 64 if torch.device(device).type == "cuda" else max(2, batch // 8)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, dtype: torch.dtype, n: int | None = None, repeats: int = 5, rounds: int = 3) -> float:
    """Measured FLOP/s of an n x n matrix product in ``dtype``, the best of ``rounds`` (the device's practical
    peak, which the models' FLOP rates are compared with)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(rounds):
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t))
    return best


def _prepare(model, batch: dict, setting: str):
    """(callable model, batch) under ``setting``; the autocast dtype is applied by :func:`throughput`."""
    _, channels_last, compiled = SETTINGS[setting]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    return (torch.compile(model) if compiled else model), batch


def throughput(model, batch, train: bool, steps: int = 5, warmup: int = 2, setting: str = "fp32") -> float:
    """Images/s of forward (+ backward and an SGD step when ``train``) under ``setting``; compilation and
    warm-up excluded."""
    model.train(train)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6) if train else None
    dtype = SETTINGS[setting][0]
    run, batch = _prepare(model, batch, setting)
    device = batch["image"].device
    b = batch["image"].shape[0]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if train:
                out = run(batch)
                loss = out["logits"].float().pow(2).mean()
            else:
                with torch.no_grad():
                    run(batch)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * b / (time.perf_counter() - t)


def flops_per_image(model, batch, train: bool) -> float:
    """FLOPs of one image: forward (+ backward when ``train``), counted by :class:`FlopCounter` (torch's
    FlopCounterMode plus explicit attention formulas; fails on an uncounted compute-heavy op)."""
    model.train(train)
    counter = FlopCounter()
    if train:
        with counter:
            model(batch)["logits"].float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), counter:
            model(batch)
    return counter.flops / batch["image"].shape[0]


def header(title: str) -> list[str]:
    import lightning
    import timm

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    script = Path(sys.argv[0]).resolve()
    argv = [script.relative_to(ROOT).as_posix() if ROOT in script.parents else sys.argv[0], *sys.argv[1:]]
    return [f"# {title}", "", f"Command: `{' '.join(['python'] + argv)}` (via `make perf`)", "",
            f"Machine: {platform.node()} ({dev}); python {platform.python_version()}, torch {torch.__version__}, "
            f"lightning {lightning.__version__}, timm {timm.__version__}; git {rev.strip()}; {date.today()}", ""]


def model_size(variants: list[str], out: Path) -> None:
    lines = header("Model size at each paper's input size (12 BP4D AUs)") + [
        "MACs = multiply-accumulates from `aurecog.models.complexity.FlopCounter` (torch's FlopCounterMode + "
        "explicit attention formulas; FLOPs / 2), one 1-image forward in eval mode "
        "(RE-Net: all 12 AUs conditioned; IERN: 3 confounder strata, CISNet: 27 training subjects).",
        "", "| model | class | paper input | params (M) | MACs (G) | paper Table 6 (params / 'FLOPs') |",
        "|---|---|---|---|---|---|"]
    for v in variants:
        try:
            model, cfg, task, size = build(v, "paper")
            p, macs = count(model, fake_batch(1, size, task))
        except Exception as e:  # report, keep going
            lines.append(f"| {v} | | | error: {type(e).__name__}: {e} | | |")
            continue
        ref = PAPER_TABLE6.get(v, ("", ""))
        lines.append(f"| {v} | {cfg['model']['family']} | {size} | {p / 1e6:.2f} | {macs / 1e9:.2f} | "
                     f"{' / '.join(ref) if ref[0] else ''} |")
        print(lines[-1], flush=True)
    (out / "model_size.md").write_text("\n".join(lines) + "\n")


def model_throughput(variants: list[str], out: Path, batch: int, paper_sizes: bool,
                     settings: list[str] | None = None, paper_batch: int | None = None) -> float:
    """Throughput table ``throughput_<device>.md``; returns the fastest quick-profile fp32 (or first setting)
    training rate, the consumption the data path is compared with."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    settings = settings or DEFAULT_SETTINGS[dev]
    paper_batch = paper_batch or default_paper_batch(batch, dev)
    ref_rate, fp32_rate = matmul_rate(dev, torch.bfloat16), matmul_rate(dev, torch.float32)
    lines = header("Training and inference throughput (images/s)") + [
        f"Device {dev}; batch {batch} at the quick size, {paper_batch} at the paper size; synthetic inputs (no "
        "data loading). 'quick' = the quick profile's model and input size, 'paper' = the paper profile's. "
        "Settings: fp32; bf16 = bf16 autocast; cl = channels_last; compile = torch.compile (compilation excluded). "
        "'train' = forward + backward + SGD step of the model's forward pass with a squared-logit loss. FLOPs per "
        "image from aurecog's FlopCounter (fp32, uncompiled); '% of bf16 matmul' = the FLOP rate reached over "
        f"the device's measured bf16 matrix-multiply rate, {ref_rate / 1e12:.3g} TFLOP/s (fp32: "
        f"{fp32_rate / 1e12:.3g} TFLOP/s; `matmul_rate`).", "",
        "| model | profile | input | setting | train img/s | infer img/s | train GFLOP/img | train % of bf16 "
        "matmul | infer % of bf16 matmul |", "|---|---|---|---|---|---|---|---|---|"]
    profiles = ["quick"] + (["paper"] if paper_sizes else [])
    fastest = 0.0
    flops: dict[tuple[str, str], tuple[float, float]] = {}  # per model and size, not per setting
    for v in variants:
        for prof in profiles:
            for setting in settings:
                try:
                    model, cfg, task, size = build(v, prof)
                    model.to(dev)
                    bs = batch if prof == "quick" else paper_batch
                    b = fake_batch(bs, size, task, dev)
                    steps = 3 if prof == "paper" else 5
                    if (v, prof) not in flops:
                        flops[v, prof] = flops_per_image(model, b, True), flops_per_image(model, b, False)
                    f_tr, f_inf = flops[v, prof]
                    tr = throughput(model, b, True, steps=steps, setting=setting)
                    inf = throughput(model, b, False, steps=steps, setting=setting)
                except Exception as e:  # report, keep going
                    lines.append(f"| {v} | {prof} | | {setting} | error: {type(e).__name__}: {e} | | | | |")
                    print(lines[-1], flush=True)
                    continue
                lines.append(f"| {v} | {prof} | {size} | {setting} | {tr:.1f} | {inf:.1f} | {f_tr / 1e9:.3g} | "
                             f"{100 * tr * f_tr / ref_rate:.1f}% | {100 * inf * f_inf / ref_rate:.1f}% |")
                print(lines[-1], flush=True)
                if prof == "quick" and setting == settings[0]:
                    fastest = max(fastest, tr)
    (out / f"throughput_{dev}.md").write_text("\n".join(lines) + "\n")
    return fastest


def data_path(out: Path, fastest_train: float | None) -> None:
    from aurecog.data.synth import generate
    from aurecog.runner.cell import build_datamodule

    lines = header("Data path") + ["SynthAU generation and the prepared-format loader with the quick profile's "
                                   "training augmentation (random crop, flip, brightness/contrast).", ""]
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    p = generate("synth", cache_dir=tmp, progress=False)
    gen_s = time.perf_counter() - t
    n = int(__import__("json").loads((p / "meta.json").read_text())["n"])
    shutil.rmtree(tmp, ignore_errors=True)
    lines += [f"- SynthAU `synth` preset: {n} frames generated in {gen_s:.1f} s ({n / gen_s:.0f} frames/s).", ""]
    cfg = C.resolve("baseline", "synth", "quick")
    lines += ["| DataLoader workers | batch | images/s |", "|---|---|---|"]
    best = 0.0
    for workers in (0, 2):
        cfg2 = C.deep_merge(cfg, {"data": {"num_workers": workers}})
        dm = build_datamodule(cfg2, 0, progress=False)
        dm.setup()
        dl = dm.train_dataloader()
        it = iter(dl)
        next(it)
        t = time.perf_counter()
        k = 0
        for _, b in zip(range(30), it):
            k += b["image"].shape[0]
        rate = k / (time.perf_counter() - t)
        if workers == cfg["data"]["num_workers"]:
            best = rate
        lines.append(f"| {workers} | {cfg['data']['batch_size']} | {rate:.0f} |")
        print(lines[-1], flush=True)
    if fastest_train:
        lines += ["", f"Fastest quick-profile model trains at {fastest_train:.0f} img/s: the default loader "
                  f"({cfg['data']['num_workers']} workers) delivers {best / fastest_train:.1f}x that."]
    (out / "data_path.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default")
    ap.add_argument("--out", default=str(ROOT / "results" / "perf"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--paper-batch", type=int, default=None,
                    help="batch at the paper input size (default: 64 on a GPU, batch // 8 on a CPU)")
    ap.add_argument("--no-paper-throughput", action="store_true")
    ap.add_argument("--settings", default=None,
                    help=f"comma-separated throughput settings from {list(SETTINGS)} (default: all on a GPU, "
                         "fp32 on a CPU)")
    a = ap.parse_args()
    settings = a.settings.split(",") if a.settings else None
    unknown = [x for x in settings or [] if x not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from aurecog.runner.grid import select_models

    variants = select_models(a.models)
    model_size(select_models("all") if a.models == "default" else variants, out)
    fastest = model_throughput(variants, out, a.batch, not a.no_paper_throughput, settings, a.paper_batch)
    data_path(out, fastest)
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if script.name not in ("run_all.py",) and not script.name.startswith("_"):
            print(f"== {script.name}", flush=True)
            subprocess.run([sys.executable, str(script)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
