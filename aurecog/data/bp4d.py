"""BP4D-Spontaneous reader (also used for BP4D+, see :mod:`aurecog.data.bp4dplus`).

Expected layout under ``--src`` (the distribution as shipped, zips may stay zipped)::

    AUCoding/AU_OCC/<Subj>_<Task>.csv            occurrence: header row, first column = frame number (named "0"
                                                 in BP4D), column "k" (or "AUk") = AU k (0/1, 9 = unknown)
    AUCoding/AU_INT/AU06/<Subj>_<Task>_AU06.csv  intensity (optional): no header, rows "frame,intensity",
                                                 0-5, 9 = unknown; AUs 6, 10, 12, 14, 17
    2DFeatures/<Subj>_<Task>.mat                 49 IntraFace landmarks per frame (see below)
    2D+3D/<Subj>/<Task>/<frame>.jpg              frames (the file name's digits are the frame number);
    (or 2D+3D/<Subj>.zip holding <Subj>/<Task>/<frame>.jpg, or Sequences/<Subj>/<Task>/, or <Subj>/<Task>/)

Landmarks (``2DFeatures/<Subj>_<Task>.mat``, read with ``scipy.io.loadmat``). Accepted variables:

* ``fit``: struct array with one element per video frame and field ``pred`` (49 x 2, x/y in pixels; empty when
  the tracker lost the face), optionally a field ``frame`` (frame number). Without ``frame``, element k belongs
  to the k-th frame image of the task folder in frame-number order.
* ``pts`` or ``landmarks``: a numeric array N x 49 x 2 (or N x 98, x1 y1 x2 y2 ...), element k = k-th frame.

Text alternative (when the .mat cannot be read or scipy is missing): ``2DFeatures/<Subj>_<Task>.txt``, one
line per frame ``frame x1 y1 x2 y2 ... x49 y49`` (99 numbers, whitespace or comma separated).

Label convention: occurrence 1 = present, 0 = absent, **9 = unknown -> -1** (masked); intensity 0-5, 9 -> -1.
Only frames with an occurrence row and an image are prepared; labelled frames without image or landmarks are
listed in ``report.csv``; images without an occurrence row are uncoded frames (one summary line per sequence).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from aurecog.data import prepare as P

BP4D_AUS = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]
BP4D_INTENSITY_AUS = [6, 10, 12, 14, 17]
UNKNOWN_CODE = 9
LAYOUT = "intraface49"
_SEQ = re.compile(r"^([A-Za-z]+\d+)_(T\d+)$")


def _frame_sources(src: Path, subj: str, task: str, zips: dict[str, Path]) -> dict[int, str]:
    """frame number -> image path (or ``zip::member``) of one sequence."""
    for base in (src / "2D+3D", src / "Sequences", src / "images", src):
        folder = base / subj / task
        if folder.is_dir():
            out = {}
            for p in P.list_images(folder):
                f = P.frame_number(p.name)
                if f is not None:
                    out[f] = str(p)
            return out
    if subj in zips:
        out = {}
        with zipfile.ZipFile(zips[subj]) as zf:
            for name in zf.namelist():
                parts = Path(name).parts
                if len(parts) >= 2 and parts[-2] == task and Path(name).suffix.lower() in P.IMAGE_EXTS:
                    f = P.frame_number(name)
                    if f is not None:
                        out[f] = f"{zips[subj]}::{name}"
        return out
    return {}


def read_occurrence(path: Path, aus: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(frames, labels N x len(aus) in {0,1,-1}) from an AU_OCC csv; PrepareError naming the file on problems."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise P.PrepareError(f"{path}: empty occurrence file")
    header = [h.strip().strip('"') for h in lines[0].split(",")]
    cols: list[int | None] = [0]  # the first column is the frame number whatever its name ("0" in BP4D)
    for h in header[1:]:
        digits = re.findall(r"\d+", h)
        cols.append(int(digits[-1]) if digits else None)  # "12", "AU12", "AU_12" name AU 12
    missing = [a for a in aus if a not in cols[1:]]
    if missing:
        raise P.PrepareError(f"{path}: header lacks AU columns {missing} (has {len(cols)} columns: "
                             f"{header[:8]}...)")
    table = P.read_int_table(path, header=True, ncols=len(cols))
    labels = table[:, [cols.index(a, 1) for a in aus]]
    bad = set(np.unique(labels).tolist()) - {0, 1, UNKNOWN_CODE}
    if bad:
        raise P.PrepareError(f"{path}: occurrence values {sorted(bad)}; expected 0, 1 or {UNKNOWN_CODE} (unknown)")
    labels = np.where(labels == UNKNOWN_CODE, P.UNKNOWN, labels)
    return table[:, 0], labels


def read_intensity(path: Path) -> dict[int, int]:
    table = P.read_int_table(path, header=False, ncols=2)
    bad = set(np.unique(table[:, 1]).tolist()) - set(range(6)) - {UNKNOWN_CODE}
    if bad:
        raise P.PrepareError(f"{path}: intensity values {sorted(bad)}; expected 0-5 or {UNKNOWN_CODE} (unknown)")
    return {int(f): (P.UNKNOWN if v == UNKNOWN_CODE else int(v)) for f, v in table}


def read_landmarks_file(src: Path, seq: str, frames_sorted: list[int]) -> tuple[dict[int, np.ndarray], str]:
    """frame -> 49 x 2 landmarks of a sequence, and the file used ('' when none)."""
    mat = src / "2DFeatures" / f"{seq}.mat"
    txt = src / "2DFeatures" / f"{seq}.txt"
    if txt.exists():
        out = {}
        for i, ln in enumerate(txt.read_text().splitlines(), start=1):
            vals = [v for v in re.split(r"[,\s]+", ln.strip()) if v]
            if not vals:
                continue
            if len(vals) != 99:
                raise P.PrepareError(f"{txt}: line {i} has {len(vals)} values, expected 99 (frame + 49 x/y pairs)")
            out[int(float(vals[0]))] = np.asarray(vals[1:], dtype=np.float32).reshape(49, 2)
        return out, str(txt)
    if not mat.exists():
        return {}, ""
    m = P.loadmat(mat)
    out: dict[int, np.ndarray] = {}
    if "fit" in m:
        fit = m["fit"].ravel()
        names = fit.dtype.names or ()
        if "pred" not in names:
            raise P.PrepareError(f"{mat}: struct 'fit' has no field 'pred' (fields {names})")
        for k, el in enumerate(fit):
            pred = np.asarray(el["pred"], dtype=np.float32)
            if "frame" in names and np.asarray(el["frame"]).size:
                f = int(np.asarray(el["frame"]).ravel()[0])
            elif k < len(frames_sorted):
                f = frames_sorted[k]
            else:
                continue
            if pred.size == 98:
                out[f] = pred.reshape(49, 2)
        return out, str(mat)
    for var in ("pts", "landmarks"):
        if var in m:
            arr = np.asarray(m[var], dtype=np.float32)
            if arr.ndim == 2 and arr.shape[1] == 98:
                arr = arr.reshape(-1, 49, 2)
            if arr.ndim != 3 or arr.shape[1:] != (49, 2):
                raise P.PrepareError(f"{mat}: '{var}' has shape {arr.shape}, expected N x 49 x 2 or N x 98")
            for k, f in enumerate(frames_sorted[: len(arr)]):
                out[f] = arr[k]
            return out, str(mat)
    raise P.PrepareError(f"{mat}: expected a variable 'fit' (field 'pred'), 'pts' or 'landmarks'; has "
                         f"{sorted(k for k in m if not k.startswith('__'))}")


def list_jobs(src: Path, dataset: str, aus: list[int], intensity_aus: list[int], tasks: set[str] | None = None
              ) -> tuple[list[P.Job], list[tuple[str, str]], list[str]]:
    occ_dir = P.require_dir(src / "AUCoding" / "AU_OCC", "occurrence labels AUCoding/AU_OCC/<Subj>_<Task>.csv")
    int_dir = src / "AUCoding" / "AU_INT"
    files = sorted(occ_dir.glob("*.csv"))
    if not files:
        raise P.PrepareError(f"{occ_dir}: no <Subj>_<Task>.csv occurrence files")
    zips = {p.stem: p for p in (src / "2D+3D").glob("*.zip")} if (src / "2D+3D").is_dir() else {}
    jobs, report, seqs = [], [], []
    for path in files:
        m = _SEQ.match(path.stem)
        if not m:
            report.append((str(path), "file name is not <Subj>_<Task>.csv; skipped"))
            continue
        subj, task = m.groups()
        if tasks is not None and task not in tasks:
            continue
        frames, labels = read_occurrence(path, aus)
        images = _frame_sources(src, subj, task, zips)
        if not images:
            report.append((str(src / "2D+3D" / subj / task), f"no frame images for {path.name}: "
                                                              f"{len(frames)} labelled frames not prepared"))
            continue
        inten = {}
        for a in intensity_aus:
            ip = int_dir / f"AU{a:02d}" / f"{subj}_{task}_AU{a:02d}.csv"
            inten[a] = read_intensity(ip) if ip.exists() else {}
        lms, lm_file = read_landmarks_file(src, path.stem, sorted(images))
        lm_expected = src / "2DFeatures" / f"{path.stem}.mat"
        seq_frames = []
        labelled = set()
        for f, lab in zip(frames.tolist(), labels):
            labelled.add(f)
            name = f"{subj}/{task}/{f}"
            if f not in images:
                report.append((name, f"labelled frame has no image in {subj}/{task}"))
                continue
            row = {"dataset": dataset, "subject": subj, "session": task, "frame": int(f)}
            row.update({P.au_name(a): int(v) for a, v in zip(aus, lab)})
            row.update({f"{P.au_name(a)}_int": int(inten[a].get(f, P.UNKNOWN)) for a in intensity_aus})
            fr = P.Frame(row=row, image=images[f], file=images[f], landmarks=lms.get(f))
            if fr.landmarks is None:  # reported here so the line names the landmark file
                report.append((images[f], f"no landmarks for frame {f} in {lm_file}" if lm_file
                               else f"landmark file missing: {lm_expected} (or .txt)"))
                continue
            seq_frames.append(fr)
        uncoded = len(set(images) - labelled)
        if uncoded:
            report.append((f"{subj}/{task}", f"{uncoded} images without an AU occurrence row (not coded); "
                                             "not prepared"))
        seqs.append(path.stem)
        jobs.extend(P.chunked(f"{dataset}/{path.stem}", seq_frames))
    return jobs, report, seqs


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, dataset="bp4d",
            aus=BP4D_AUS, intensity_aus=BP4D_INTENSITY_AUS, tasks=None):
    """Prepare BP4D (12 AUs, intensities of AUs 6/10/12/14/17, 49-point landmarks)."""
    src, out = Path(src), Path(out)
    aus, intensity_aus = [int(a) for a in P.as_list(aus)], [int(a) for a in P.as_list(intensity_aus)]
    tasks = P.as_list(tasks)
    jobs, report, seqs = list_jobs(src, dataset, aus, intensity_aus, set(tasks) if tasks else None)
    names = [P.au_name(a) for a in aus]
    inames = [P.au_name(a) for a in intensity_aus]
    meta = {
        "name": dataset, "aus": names, "intensity_aus": inames, "expressions": [],
        "positive_threshold": 2, "sequences": len(seqs),
        "label_conventions": "occurrence 1/0 from AUCoding/AU_OCC; the dataset's unknown code 9 -> -1; "
                             "intensity 0-5 from AUCoding/AU_INT, 9 -> -1 (also -1 where no intensity file)",
        "landmark_source": "2DFeatures/<Subj>_<Task>.mat (IntraFace 49 points)",
    }
    return P.prepare_jobs(jobs, out, layout=LAYOUT, meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(names, inames), extra_report=report)
