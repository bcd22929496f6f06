"""The `make perf` machinery: FLOP accounting against a hand count, the throughput settings that a GPU run uses
by default (bf16 autocast, channels_last) exercised on the CPU, and RE-Net's evaluation-path table."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import renet_batched_inference  # noqa: E402
import run_all  # noqa: E402


class _TwoLayer(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=False)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, batch):
        return {"logits": self.fc2(torch.relu(self.fc1(batch["image"].flatten(1))))}


def test_flops_per_image_matches_hand_count():
    """A product with a (d_in x d_out) weight costs 2 * d_in * d_out FLOPs per image forward; backward adds the
    same for dL/dW and, where the input needs a gradient (not for the image), once more for dL/dx."""
    model = _TwoLayer(3 * 4 * 4, 5, 3)
    batch = {"image": torch.randn(8, 3, 4, 4)}
    first, second = 2 * 48 * 5, 2 * 5 * 3
    assert run_all.flops_per_image(model, batch, train=False) == first + second
    assert run_all.flops_per_image(model, batch, train=True) == 2 * first + 3 * second
    assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients behind


def test_throughput_table_with_gpu_settings_on_cpu(tmp_path):
    """The settings a CUDA run measures by default also run here (bf16 autocast + channels_last), for a plain
    model and for RE-Net, whose conditional BNs must accept bf16 activations."""
    assert run_all.matmul_rate("cpu", torch.float32, n=128, repeats=2, rounds=2) > 0
    fastest = run_all.model_throughput(["baseline", "renet"], tmp_path, batch=4, paper_sizes=False,
                                       settings=["fp32", "bf16-cl"])
    text = (tmp_path / "throughput_cpu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| baseline") or line.startswith("| renet")]
    assert len(rows) == 4 and "error" not in text
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] in ("fp32", "bf16-cl")
        assert float(cells[4]) > 0 and float(cells[5]) > 0 and float(cells[6]) > 0
        assert re.fullmatch(r"\d+(\.\d+)?%", cells[7]) and re.fullmatch(r"\d+(\.\d+)?%", cells[8])
    assert abs(fastest - max(float(r.split("|")[5]) for r in rows if "| fp32 |" in r)) < 0.06


def test_renet_inference_table_checks_every_path_against_the_loop(tmp_path):
    out = tmp_path / "renet.md"
    renet_batched_inference.main(["--sizes", "quick:32:3", "--repeats", "1", "--device", "cpu",
                                  "--out", str(out)])
    text = out.read_text()
    diffs = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0] == "quick ResNet-18" and cells[7]:
            diffs[cells[3]] = float(cells[7])
    assert set(diffs) == {"per-AU loop (paper)", "batched B*C pass (before)", "folded per-AU passes (after, default)",
                          "per-AU loop, bf16 autocast", "folded, bf16 autocast"}
    assert diffs["folded per-AU passes (after, default)"] < 1e-5 and diffs["batched B*C pass (before)"] < 1e-5
    assert 0 < diffs["folded, bf16 autocast"] < 0.1  # bf16 is an approximation, and is reported as one
    assert "## Where the time goes (CPU profile)" in text


def test_seed_level_precision_difference_against_a_hand_computation():
    """benchmarks/speed_settings.py seed_level: fold-mean differences averaged over folds, with a Welch interval
    on fold-centred cells; checked against the formula by hand for 2 folds x 3 seeds, and for a pure shift."""
    import numpy as np
    from scipy import stats as st

    import speed_settings

    fa = {0: [0.70, 0.72, 0.74], 1: [0.60, 0.61, 0.65]}
    fb = {0: [0.69, 0.70, 0.71], 1: [0.58, 0.60, 0.62]}
    a = {("m", f, s): ({"test": {"f1": v}}, None) for f, vs in fa.items() for s, v in enumerate(vs)}
    b = {("m", f, s): ({"test": {"f1": v}}, None) for f, vs in fb.items() for s, v in enumerate(vs)}
    keys = sorted(a)
    d, lo, hi = speed_settings.seed_level(a, b, keys)
    assert d == np.mean([np.mean(fb[f]) - np.mean(fa[f]) for f in fa])  # -0.02
    var_a = np.mean([np.var(fa[f], ddof=1) for f in fa])  # pooled within-fold variance (equal sizes)
    var_b = np.mean([np.var(fb[f], ddof=1) for f in fb])
    se = np.sqrt((var_a / 3 + var_b / 3) / 2)
    dof = (var_a + var_b) ** 2 / (var_a ** 2 / 4 + var_b ** 2 / 4)
    half = st.t.ppf(0.975, dof) * se
    assert abs(lo - (d - half)) < 1e-12 and abs(hi - (d + half)) < 1e-12
    shifted = {k: ({"test": {"f1": v[0]["test"]["f1"] + 0.05}}, None) for k, v in a.items()}
    d2, lo2, hi2 = speed_settings.seed_level(a, shifted, keys)
    assert abs(d2 - 0.05) < 1e-12 and lo2 < 0.05 < hi2
    one_seed = [k for k in keys if k[2] == 0]
    assert np.isnan(speed_settings.seed_level(a, b, one_seed)[0])
