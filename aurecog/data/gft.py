"""The generic CSV layout (any AU dataset) and GFT through it.

GFT's exact file format could not be verified (its meta-data lives on OSF, osf.io/7wcyz; the videos come from the
University of Pittsburgh), so GFT is prepared from the **generic layout** below, which works for any AU dataset:
extract the frames, write one CSV row per frame, and run ``aurecog prepare gft`` (name ``gft``) or
``aurecog prepare generic --name <name>``.

Generic layout (``--src`` = the folder holding ``index.csv``; other CSV name: option ``csv``)::

    index.csv
    images/...            any tree; paths in the CSV are relative to the CSV's folder (or absolute)
    landmarks/...         optional landmark text files

``index.csv`` columns (header required, comma separated):

=====================  ======================================================================================
``image``              (required) frame image path
``subject``            (required) subject id (protocols split on it)
``session``            (optional) sequence/video/task id; default empty
``frame``              (optional) frame number; default the row's position within its subject
``split``              (optional) kept as an index column (official partitions: ``fixed_split`` on ``split``)
``AU<k>``              occurrence: 1 present, 0 absent, the unknown code (option ``unknown``, default 9) or -1
``AU<k>_int``          (optional) intensity 0-5, the unknown code or -1
``expression``         (optional) expression name per frame (empty = none); the class list is the sorted set of
                       names unless option ``expressions`` gives it
``x0,y0,...``          (optional) landmarks in source-image pixels, ``x<i>``/``y<i>`` for i < L, L = 49
                       (intraface49), 66 (disfa66) or 68 (ibug68)
``landmarks``          (optional, instead of x/y columns) a landmark text file per frame: ``x y`` per line or an
                       iBUG ``.pts`` file (68 points unless option ``landmark_layout``)
=====================  ======================================================================================

Rows without landmarks go to the optional dlib detector (``pip install dlib-bin face-recognition-models``).
Unknown codes become -1; a label code or frame number that is not an integer (``0.6``) stops preparation naming
the CSV line and column (never rounded). Every problem row is reported (``report.csv``) or raises an error naming
the CSV line.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from aurecog.data import prepare as P
from aurecog.data.landmarks import N_POINTS

GFT_AUS = [1, 2, 4, 6, 10, 12, 14, 15, 23, 24]
_LAYOUT_BY_N = {n: k for k, n in N_POINTS.items()}
OPTION_HELP = {
    "name": "dataset name written to the index and meta.json",
    "csv": "index CSV, relative to --src (or absolute)",
    "unknown": "the CSV's unknown label code (-1 is always unknown)",
    "expressions": "expression class list, comma-separated (default: sorted names in the CSV)",
    "landmark_layout": "layout of landmark files: ibug68, disfa66 or intraface49 (x/y columns: from their count)",
    "positive_threshold": "occurrence = intensity >= this, when the CSV has only AU<k>_int columns",
    "chunk": "frames per work chunk (bounds a worker's memory)",
}


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise P.PrepareError(f"{path}: index CSV not found (generic layout: index.csv with image, subject, AU<k> "
                             "columns); is --src the folder holding it?")
    import csv

    with open(path, newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, None)
        if not header:
            raise P.PrepareError(f"{path}: empty CSV (a header row is required)")
        for i, r in enumerate(rows, start=2):
            if r and len(r) != len(header):
                raise P.PrepareError(f"{path}: line {i} has {len(r)} columns, expected {len(header)}")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise P.PrepareError(f"{path}: malformed CSV ({e})") from e


def _int_column(df: pd.DataFrame, col: str, path: Path, allowed: set[int], unknown: int) -> np.ndarray:
    out = np.empty(len(df), dtype=np.int64)
    for i, v in enumerate(df[col].tolist()):
        v = v.strip()
        try:
            x = P.parse_int(v) if v != "" else unknown
        except ValueError as e:
            raise P.PrepareError(f"{path}: line {i + 2}, column {col}: {v!r} is not an integer code; fix the CSV "
                                 "(codes are never rounded)") from e
        if x == unknown or x == -1:
            x = P.UNKNOWN
        elif x not in allowed:
            raise P.PrepareError(f"{path}: line {i + 2}, column {col}: value {x}; expected {sorted(allowed)}, "
                                 f"the unknown code {unknown} or -1")
        out[i] = x
    return out


def prepare_generic(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, name="generic",
                    csv="index.csv", unknown=9, expressions=None, landmark_layout=None, positive_threshold=2,
                    chunk=500):
    """Prepare any AU dataset from the generic CSV layout (index.csv; README, "Generic CSV layout")."""
    return _prepare_csv(src, out, workers, image_size, progress, name=name, csv=csv, unknown=unknown,
                        expressions=expressions, landmark_layout=landmark_layout,
                        positive_threshold=positive_threshold, chunk=chunk)


def _prepare_csv(src, out, workers, image_size, progress, *, name, csv, unknown, expressions, landmark_layout,
                 positive_threshold, chunk, obtain_note=""):
    src, out = Path(src), Path(out)
    positive_threshold, unknown, chunk = int(positive_threshold), int(unknown), int(chunk)
    expressions = P.as_list(expressions)
    if landmark_layout is not None and landmark_layout not in N_POINTS:
        raise P.PrepareError(f"landmark_layout={landmark_layout}: expected one of {', '.join(N_POINTS)}")
    path = Path(csv) if Path(csv).is_absolute() else src / csv
    df = _read_csv(path)
    for col in ("image", "subject"):
        if col not in df.columns:
            raise P.PrepareError(f"{path}: required column {col!r} missing (columns: {list(df.columns)[:12]})")
    if df.columns.duplicated().any():
        raise P.PrepareError(f"{path}: duplicate columns {list(df.columns[df.columns.duplicated()])}")
    au_cols = sorted((c for c in df.columns if re.fullmatch(r"AU\d+", c)), key=lambda c: int(c[2:]))
    int_cols = sorted((c for c in df.columns if re.fullmatch(r"AU\d+_int", c)), key=lambda c: int(c[2:-4]))
    if not au_cols and not int_cols and "expression" not in df.columns:
        raise P.PrepareError(f"{path}: no label columns (AU<k>, AU<k>_int or expression)")
    occ = {c: _int_column(df, c, path, {0, 1}, int(unknown)) for c in au_cols}
    inten = {c: _int_column(df, c, path, set(range(6)), int(unknown)) for c in int_cols}
    # landmarks
    xs = [c for c in df.columns if re.fullmatch(r"x\d+", c)]
    layout, lm_cols = None, None
    if xs:
        n = len(xs)
        if n not in _LAYOUT_BY_N or any(f"x{i}" not in df.columns or f"y{i}" not in df.columns for i in range(n)):
            raise P.PrepareError(f"{path}: landmark columns must be x0,y0..x<L-1>,y<L-1> with L in "
                                 f"{sorted(_LAYOUT_BY_N)}; found {n} x-columns")
        layout = _LAYOUT_BY_N[n]
        lm_cols = [c for i in range(n) for c in (f"x{i}", f"y{i}")]
    elif "landmarks" in df.columns:
        layout = landmark_layout or "ibug68"
    layout = layout or landmark_layout or "ibug68"
    # expressions
    expr_names: list[str] = []
    expr = None
    if "expression" in df.columns:
        vals = [v.strip() for v in df["expression"].tolist()]
        expr_names = list(expressions) if expressions else sorted({v for v in vals if v})
        unknown_expr = sorted({v for v in vals if v and v not in expr_names})
        if unknown_expr:
            raise P.PrepareError(f"{path}: expressions {unknown_expr} not in {expr_names}")
        expr = np.array([expr_names.index(v) if v else P.UNKNOWN for v in vals])
    base = path.parent
    by_subject: dict[str, list[P.Frame]] = {}
    counter: dict[str, int] = {}
    report = []
    for i, rec in enumerate(df.to_dict("records")):
        subj = rec["subject"].strip()
        if not subj or not rec["image"].strip():
            raise P.PrepareError(f"{path}: line {i + 2}: empty image or subject")
        img = Path(rec["image"].strip())
        img = img if img.is_absolute() else base / img
        k = counter.get(subj, 0)
        counter[subj] = k + 1
        frame = rec.get("frame", "").strip()
        try:
            frame = P.parse_int(frame) if frame else k
        except ValueError as e:
            raise P.PrepareError(f"{path}: line {i + 2}: frame {frame!r} is not an integer") from e
        row = {"dataset": name, "subject": subj, "session": rec.get("session", "").strip(), "frame": frame}
        if "split" in rec:
            row["split"] = rec["split"].strip()
        row.update({c: int(occ[c][i]) for c in au_cols})
        row.update({c: int(inten[c][i]) for c in int_cols})
        if expr is not None:
            row["expression"] = int(expr[i])
        fr = P.Frame(row=row, image=str(img), file=str(img))
        if lm_cols is not None:
            raw = [rec[c].strip() for c in lm_cols]
            if all(raw):
                try:
                    fr.landmarks = np.asarray(raw, dtype=np.float32).reshape(-1, 2)
                except ValueError as e:
                    raise P.PrepareError(f"{path}: line {i + 2}: non-numeric landmark value") from e
            elif any(raw):
                report.append(P.note(img, f"incomplete landmark columns: {path.name} line {i + 2}", "no_landmarks"))
                continue
        elif "landmarks" in rec and rec["landmarks"].strip():
            lp = Path(rec["landmarks"].strip())
            fr.landmark_file = str(lp if lp.is_absolute() else base / lp)
            fr.landmark_reader = "text"
        by_subject.setdefault(subj, []).append(fr)
    jobs = []
    for subj in sorted(by_subject):
        jobs.extend(P.chunked(f"{name}/{subj}", by_subject[subj], size=chunk, detector=True))
    aus = au_cols or [c[:-4] for c in int_cols]
    iaus = [c[:-4] for c in int_cols]
    if not au_cols and int_cols:  # occurrence derived from intensity
        for jb in jobs:
            for fr in jb.frames:
                for a in iaus:
                    v = fr.row[f"{a}_int"]
                    fr.row[a] = P.UNKNOWN if v < 0 else int(v >= positive_threshold)
    meta = {
        "name": name, "aus": aus, "intensity_aus": iaus, "expressions": expr_names,
        "positive_threshold": int(positive_threshold), "source_csv": str(path),
        "label_conventions": f"occurrence 0/1; the unknown code {unknown} (and -1) -> -1; intensity 0-5"
                             + ("; occurrence derived as intensity >= positive_threshold" if not au_cols else "")
                             + (f"; {obtain_note}" if obtain_note else ""),
        "landmark_source": "x/y columns" if lm_cols else "landmark files" if "landmarks" in df.columns
        else "dlib detector",
    }
    return P.prepare_jobs(jobs, out, layout=layout, meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(aus, iaus, bool(expr_names)), extra_report=report)


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, name="gft", csv="index.csv",
            unknown=9, expressions=None, landmark_layout=None, positive_threshold=2, chunk=500):
    """Prepare GFT from the generic CSV layout (index.csv with a split column: the official partition)."""
    return _prepare_csv(src, out, workers, image_size, progress, name=name, csv=csv, unknown=unknown,
                        expressions=expressions, landmark_layout=landmark_layout,
                        positive_threshold=positive_threshold, chunk=chunk,
                        obtain_note="GFT via the generic CSV layout")
