"""How many contrarian subjects the `synth` preset needs (issue #17, "presets sized for the question").

The study's gap question is ``reduction = gap(ablation) - gap(model)``, gap = F1(common) - F1(contrarian), with a
subject-level bootstrap stratified by fold and habit status (aurecog/runner/bias.py). Per test subject ``s`` let
``d_s = F1_model(s) - F1_ablation(s)`` (mean F1 over the AUs the subject shows, on the same frames); then
``reduction = mean(d | contrarian) - mean(d | common)`` and, subjects being the resampled unit, its standard error
is ``sqrt(sd_x^2 / n_x + sd_c^2 / n_c)`` (x = contrarian, c = common, n = test subjects over all folds; seeds are
averaged within a subject, which can only shrink ``sd``). This script measures ``sd`` of ``d_s`` on finished cells
of the study's pairs and prints the 95% half-width for a range of designs, so that the preset is sized from a
measurement, not a guess:

    python benchmarks/study_power.py --results RESULTS [--dataset synth] [--target 5.0] [--out FILE.md]

RESULTS is a results folder holding each pair's cells (e.g. one `make bench` of the pairs at the old preset).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aurecog.runner import stats as S  # noqa: E402

#: the study's gap pairs (configs/study.yaml questions of kind gap), model -> its ablation
PAIRS = (("cisnet", "cisnet-resnet34-wo"), ("ac2d", "ac2d-av"), ("iern", "iern-disentangle"),
         ("iern", "iern-baseline"))
Z95 = 1.96
#: candidate (common, contrarian) subjects per fold; v3 was 5 + 1, v4 is 12 + 3
DESIGNS = ((5, 1), (5, 2), (9, 3), (12, 3), (8, 4), (12, 4), (15, 5), (27, 9))
#: wanted half-width: a third of the smallest common-contrarian gap measured on v3 (10.4 F1 points, RE-Net;
#: baseline 16.2), i.e. a causal part that removes a third of a gap is told from noise at one seed
TARGET = 5.0
BUDGET_FRAMES = 2955  # frames of the v3 `synth` preset (18 subjects x 3 sessions x 48-62)


def subject_f1(df: pd.DataFrame, labels: list[str]) -> pd.Series:
    """Per subject: mean over the AUs with at least one positive frame of that subject of its F1 at 0.5, from the
    leaderboard's own per-subject sums (:func:`aurecog.runner.stats.subject_sums`)."""
    keys = sorted(set(S.clusters(df)))
    sums = S.subject_sums(df, "au", labels, keys)
    n = len(labels)
    tp, fp, fn = sums[:, :n], sums[:, n:2 * n], sums[:, 2 * n:]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    return pd.Series(np.nanmean(f1, axis=1), index=[k.split("/", 1)[1] for k in keys])


def paired(results: Path, dataset: str, model: str, ablation: str) -> pd.DataFrame:
    """One row per (fold, test subject): d = F1 model - F1 ablation (seed-averaged), contrarian flag."""
    rows = []
    base = results / "runs" / dataset
    for mf in sorted((base / model).glob("*/metrics.json")):
        af = base / ablation / mf.parent.name / "metrics.json"
        if not af.exists():
            continue
        m = json.loads(mf.read_text())
        labels = m["labels"]
        fm = subject_f1(pd.read_parquet(mf.parent / "predictions.parquet"), labels)
        fa = subject_f1(pd.read_parquet(af.parent / "predictions.parquet"), labels)
        for s, h in m["test_habits"].items():
            rows.append({"fold": m["fold"], "seed": m["seed"], "subject": s, "contrarian": bool(h["contrarian"]),
                         "d": fm.get(s, np.nan) - fa.get(s, np.nan)})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    return df.groupby(["fold", "subject", "contrarian"], as_index=False)["d"].mean()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True)
    ap.add_argument("--dataset", default="synth")
    ap.add_argument("--target", type=float, default=TARGET, help="wanted 95%% half-width, F1 points")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cells = sorted(Path(a.results).glob(f"runs/{a.dataset}/*/*/metrics.json"))
    made = sorted({(json.loads(f.read_text()).get("identity") or {}).get("revision", "?")[:7] for f in cells})
    versions = sorted({str((json.loads(f.read_text()).get("identity") or {}).get("data", "?")) for f in cells})
    lines = ["# Sizing the contrarian subjects of `synth`", "",
             f"Command: `python benchmarks/study_power.py {' '.join(sys.argv[1:])}`", "",
             f"Cells read: {len(cells)} under `{a.results}/runs/{a.dataset}` (data "
             f"{', '.join(versions)}; made at revision(s) {', '.join(made)}).", "",
             "Per test subject d = F1(model) - F1(ablation), x100; sd over subjects of each habit stratum; "
             "half-width = 1.96 sqrt(sd_x^2/n_x + sd_c^2/n_c) of the gap reduction for n_x contrarian and n_c "
             "common test subjects over the 3 folds (seeds averaged within a subject, so this is an upper bound "
             "when seeds are added).", "",
             "| pair | subjects (common / contrarian) | sd d common | sd d contrarian | sd used |", "|---|---|---|---|---|"]
    sds = []
    for model, abl in PAIRS:
        df = paired(Path(a.results), a.dataset, model, abl)
        if df.empty:
            continue
        c, x = df[~df.contrarian]["d"] * 100, df[df.contrarian]["d"] * 100
        # contrarians are few: use the larger of the two strata's spreads (pooled would understate it)
        used = float(np.nanmax([c.std(ddof=1), x.std(ddof=1) if len(x) > 1 else np.nan]))
        sds.append(used)
        lines.append(f"| {model} vs {abl} | {len(c)} / {len(x)} | {c.std(ddof=1):.1f} | "
                     f"{x.std(ddof=1) if len(x) > 1 else float('nan'):.1f} | {used:.1f} |")
    if not sds:
        print(f"no paired cells under {a.results}/runs/{a.dataset}", file=sys.stderr)
        return 2
    sd = float(np.max(sds))
    lines += ["", f"Design table with the largest measured sd ({sd:.1f} F1 points): 95% half-width of the gap "
              "reduction (F1 points, one seed); *look-alike share* = fraction of the training subjects with a "
              "contrarian family's look who have the common habits of that look (the shortcut the contrarians "
              f"break: lower is a weaker confounder); frames per subject at the v3 preset's {BUDGET_FRAMES} frames "
              "(the cell's cost).", "",
              "| subjects per fold (common + contrarian) | n_c | n_x | half-width | within target | look-alike share "
              "| frames per subject |", "|---|---|---|---|---|---|---|"]
    for common, contr in DESIGNS:
        nc, nx = 3 * common, 3 * contr
        hw = Z95 * sd * np.sqrt(1 / nx + 1 / nc)
        same_look = 2 * common / 3  # common subjects of one habit group in the two training folds
        lines.append(f"| {common} + {contr} | {nc} | {nx} | {hw:.1f} | {'yes' if hw <= a.target else 'no'} | "
                     f"{same_look / (same_look + contr):.2f} | {BUDGET_FRAMES / (3 * (common + contr)):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
