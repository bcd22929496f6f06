"""RE-Net inference throughput: the evaluation paths that condition on every AU (the folded path, the batched
pass over B x C samples) against the paper's per-AU loop (C passes over B samples), with bf16 autocast as an
option, plus the plain ResNet-18 (one pass, no conditioning).

The paper reports 5.4 ms/image (183 images/s) for 12 AUs on a GeForce 2080Ti with the per-AU loop (Sec. 4.7).
This measures every form on the same machine, model and input size, checks each against the loop, profiles
the exact ones on a CPU, and writes a markdown table to ``results/perf/renet_batched_inference.md`` (with the
command, machine and versions).

    python benchmarks/renet_batched_inference.py        # CPU: 56 px quick width, 112 px paper width; GPU: 224 px
    python benchmarks/renet_batched_inference.py --device cpu --sizes paper:224:8 --no-bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aurecog.config import deep_merge, resolve  # noqa: E402
from aurecog.models.complexity import FlopCounter  # noqa: E402
from aurecog.models.registry import build_model  # noqa: E402
from aurecog.models.renet import AUConditionalBatchNorm2d  # noqa: E402
from aurecog.tasks import TaskSpec, TrainStats  # noqa: E402

BP4D_AUS = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]
PAPER_MS_PER_IMAGE = 5.4  # Sec. 4.7: 12 AUs, GeForce 2080Ti, per-AU loop
CPU_SIZES = ["quick:56:64", "paper:112:16"]  # kept short for the 2-core CPU
GPU_SIZES = ["quick:56:256", "paper:224:100"]  # the paper's input size and batch (Sec. 4.3)


def _stats(c: int) -> TrainStats:
    rng = np.random.default_rng(0)
    y = (rng.random((500, c)) < 0.3).astype(float)
    corr = np.corrcoef(y.T)
    np.fill_diagonal(corr, 1.0)
    return TrainStats(n_train=500, label_rate=[0.3] * c, n_pos=[150] * c, n_neg=[350] * c,
                      label_corr=corr.tolist(), subjects=["S0"], subject_counts=[500])


def _models(profile: str, n_aus: int, device: torch.device):
    names = BP4D_AUS[:n_aus] if n_aus <= len(BP4D_AUS) else [f"AU{i}" for i in range(n_aus)]
    task, stats = TaskSpec("au", names), _stats(n_aus)
    over = {"renet": {"eval_max_expanded": None}}
    renet = build_model(resolve("renet", "synth", profile, overrides=over), task, stats)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct per-AU parameters/statistics, so that the batched-vs-loop check means something
        for mod in renet.modules():
            if isinstance(mod, AUConditionalBatchNorm2d):
                mod.weight.mul_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
                mod.running_var.mul_(1 + 0.3 * torch.rand(mod.running_var.shape, generator=g))
    renet = renet.to(device).eval()
    base_cfg = resolve("renet-baseline", "synth", profile)
    base = build_model(deep_merge(base_cfg, {}), task, stats).to(device).eval()
    return renet, base


def _autocast(fn, device: torch.device):
    """``fn`` under bf16 autocast (convolutions and matrix products in bf16, accumulation as the backend does)."""

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn()

    return run


def _time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    with torch.inference_mode():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def _analyse(fn) -> dict:
    """FLOPs of one call (:class:`aurecog.models.complexity.FlopCounter`) and the share of CPU time spent in
    convolutions (torch.profiler, self time of the conv kernels over the total)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        counter = FlopCounter()
        with counter:
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:4]
    return {"gflop": counter.flops / 1e9, "conv_share": conv / max(total, 1),
            "top": ", ".join(f"{e.key} {100 * e.self_cpu_time_total / max(total, 1):.0f}%" for e in top)}


def _command() -> str:
    prog = Path(sys.argv[0]).resolve()
    prog_s = prog.relative_to(REPO).as_posix() if REPO in prog.parents else sys.argv[0]
    return " ".join([prog_s, *sys.argv[1:]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="profile:input_size:batch entries (profile sets the backbone width); default "
                         f"{' '.join(CPU_SIZES)} on a CPU, {' '.join(GPU_SIZES)} on a GPU")
    ap.add_argument("--aus", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3 CPU, 20 GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast rows")
    ap.add_argument("--out", default=str(REPO / "results/perf/renet_batched_inference.md"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.sizes = args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    args.repeats = args.repeats or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    rows, profiles = [], []
    for spec in args.sizes:
        profile, size, batch = spec.split(":")
        size, batch = int(size), int(batch)
        renet, base = _models(profile, args.aus, device)
        x = torch.randn(batch, 3, size, size, device=device)
        methods = {  # name -> (callable, speed-up denominator label)
            "per-AU loop (paper)": lambda: renet.predict_loop(x),  # noqa: B023
            "batched B*C pass (before)": lambda: renet.predict_batched(x),  # noqa: B023
            "folded per-AU passes (after, default)": lambda: renet.predict_folded(x),  # noqa: B023
        }
        if not args.no_bf16:
            methods["per-AU loop, bf16 autocast"] = _autocast(lambda: renet.predict_loop(x), device)  # noqa: B023
            methods["folded, bf16 autocast"] = _autocast(lambda: renet.predict_folded(x), device)  # noqa: B023
        with torch.inference_mode():
            ref = renet.predict_loop(x).float()
            diffs = {name: (fn().float() - ref).abs().max().item() for name, fn in methods.items()}
            scale = ref.abs().max().item()
        times = {name: _time(fn, args.repeats, device) for name, fn in methods.items()}
        t_base = _time(lambda: base({"image": x}), args.repeats, device)  # noqa: B023
        t_loop = times["per-AU loop (paper)"]
        if device.type == "cpu":
            for name in ("per-AU loop (paper)", "batched B*C pass (before)", "folded per-AU passes (after, default)"):
                profiles.append({"model": f"{profile} ResNet-18", "input": size, "batch": batch,
                                 "method": name.split(" (")[0], **_analyse(methods[name])})
        for name, t in [*times.items(), ("ResNet-18 baseline (no conditioning, 1 pass)", t_base),
                        (f"{args.aus} x ResNet-18 baseline (arithmetic of {args.aus} plain passes)",
                         args.aus * t_base)]:
            rows.append({"model": f"{profile} ResNet-18", "input": size, "batch": batch, "method": name,
                         "img_s": batch / t, "ms_img": 1000 * t / batch, "speedup": t_loop / t,
                         "diff": f"{diffs[name]:.1e}" if name in diffs else ""})
        print(f"{spec}: " + ", ".join(f"{n} {batch / t:.1f} img/s" for n, t in times.items())
              + f"; max |logit| {scale:.2f}", flush=True)

    import lightning
    import timm

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads")
    try:
        load = os.getloadavg()[0]
        dev += f", load average {load:.1f} at the end of the run" if device.type == "cpu" else ""
    except OSError:
        pass
    lines = [
        "# RE-Net: batched conditional inference vs the per-AU loop",
        "",
        f"{args.aus} AUs, inference mode, median of {args.repeats} runs after a warm-up, random weights and inputs. "
        f"The paper (Sec. 4.7) reports {PAPER_MS_PER_IMAGE} ms/image (183 images/s as printed) for "
        "12 AUs on a GeForce 2080Ti with the per-AU loop. 'quick' is the narrow ResNet-18 of the quick profile "
        "(64-channel 7x7 stem, stages 16-128), 'paper' the full ResNet-18.",
        "",
        "- *per-AU loop*: the paper's C passes (`RENet.predict_loop`), the reference;",
        "- *batched B\\*C pass*: one pass over the batch expanded to B\\*C samples, each sample's BN gathered by its "
        "AU (`RENet.predict_batched`; the evaluation path before the folded one, still used when autograd is on);",
        "- *folded*: `RENet.predict_folded` (`aurecog/models/renet_folded.py`), the default evaluation path: the stem "
        "convolution and its max-pool computed once, every conditional BN folded into per-AU convolution weights "
        "(cached), then per-AU passes; an exact rewrite;",
        "- *bf16 autocast*: an option, not exact (convolutions in bfloat16);",
        f"- *{args.aus} x ResNet-18 baseline*: {args.aus} times one plain pass, the arithmetic of conditioning on "
        f"{args.aus} AUs when nothing is shared.",
        "",
        "'max diff' is the largest |method - loop| logit difference against the float32 loop.",
        "",
        "| model | input | batch | method | images/s | ms/image | speed-up vs loop | max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['method']} | {r['img_s']:.1f} | "
                     f"{r['ms_img']:.2f} | {r['speedup']:.2f}x | {r['diff']} |")
    if profiles:
        lines += [
            "",
            "## Where the time goes (CPU profile)",
            "",
            "The batched pass shares only the stem convolution: from the first conditional BN on, each (sample, AU) "
            "pair has its own pass, and the per-sample BN multiply-add and the max-pool of B\\*C full-resolution "
            "stem maps cost about as much as its convolutions (top ops below). The folded path removes both: each "
            "BN lives in its convolution's weights, and the stem is pooled once, before the per-AU BN + ReLU (a "
            "monotone map commutes with max-pooling: max-pool for positive BN scales, min-pool for negative ones). "
            "What is left is the per-AU convolutions, C times a ResNet-18 without its stem, so the gain is bounded "
            "by how much of the loop's time lies outside them: large at the quick width (a 64-channel stem at full "
            "resolution before narrow stages), small at paper width, where the loop is already close to C plain "
            "passes (compare the last row of each size). FLOPs from aurecog's FlopCounter (torch's FlopCounterMode "
            "+ attention formulas), time shares from torch.profiler (self CPU time):",
            "",
            "| model | input | batch | method | GFLOP per batch | time in convolutions | top ops (self time) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in profiles:
            lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['method']} | {r['gflop']:.2f} | "
                         f"{100 * r['conv_share']:.0f}% | {r['top']} |")
    lines += [
        "",
        f"- command: `python {_command()}`",
        f"- machine: {dev}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, timm {timm.__version__}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines.insert(-1, "- caution: the CPU was shared with other jobs (load average above the core count); absolute "
                         "figures are inflated and noisy, compare rows of one run only")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
