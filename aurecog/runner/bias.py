"""The deconfounding question on SynthAU, with uncertainty: the gap between two test strata and whether a model
with a causal part shrinks it relative to its own ablation without it.

* AU presets (``synth``): the test subjects whose expression habits training subjects share (*common*) and the
  *contrarian* subjects whose habits contradict those of the same-looking training subjects (SynthAU's ground
  truth, ``test_habits`` in each cell's metrics.json); metric: mean F1 over AUs.
* The expression mix (``synth-fermix``): in-distribution test sequences of the (dataset, expression) cells seen in
  training (the protocol's ``id_fraction``, ``predictions_id.parquet``) and the held-out cells (the headline,
  ``predictions.parquet``); metric: mean per-class accuracy.

For each leaderboard row the metric is computed on both strata as the leaderboard does (per-fold for AUs,
pooled over folds for expressions, then over seeds); *gap* = first - second. Intervals come from the
leaderboard's subject-level bootstrap (:mod:`aurecog.runner.stats`) with the resampling stratified by fold *and*
stratum, so every draw keeps each fold's numbers of subjects per stratum; all rows share the draws (same fold
keys), so the difference of two rows' gaps is paired.

The questions (which model is compared with which ablation) are data: ``configs/study.yaml`` ``questions``.
``gap`` questions compare gaps: ``reduction = gap(ablation) - gap(model)``, *shrinks* when its interval lies above
0, *widens* when below, otherwise *inconclusive*; ``metric`` questions compare the headline metric itself
(``model - ablation``; *better* / *worse* / *inconclusive*). A question involving a row at floor level is
inconclusive by construction, as the claims table does; so is a gap question when a fold has a single subject in
a stratum (every draw keeps that subject, so the interval lacks its between-subject spread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from aurecog import config as C
from aurecog.runner import stats as S

SPLITS = ("common", "contrarian")
#: the o.o.d. pair on the expression mix: a heldout_cells protocol's in-distribution test sequences
#: (``id_fraction``, predictions_id.parquet) against its held-out cells (predictions.parquet, the headline)
OOD_SPLITS = ("in-distribution", "held-out")
ID_PREDICTIONS = "predictions_id.parquet"  # aurecog.runner.cell.ID_PREDICTIONS (not imported: no torch here)
STUDY_FILE = "study.yaml"
QUESTION_KINDS = ("gap", "metric")
QUESTION_KEYS = {"model", "ablation", "kind", "part", "datasets"}


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def load_questions(path: Path | None = None) -> list[dict]:
    """The study's questions (``configs/study.yaml`` ``questions``), each checked for its keys."""
    path = Path(path or C.CONFIG_DIR / STUDY_FILE)
    doc = _load_yaml(path)
    out = []
    for i, q in enumerate(doc.get("questions") or []):
        unknown = set(q) - QUESTION_KEYS
        if unknown:
            raise ValueError(f"{path}: question {i + 1} has unknown key(s) {sorted(unknown)}; "
                             f"allowed: {sorted(QUESTION_KEYS)}")
        missing = {"model", "ablation", "kind"} - set(q)
        if missing:
            raise ValueError(f"{path}: question {i + 1} lacks {sorted(missing)}")
        if q["kind"] not in QUESTION_KINDS:
            raise ValueError(f"{path}: question {i + 1} kind={q['kind']!r}; use one of {QUESTION_KINDS}")
        out.append(q)
    return out


def _split_frames(r: dict, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    contrarian = {s for s, h in (r.get("test_habits") or {}).items() if h["contrarian"]}
    is_c = df["subject"].astype(str).isin(contrarian).to_numpy()
    return {"common": df[~is_c], "contrarian": df[is_c]}


def _row_parts(dataset: str, a, rs: list[dict]) -> dict[str, S.RowData] | None:
    """The two test strata of one leaderboard row: common / contrarian subjects (AU rows with SynthAU habit
    ground truth) or in-distribution / held-out cells (expression rows whose protocol scored both)."""
    if a["task"] == "au":
        rs = [r for r in rs if r.get("test_habits") and (r["_dir"] / "predictions.parquet").exists()]
        splits, kind = SPLITS, "au"
    elif a["task"] == "expression":
        rs = [r for r in rs if (r["_dir"] / ID_PREDICTIONS).exists() and (r["_dir"] / "predictions.parquet").exists()]
        splits, kind = OOD_SPLITS, "expression"
    else:
        return None
    if not rs:
        return None
    parts = {sp: S.RowData(kind, rs[0]["labels"], f"{dataset}/{a['protocol']}/{kind}/{sp}") for sp in splits}
    for r in rs:
        if kind == "au":
            frames = _split_frames(r, pd.read_parquet(r["_dir"] / "predictions.parquet"))
        else:
            frames = {"in-distribution": pd.read_parquet(r["_dir"] / ID_PREDICTIONS),
                      "held-out": pd.read_parquet(r["_dir"] / "predictions.parquet")}
        for sp, df in frames.items():
            if len(df):
                parts[sp].add(r["fold"], r["seed"], df)
    return parts if all(p.frames for p in parts.values()) else None


class HabitGaps:
    """The two test strata of every leaderboard row that has them (common / contrarian subjects on the AU
    presets, in-distribution / held-out cells on synth-fermix), on shared draws; gap = first - second."""

    def __init__(self, dataset: str, agg: pd.DataFrame, groups: dict[int, list[dict]], draws: int = S.DRAWS,
                 seed: int = S.SEED):
        self.rows: dict[int, dict[str, S.RowData]] = {}
        for i, a in agg.iterrows():
            parts = _row_parts(dataset, a, groups[i])
            if parts is not None:
                self.rows[i] = parts
        subjects: dict[str, set] = {}
        for parts in self.rows.values():
            for row in parts.values():
                for fold in {f for f, _ in row.frames}:
                    subjects.setdefault(f"{row.fold_key}/{fold}", set()).update(row.subjects(fold))
        self.boot = S.Bootstrap(S.Resampler(draws, seed), {k: sorted(v) for k, v in subjects.items()})
        #: fewest subjects a fold has in a stratum: with 1, every draw keeps that subject, so the interval
        #: holds no between-subject spread for that stratum (it is then marked in the table)
        names = {sp for parts in self.rows.values() for sp in parts}
        self.min_per_fold = {sp: min((len(v) for k, v in subjects.items() if k.split("/")[-2] == sp), default=0)
                             for sp in names}
        self.sums = {i: {sp: self.boot.cell_sums(row) for sp, row in parts.items()} for i, parts in self.rows.items()}

    def splits(self, i: int) -> tuple[str, str]:
        return tuple(self.rows[i])  # type: ignore[return-value]

    def metric(self, i: int) -> str:
        return S.HEADLINE[next(iter(self.rows[i].values())).kind]

    def thin(self, i: int) -> bool:
        """A fold of row ``i`` has a single subject in one of its strata."""
        return min(self.min_per_fold[sp] for sp in self.splits(i)) < 2

    def _eval(self, i: int, keys=None) -> dict[str, tuple[float, np.ndarray]]:
        out, m = {}, self.metric(i)
        for sp in self.splits(i):
            point, draws = self.boot.evaluate(self.rows[i][sp], self.sums[i][sp], keys)
            out[sp] = (point[m], draws[m])
        return out

    def _keys(self, i: int) -> set:
        first, second = self.splits(i)
        return set(self.sums[i][first]) & set(self.sums[i][second])

    def row(self, i: int) -> dict:
        """Point values and 95% intervals of the metric on both strata and of the gap of row ``i`` (keys
        ``first``/``second``/``gap``; AU rows also under ``common``/``contrarian``)."""
        first, second = self.splits(i)
        e = self._eval(i, self._keys(i))
        (p1, d1), (p2, d2) = e[first], e[second]
        out = {"row_id": i, "first": p1, "second": p2, "gap": p1 - p2}
        for name, d in (("first", d1), ("second", d2), ("gap", d1 - d2)):
            out[f"{name}_lo"], out[f"{name}_hi"] = S.interval(d)
        for alias, name in ((first, "first"), (second, "second")):
            for suffix in ("", "_lo", "_hi"):
                out[alias + suffix] = out[name + suffix]
        keys = self._keys(i)
        out["cells"], out["seeds"] = len(keys), len({s for _, s in keys})
        return out

    def gap_reduction(self, model: int, ablation: int) -> dict:
        """gap(ablation) - gap(model) on the cells both rows have, with paired draws."""
        keys = self._keys(model) & self._keys(ablation)
        if not keys or self.splits(model) != self.splits(ablation):
            return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "cells": 0, "seeds": 0}
        first, second = self.splits(model)
        em, ea = self._eval(model, keys), self._eval(ablation, keys)
        gm = em[first][0] - em[second][0]
        ga = ea[first][0] - ea[second][0]
        d = (ea[first][1] - ea[second][1]) - (em[first][1] - em[second][1])
        lo, hi = S.interval(d)
        return {"diff": ga - gm, "lo": lo, "hi": hi, "cells": len(keys), "seeds": len({s for _, s in keys})}


def _verdict(lo: float, hi: float, kind: str) -> str:
    pos, neg = ("shrinks the gap", "widens the gap") if kind == "gap" else ("better", "worse")
    if lo != lo or hi != hi:
        return "inconclusive"
    return pos if lo > S.CLEAR else neg if hi < -S.CLEAR else "inconclusive"


def answer(questions: list[dict], dataset: str, agg: pd.DataFrame, gaps: HabitGaps, difference) -> pd.DataFrame:
    """One line per question and pair of rows (same protocol, profile, task) present in ``agg``;
    ``difference(a, b, metric)`` is the leaderboard's paired difference (:meth:`stats.Uncertainty.difference`)."""
    out = []
    for q in questions:
        if q.get("datasets") and dataset not in q["datasets"]:
            continue
        ra, rb = agg[agg["model"] == q["model"]], agg[agg["model"] == q["ablation"]]
        for _, a in ra.iterrows():
            same = rb[(rb["protocol"].astype(str) == str(a["protocol"])) & (rb["profile"] == a["profile"])
                      & (rb["task"] == a["task"])]
            for _, b in same.iterrows():
                if q["kind"] == "gap":
                    if a["row_id"] not in gaps.rows or b["row_id"] not in gaps.rows:
                        continue
                    d = gaps.gap_reduction(a["row_id"], b["row_id"])
                    measure = f"gap(ablation) - gap(model), {gaps.metric(a['row_id'])} x100"
                else:
                    d = difference(a["row_id"], b["row_id"], S.HEADLINE[a["task"]])
                    measure = f"{S.HEADLINE[a['task']]}(model) - {S.HEADLINE[a['task']]}(ablation), x100"
                v = _verdict(d["lo"], d["hi"], q["kind"])
                floor = [m for m, r in ((q["model"], a), (q["ablation"], b)) if bool(r.get("at_floor", False))]
                if floor:
                    v = "inconclusive (at floor)"
                elif q["kind"] == "gap" and (gaps.thin(a["row_id"]) or gaps.thin(b["row_id"])):
                    v = "inconclusive (1 subject per fold in a stratum)"
                out.append({"model": q["model"], "ablation": q["ablation"], "part": q.get("part", ""),
                            "kind": q["kind"], "measure": measure, "protocol": a["protocol"], "profile": a["profile"],
                            "diff": d["diff"] * 100, "lo": d["lo"] * 100, "hi": d["hi"] * 100, "cells": d["cells"],
                            "seeds": d["seeds"], "verdict": v, "at_floor": ",".join(floor)})
    return pd.DataFrame(out)


def _ci(v: float, lo: float, hi: float) -> str:
    return "" if v != v else f"{v * 100:.1f} [{lo * 100:.1f}, {hi * 100:.1f}]"


_SECTION = {
    SPLITS: ("## Subject bias (SynthAU ground-truth habits)",
             "Mean F1 x 100 on the test subjects whose expression habits training subjects share (*common*) and on "
             "the *contrarian* subjects, whose habits contradict those of the same-looking training subjects (e.g. "
             "smiles without AU6); *gap* = common - contrarian. A model that leans on training-subject "
             "co-occurrence has a larger gap. 95% intervals: subject-level bootstrap stratified by fold and habit "
             "status ({draws} draws, shared with the questions below).",
             "F1 common", "F1 contrarian"),
    OOD_SPLITS: ("## Dataset bias (in-distribution vs held-out cells)",
                 "Mean per-class accuracy x 100 on test sequences of the (dataset, expression) cells seen in training "
                 "(*in-distribution*, the protocol's `id_fraction` kept out of training) and on the held-out cells "
                 "(the headline); *gap* = in-distribution - held-out. A model that leans on the dataset "
                 "(background, colour, blur) has a larger gap. 95% intervals: subject-level bootstrap stratified by "
                 "fold and test set ({draws} draws, shared with the questions below).",
                 "acc in-distribution", "acc held-out"),
}


def markdown(agg: pd.DataFrame, gaps: HabitGaps, answers: pd.DataFrame, draws: int) -> list[str]:
    """The bias sections of a SynthAU leaderboard: the gap per row, then the study's questions."""
    if not gaps.rows:
        return []
    lines = []
    for pair, (title, text, h1, h2) in _SECTION.items():
        ids = [i for i in gaps.rows if gaps.splits(i) == pair]
        if not ids:
            continue
        lines += [title, "", text.format(draws=draws), "",
                  f"| model | group | protocol | {h1} [95% CI] | {h2} [95% CI] | gap [95% CI] | cells (seeds) |",
                  "|---|---|---|---|---|---|---|"]
        for i, a in agg.loc[ids].sort_values(["protocol", "family", "group", "model"]).iterrows():
            g = gaps.row(i)
            name = a["model"] + (" (**at floor**)" if bool(a.get("at_floor", False)) else "")
            lines.append(f"| {name} | {a['group']} | {a['protocol']} | "
                         f"{_ci(g['first'], g['first_lo'], g['first_hi'])} | "
                         f"{_ci(g['second'], g['second_lo'], g['second_hi'])} | "
                         f"{_ci(g['gap'], g['gap_lo'], g['gap_hi'])} | {g['cells']} ({g['seeds']}) |")
        lines.append("")
        thin = [sp for sp in pair if gaps.min_per_fold.get(sp, 0) < 2]
        if thin:
            lines += [f"**Caution:** a fold has a single {' / '.join(thin)} test subject, so the bootstrap redraws "
                      "that one subject every time: those intervals hold no between-subject spread (they are too "
                      "narrow), and so do the gap intervals built on them. A preset with several such subjects per "
                      "fold is needed to tell a gap difference from noise (issue #17, presets sized for the "
                      "question).", ""]
    if answers.empty:
        return lines
    lines += ["### The study's questions (configs/study.yaml)", "",
              "*gap* questions: does the model's causal part shrink the gap above (common - contrarian, or "
              "in-distribution - held-out) relative to its own ablation without it (reduction = gap(ablation) - "
              "gap(model), paired draws)? *metric* questions: is the model better than the ablation on the headline "
              "metric? *inconclusive* when the 95% interval includes 0.", "",
              "| model | ablation | part | protocol | measure | difference [95% CI] | verdict | cells (seeds) |",
              "|---|---|---|---|---|---|---|---|"]
    for _, r in answers.iterrows():
        lines.append(f"| {r['model']} | {r['ablation']} | {r['part']} | {r['protocol']} | {r['measure']} | "
                     f"{r['diff']:+.1f} [{r['lo']:+.1f}, {r['hi']:+.1f}] | **{r['verdict']}** | "
                     f"{r['cells']} ({r['seeds']}) |")
    lines.append("")
    return lines
