"""What the causal modules cost: CISNet's CIS module, AC²D's constraint + per-AU causal modules and IERN's
disentanglement + backdoor adjustment, against the same models without them; and IERN's backdoor adjustment
over the confounder strata as one batched forward against the per-stratum loop of its Algorithm 1.

    python benchmarks/causal_overhead.py [--batch 32] [--out results/perf/causal_overhead.md]

Training throughput is one forward + backward of the model's forward pass (a squared-logit loss, as in
throughput_*.md), not the full training step: IERN's alternating discriminator steps are not included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_all import ROOT, build, default_paper_batch, fake_batch, header, throughput  # noqa: E402

#: (family, model with the causal module(s), the same model without them, what the difference is)
PAIRS = [
    ("CISNet", "cisnet", "cisnet-resnet34-wo", "CIS module (subject dictionary attention), ResNet-34"),
    ("AC²D", "ac2d", "ac2d-bnet", "attention constraint + per-AU causal modules (Table 7 B-Net vs AC2D)"),
    ("IERN", "iern", "iern-baseline", "disentanglement generators + backdoor-adjusted classifier vs ResNet-18"),
]


def _time(fn, repeats: int = 5) -> float:
    with torch.inference_mode():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def overhead_rows(batch: int, dev: str, rounds: int = 3) -> list[str]:
    """Both models of a pair measured in alternation, ``rounds`` times; the median rate of each."""
    lines = ["| family | profile | input | model | params (M) | train img/s | infer img/s | inference time vs "
             "without |", "|---|---|---|---|---|---|---|---|"]
    for family, with_, without, _ in PAIRS:
        for prof in ("quick", "paper"):
            built = {v: build(v, prof) for v in (without, with_)}
            bs = batch if prof == "quick" else default_paper_batch(batch, dev)
            steps = 2 if prof == "paper" else 5
            rates = {v: {"train": [], "infer": []} for v in built}
            for _ in range(rounds):
                for v, (model, _cfg, task, size) in built.items():
                    model.to(dev)
                    b = fake_batch(bs, size, task, dev)
                    rates[v]["train"].append(throughput(model, b, True, steps=steps, warmup=1))
                    rates[v]["infer"].append(throughput(model, b, False, steps=steps, warmup=1))
            med = {v: {k: statistics.median(r) for k, r in d.items()} for v, d in rates.items()}
            for v, (model, _cfg, _task, size) in built.items():
                params = sum(p.numel() for p in model.parameters()) / 1e6
                ratio = f"{med[without]['infer'] / med[v]['infer']:.2f}x"
                lines.append(f"| {family} | {prof} | {size} | {v} | {params:.2f} | {med[v]['train']:.1f} | "
                             f"{med[v]['infer']:.1f} | {ratio} |")
                print(lines[-1], flush=True)
    return lines


def strata_rows(batch: int, dev: str) -> list[str]:
    """IERN's Eq. 7/9 sum over strata: batched (deconfounded_logits) vs loop (deconfounded_logits_loop)."""
    lines = ["| profile | input | strata N_c | batch | loop ms/batch | batched ms/batch | speed-up | max diff |",
             "|---|---|---|---|---|---|---|---|"]
    for prof in ("quick", "paper"):
        for n_conf in (3, 27):
            model, cfg, task, size = build("iern", prof, n_conf=n_conf)
            model.to(dev).eval()
            bs = batch if prof == "quick" else default_paper_batch(batch, dev)
            x = fake_batch(bs, size, task, dev)["image"]
            with torch.inference_mode():
                emo = model.g_e(model.backbone(x))
                centers = model.centers
                diff = (model.deconfounded_logits(emo, centers)
                        - model.deconfounded_logits_loop(emo, centers)).abs().max().item()
            t_loop = _time(lambda: model.deconfounded_logits_loop(emo, centers))  # noqa: B023
            t_batched = _time(lambda: model.deconfounded_logits(emo, centers))  # noqa: B023
            lines.append(f"| {prof} | {size} | {n_conf} | {bs} | {1000 * t_loop:.1f} | {1000 * t_batched:.1f} | "
                         f"{t_loop / t_batched:.2f}x | {diff:.1e} |")
            print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results/perf/causal_overhead.md"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lines = header("Cost of the causal modules") + [
        f"Device {dev}; fp32; random weights and synthetic inputs; batch {a.batch} at the quick size, "
        f"{default_paper_batch(a.batch, dev)} at the paper size; 12 AUs; CISNet with 27 subject strata, IERN with 3 "
        "(the CK+/MMI/Oulu mix). 'train' = forward + backward of the model's forward pass (not IERN's "
        "alternating discriminator steps). Both models of a pair are measured in alternation, 3 rounds, "
        "median of each. Each pair is the paper's model and its ablation without the causal part:", ""]
    lines += [f"- {fam}: `{w}` vs `{wo}`: {what}" for fam, w, wo, what in PAIRS] + [""]
    lines += overhead_rows(a.batch, dev)
    lines += ["", "## IERN: backdoor adjustment over the strata, batched vs loop", "",
              "(1/N_c) sum_i f_c(g_r(emo, C_i)) (Eqs. 7 and 9) on the features of one batch: one forward over the "
              "batch expanded N_c times against Algorithm 1's loop over strata (same outputs; 'max diff' is the "
              "largest logit difference). N_c = 3 is the CK+/MMI/Oulu mix; 27 shows how it grows with the number "
              "of strata.", ""]
    lines += strata_rows(a.batch, dev)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
