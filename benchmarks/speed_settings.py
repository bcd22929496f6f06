"""Execution settings on this machine (issue #17, "use the machine"): per main family at the quick size, the
training rate under fp32 / channels_last / bf16 autocast / torch.compile and 1 vs all threads; then, from two
results folders of the same grid (one forced to fp32, one with the runner's measured choice), whether accuracy
holds (paired subject-level bootstrap of the test F1 on the same folds) and the before/after training rate
(optimiser steps x batch per minute, from each cell's ``timings``) and cell wall time.

    python benchmarks/speed_settings.py [--out results/perf] [--models baseline,cisnet,...]
        [--compare FP32_RESULTS AUTO_RESULTS --dataset synth]

Writes ``speed_settings.md`` (rates; also run by ``make perf``) or, with ``--compare``,
``speed_settings_grid.md``. The grid pair is made with
``aurecog bench --results FP32_RESULTS --set trainer.precision=32-true --set trainer.channels_last=false`` and
``aurecog bench --results AUTO_RESULTS`` (the quick profile's ``auto``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import build, header  # noqa: E402

from aurecog.models.probe import SETTINGS, probe_batch, train_step_rate  # noqa: E402
from aurecog.runner import speed as SP  # noqa: E402
from aurecog.runner import stats as S  # noqa: E402

MAIN = ["baseline", "cisnet", "ac2d", "iern", "renet"]


def compiled_rate(model, batch, steps: int = 4) -> tuple[float, float]:
    """(compile + first step seconds, steady images/s) of torch.compile'd bf16 + channels_last training."""
    model = model.to(memory_format=torch.channels_last)
    batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
    run = torch.compile(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-9)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = run(batch)["logits"].float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = time.perf_counter()
    step()
    first = time.perf_counter() - t
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return first, steps * batch["image"].shape[0] / (time.perf_counter() - t)


def rates_table(models: list[str], compile_models: set[str]) -> list[str]:
    compile_too = bool(compile_models)
    lines = ["## Training rate per setting (quick size, images/s, one step = forward + backward + SGD)", "",
             "| model | threads | " + " | ".join(SETTINGS) + (" | bf16-cl + compile (compile s) |" if compile_too
                                                              else " |") + " runner's choice |",
             "|---|---|" + "---|" * (len(SETTINGS) + (2 if compile_too else 1))]
    for m in models:
        for threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(threads)
            row = {}
            for name, (precision, cl) in SETTINGS.items():
                model, cfg, task, size = build(m, "quick")
                batch = probe_batch(int(cfg["data"]["batch_size"]), size, task)
                row[name] = train_step_rate(model, batch, precision, cl, steps=5, warmup=2)
            comp = ""
            if m in compile_models and threads == 1:
                model, cfg, task, size = build(m, "quick")
                try:
                    first, rate = compiled_rate(model, probe_batch(int(cfg["data"]["batch_size"]), size, task))
                    comp = f" {rate:.0f} ({first:.0f} s) |"
                except Exception as e:  # noqa: BLE001 - a compile failure is a result here
                    comp = f" failed: {type(e).__name__} |"
            elif compile_too:
                comp = " |"
            choice = SP.choose(row, "auto", "auto")
            lines.append(f"| {m} | {threads} | " + " | ".join(f"{row[n]:.0f}" for n in SETTINGS) + " |" + comp +
                         f" {choice} ({row[choice] / row['fp32']:.2f}x fp32) |")
            print(lines[-1], flush=True)
    torch.set_num_threads(1)
    return lines + [""]


def _cells(results: Path, dataset: str, models: list[str]) -> dict:
    out = {}
    for m in models:
        for f in sorted((results / "runs" / dataset / m).glob("*/metrics.json")):
            d = json.loads(f.read_text())
            out[(m, d["fold"], d["seed"])] = (d, f.parent)
    return out


def seed_level(a: dict, b: dict, keys: list) -> tuple[float, float, float]:
    """(difference, lo, hi) of the headline F1, choice - fp32, with training noise: per fold the mean over seeds of
    each setting, the difference averaged over folds; interval from a Welch t on the fold-centred cell values
    (each fold's mean removed, so the between-fold spread, shared by both settings, is not counted)."""
    from scipy import stats as st

    folds = sorted({k[1] for k in keys})
    va = {f: [a[k][0]["test"]["f1"] for k in keys if k[1] == f] for f in folds}
    vb = {f: [b[k][0]["test"]["f1"] for k in keys if k[1] == f] for f in folds}
    if min(len(v) for v in (*va.values(), *vb.values())) < 2:
        return float("nan"), float("nan"), float("nan")
    diff = float(np.mean([np.mean(vb[f]) - np.mean(va[f]) for f in folds]))
    ca = np.concatenate([np.array(va[f]) - np.mean(va[f]) for f in folds])
    cb = np.concatenate([np.array(vb[f]) - np.mean(vb[f]) for f in folds])
    # variance of a fold-mean difference, averaged over folds: var_a / n_a + var_b / n_b per fold, / n_folds
    dfa, dfb = len(ca) - len(folds), len(cb) - len(folds)
    var_a, var_b = (ca ** 2).sum() / dfa, (cb ** 2).sum() / dfb
    na, nb = len(ca) / len(folds), len(cb) / len(folds)
    se = float(np.sqrt((var_a / na + var_b / nb) / len(folds)))
    ua, ub = var_a / na / len(folds), var_b / nb / len(folds)
    df = (ua + ub) ** 2 / (ua ** 2 / dfa + ub ** 2 / dfb)
    t = float(st.t.ppf(0.975, df))
    return diff, diff - t * se, diff + t * se


def compare(fp32: Path, auto: Path, dataset: str, models: list[str], draws: int = S.DRAWS) -> list[str]:
    a, b = _cells(fp32, dataset, models), _cells(auto, dataset, models)
    lines = ["## Same grid, fp32 vs the runner's choice", "",
             f"`{fp32}` (forced `trainer.precision=32-true`, `channels_last=false`) against `{auto}` (quick profile, "
             "`auto`). F1 difference = choice - fp32, x100, paired on the same folds and resampled test subjects "
             f"(subject-level bootstrap, {draws} draws); rate = optimiser steps x batch per minute of training "
             "(metrics.json `timings`); cell = wall time of the cell process as the runner saw it.", "",
             "*seed-level* = the same difference with training noise in it: the mean over folds of the "
             "per-fold seed means, its 95% interval from the cells' spread within each fold (Welch t on the "
             "fold-centred cell values; needs 2+ seeds per setting). Accuracy holds when the seed-level interval "
             "(else the bootstrap one) includes 0 or lies above it.", "",
             "| model | setting chosen | cells | seeds | F1 fp32 | F1 choice | difference [95% CI] | seed-level "
             "difference [95% CI] | accuracy holds | train img/min fp32 -> choice | cell s fp32 -> choice |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        keys = sorted(set(k for k in a if k[0] == m) & set(k for k in b if k[0] == m))
        if not keys:
            continue
        labels = a[keys[0]][0]["labels"]
        rows = {}
        for tag, src in (("fp32", a), ("auto", b)):
            r = S.RowData("au", labels, f"{dataset}/cmp")
            for k in keys:
                r.add(k[1], k[2], pd.read_parquet(src[k][1] / "predictions.parquet"))
            rows[tag] = r
        subjects = {}
        for r in rows.values():
            for fold in {f for f, _ in r.frames}:
                subjects.setdefault(f"{dataset}/cmp/{fold}", set()).update(r.subjects(fold))
        boot = S.Bootstrap(S.Resampler(draws, S.SEED), {k: sorted(v) for k, v in subjects.items()})
        sa, sb = boot.cell_sums(rows["fp32"]), boot.cell_sums(rows["auto"])
        d = S.paired_difference(boot, rows["auto"], sb, rows["fp32"], sa, "f1")
        pa, _ = boot.evaluate(rows["fp32"], sa)
        pb, _ = boot.evaluate(rows["auto"], sb)
        seed_d, seed_lo, seed_hi = seed_level(a, b, keys)
        lo, hi = (seed_lo, seed_hi) if seed_lo == seed_lo else (d["lo"], d["hi"])
        holds = "yes (CI includes 0)" if lo <= 0 <= hi else ("better" if lo > 0 else "**no**")
        ident = b[keys[0]][0].get("identity", {})
        cfg = json.loads((b[keys[0]][1] / "config.json").read_text())["trainer"]
        setting = f"{ident.get('precision', cfg.get('precision'))}, channels_last {cfg.get('channels_last')}"

        def rate(src, keys=keys):
            v = [src[k][0].get("timings", {}).get("train_images_per_min", np.nan) for k in keys]
            return float(np.nanmean(v))

        def wall(src, keys=keys):
            return float(np.mean([src[k][0].get("wall_time_s", np.nan) + src[k][0].get("timings", {}).get(
                "start", 0.0) for k in keys]))

        seeds = len({k[2] for k in keys})
        sl = "" if seed_lo != seed_lo else f"{seed_d * 100:+.1f} [{seed_lo * 100:+.1f}, {seed_hi * 100:+.1f}]"
        lines.append(f"| {m} | {setting} | {len(keys)} | {seeds} | {pa['f1'] * 100:.1f} | {pb['f1'] * 100:.1f} | "
                     f"{d['diff'] * 100:+.1f} [{d['lo'] * 100:+.1f}, {d['hi'] * 100:+.1f}] | {sl} | {holds} | "
                     f"{rate(a):,.0f} -> {rate(b):,.0f} ({rate(b) / rate(a):.2f}x) | {wall(a):.0f} -> {wall(b):.0f} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "perf"))
    ap.add_argument("--models", default=",".join(MAIN))
    ap.add_argument("--compile-models", default="baseline",
                    help="models also timed under torch.compile (compiling is slow on a CPU; empty: none)")
    ap.add_argument("--compare", nargs=2, metavar=("FP32_RESULTS", "AUTO_RESULTS"))
    ap.add_argument("--dataset", default="synth")
    a = ap.parse_args()
    models = a.models.split(",")
    lines = header("Execution settings: precision, memory format, compile, threads")
    lines += [f"Machine key for the runner's choice: `{SP.machine_key()}`; a setting is chosen when it trains >= "
              f"{SP.MIN_GAIN}x faster than fp32 (aurecog/runner/speed.py; `aurecog speed` shows the cached choice).",
              ""]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.compare:  # the grid comparison only (its own file: `make perf` reruns the rates, not the grids)
        lines += compare(Path(a.compare[0]), Path(a.compare[1]), a.dataset, models)
        path = out / "speed_settings_grid.md"
    else:
        lines += rates_table(models, set(filter(None, a.compile_models.split(","))))
        path = out / "speed_settings.md"
    path.write_text("\n".join(lines))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
