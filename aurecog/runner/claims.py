"""The papers' ablation claims (``results/reported/claims.csv``, one row per claim) tested on our runs.

A claim says model A differs from model B on one dataset/protocol and metric (``direction``: ``>`` A better,
``<`` A worse, ``~`` no difference within ``margin``), with the reported sizes. For each claim whose two models
are in a leaderboard's grid (same protocol, profile and task) the paired difference A - B is computed on the
cells both have (same folds and seeds) with the same subject draws (:func:`aurecog.runner.stats.paired_difference`)
and gets a verdict:

* ``>`` / ``<``: *reproduced* when the 95% interval excludes 0 on the claimed side, *contradicted* when it excludes
  0 on the other side, *inconclusive* otherwise;
* ``~``: *reproduced* when the interval lies inside [-margin, margin], *contradicted* when it lies entirely
  outside it, *inconclusive* otherwise (an equivalence test: a wide interval never confirms "no difference");
* a claim one of whose models is at floor level (its interval does not clear the best trivial predictor) is
  *inconclusive (at floor)* by construction.

On SynthAU presets a claim on the real dataset a preset mirrors is tested through the preset's
``reference`` mapping (our protocol -> theirs) and labelled SynthAU: the data differ, so only the direction and
the order of magnitude can be compared.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

SCALE = {"f1": 100.0, "f1_micro": 100.0, "acc": 100.0, "acc_overall": 100.0, "icc": 1.0, "mae": 1.0}
COLUMNS = ["paper", "table", "claim", "model_a", "model_b", "dataset", "protocol", "metric", "label",
           "reported_a", "reported_b", "reported_diff", "direction", "margin", "note"]


def load_claims(results: Path) -> pd.DataFrame:
    """``<results>/reported/claims.csv``; a missing column is one clear error naming the file."""
    path = Path(results) / "reported" / "claims.csv"
    if not path.exists():
        return pd.DataFrame(columns=COLUMNS)
    df = pd.read_csv(path, dtype={"label": str, "protocol": str, "dataset": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {COLUMNS}")
    bad = sorted(set(df["direction"]) - {">", "<", "~"})
    if bad:
        raise ValueError(f"{path}: direction must be one of '>', '<', '~', got {bad}")
    return df


def applicable(claims: pd.DataFrame, dataset: str, ds_cfg: dict) -> pd.DataFrame:
    """Claims about ``dataset`` (or, on a SynthAU preset, about the real dataset it mirrors), with the column
    ``our_protocol`` (our protocol name) and ``synthetic``."""
    if claims.empty:
        return claims.assign(our_protocol=[], synthetic=[])
    synthetic = ds_cfg.get("source") == "synth"
    ref = ds_cfg.get("reference") or {}
    if synthetic:
        theirs = ref.get("dataset")
        back = {v: k for k, v in (ref.get("protocols") or {}).items()}
    else:
        theirs, back = dataset, None
    sel = claims[claims["dataset"].astype(str).str.lower() == str(theirs).lower()].copy()
    sel["our_protocol"] = [back.get(p) if back is not None else p for p in sel["protocol"].astype(str)]
    sel["synthetic"] = synthetic
    return sel[sel["our_protocol"].notna()].reset_index(drop=True)


def verdict(lo: float, hi: float, direction: str, margin: float | None) -> str:
    """Reproduced / contradicted / inconclusive from a difference's interval (see the module docstring)."""
    if lo != lo or hi != hi:
        return "inconclusive"
    if direction == ">":
        return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"
    if direction == "<":
        return "reproduced" if hi < 0 else "contradicted" if lo > 0 else "inconclusive"
    m = float(margin) if margin is not None and margin == margin else 0.0
    if -m <= lo and hi <= m:
        return "reproduced"
    return "contradicted" if lo > m or hi < -m else "inconclusive"


def metric_key(metric: str, label) -> str:
    label = str(label)
    return metric if label in ("mean", "overall", "nan", "") else f"{metric}/{label}"


def evaluate_claims(claims: pd.DataFrame, rows: pd.DataFrame, difference) -> pd.DataFrame:
    """One result line per (claim, pair of rows): ``rows`` is the leaderboard's row table (columns model,
    protocol, profile, task, identity, row_id, at_floor); ``difference(row_id_a, row_id_b, metric_key)`` returns
    :func:`aurecog.runner.stats.paired_difference`'s dict. Differences are reported in the claim's units."""
    out = []
    for _, c in claims.iterrows():
        key = metric_key(c["metric"], c["label"])
        scale = SCALE.get(str(c["metric"]), 1.0)
        ra = rows[(rows["model"] == c["model_a"]) & (rows["protocol"].astype(str) == c["our_protocol"])]
        rb = rows[(rows["model"] == c["model_b"]) & (rows["protocol"].astype(str) == c["our_protocol"])]
        for _, a in ra.iterrows():
            for _, b in rb[(rb["profile"] == a["profile"]) & (rb["task"] == a["task"])].iterrows():
                d = difference(a["row_id"], b["row_id"], key)
                lo, hi = d["lo"] * scale, d["hi"] * scale
                v = verdict(lo, hi, c["direction"], c["margin"])
                floor = [m for m, r in ((c["model_a"], a), (c["model_b"], b)) if r["at_floor"]]
                if floor:
                    v = "inconclusive (at floor)"
                rep = c["reported_diff"]
                inside = "n/a" if rep != rep else ("yes" if lo <= rep <= hi else "no")
                out.append({"paper": c["paper"], "table": c["table"], "claim": c["claim"],
                            "model_a": c["model_a"], "model_b": c["model_b"], "metric": key,
                            "their_dataset": c["dataset"], "their_protocol": c["protocol"],
                            "protocol": c["our_protocol"], "profile": a["profile"],
                            "identity_a": a["identity"], "identity_b": b["identity"],
                            "direction": c["direction"], "margin": c["margin"], "reported_diff": rep,
                            "diff": d["diff"] * scale, "lo": lo, "hi": hi, "cells": d["cells"], "seeds": d["seeds"],
                            "verdict": v, "reported_in_ci": inside, "at_floor": ",".join(floor),
                            "synthetic": bool(c["synthetic"])})
    return pd.DataFrame(out)


def fmt_ci(diff: float, lo: float, hi: float, digits: int = 1) -> str:
    if diff != diff:
        return ""
    return f"{diff:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def markdown(res: pd.DataFrame, dataset: str, ref_name: str | None, draws: int) -> list[str]:
    """The claims section of leaderboard.md."""
    if res.empty:
        return []
    lines = ["## The papers' claims, tested", ""]
    if bool(res["synthetic"].iloc[0]):
        lines += [f"**SynthAU.** These are claims the papers make on {str(ref_name).upper()}, tested on the SynthAU "
                  f"preset `{dataset}` through its reference protocol mapping: the data differ, so a verdict says "
                  "whether the claimed *direction* holds on this embedded benchmark, not whether the paper's number "
                  "is right.", ""]
    lines += [f"Paired difference A - B (x100 for F1/accuracy) on the cells both models have (same folds, seeds and "
              f"resampled subjects), with a 95% subject-level bootstrap interval ({draws} draws). *reproduced*: the "
              "interval excludes 0 on the claimed side (for `~` claims: lies inside +/- margin); *contradicted*: it "
              "excludes 0 on the other side (outside the margin); otherwise *inconclusive*. A claim involving a "
              "model at floor level is inconclusive by construction.", "",
              "| paper | table | claim | A | B | metric | reported A-B | ours A-B [95% CI] | reported in CI | "
              "verdict | cells (seeds) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in res.iterrows():
        rep = "" if r["reported_diff"] != r["reported_diff"] else f"{r['reported_diff']:+.1f}"
        if r["direction"] == "~":
            rep = (rep + " " if rep else "") + f"(~, margin {r['margin']:g})"
        lines.append(f"| {r['paper']} | {r['table']} | {r['claim']} | {r['model_a']} | {r['model_b']} | "
                     f"{r['metric']} | "
                     f"{rep} | {fmt_ci(r['diff'], r['lo'], r['hi'])} | {r['reported_in_ci']} | **{r['verdict']}** | "
                     f"{r['cells']} ({r['seeds']}) |")
    counts = res["verdict"].value_counts()
    lines += ["", "Verdicts: " + ", ".join(f"{k} {int(v)}" for k, v in sorted(counts.items())) + ".", ""]
    return lines
