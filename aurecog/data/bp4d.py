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

AU_OCC header: the first column is the frame number whatever its name; every other column is read by the AU
number in its name (``12``, ``AU12``, ``AU_12``); a header naming an AU twice stops preparation. Option
``header=position`` reads the columns by position instead (BP4D: column k = AU k; BP4D+: the 34 coded AUs in
:data:`aurecog.data.bp4dplus.BP4DPLUS_CODED_AUS` order).

Label convention: occurrence 1 = present, 0 = absent, **9 = unknown -> -1** (masked); intensity 0-5, 9 -> -1; a
code that is not an integer stops preparation naming the file and line (never rounded). Only frames with an
occurrence row and an image are prepared; labelled frames without image or landmarks are listed in
``report.csv``; images without an occurrence row and sequences (folders or zip members) without an occurrence
file are reported as images without labels (one line per sequence, with its frame count).
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
_SUBJ, _TASK = re.compile(r"^[A-Za-z]+\d+$"), re.compile(r"^T\d+$")
IMAGE_BASES = ("2D+3D", "Sequences", "images", ".")
HEADER_MODES = ("names", "position")
OPTION_HELP = {
    "aus": "occurrence AUs to prepare (comma-separated numbers)",
    "intensity_aus": "AUs whose AU_INT intensity files are read",
    "tasks": "tasks to prepare (default: every task with an AU_OCC file)",
    "header": "names: AU_OCC columns read by the AU number in the header; position: by column position",
}


def image_inventory(src: Path) -> dict[tuple[str, str], dict[int, str]]:
    """(subject, task) -> {frame number: image path or ``zip::member``} of every sequence under ``src``: folders
    ``<base>/<Subj>/<Task>/`` for the bases :data:`IMAGE_BASES` (the first base holding a sequence wins), then the
    members ``<Subj>/<Task>/*.jpg`` of ``2D+3D/<Subj>.zip`` for sequences no folder holds."""
    inv: dict[tuple[str, str], dict[int, str]] = {}
    for base in IMAGE_BASES:
        root = src / base
        if not root.is_dir():
            continue
        for sdir in sorted(p for p in root.iterdir() if p.is_dir() and _SUBJ.match(p.name)):
            for tdir in sorted(p for p in sdir.iterdir() if p.is_dir() and _TASK.match(p.name)):
                if (sdir.name, tdir.name) in inv:
                    continue
                frames = {f: str(p) for p in P.list_images(tdir) if (f := P.frame_number(p.name)) is not None}
                if frames:
                    inv[(sdir.name, tdir.name)] = frames
    zdir = src / "2D+3D"
    for zpath in sorted(zdir.glob("*.zip")) if zdir.is_dir() else []:
        try:
            with zipfile.ZipFile(zpath) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile) as e:
            raise P.PrepareError(f"{zpath}: unreadable zip archive ({e}); re-copy it from the distribution") from e
        found: dict[str, dict[int, str]] = {}
        for name in names:
            parts = Path(name).parts
            if len(parts) >= 2 and _TASK.match(parts[-2]) and Path(name).suffix.lower() in P.IMAGE_EXTS:
                f = P.frame_number(name)
                if f is not None:
                    found.setdefault(parts[-2], {})[f] = f"{zpath}::{name}"
        for task, frames in found.items():
            inv.setdefault((zpath.stem, task), frames)
    return inv


def _where(images: dict[int, str]) -> str:
    """The folder (or ``zip::folder/``) holding a sequence's images, for report lines."""
    first = next(iter(images.values()))
    return first.rsplit("/", 1)[0] + "/"


def _header_aus(path: Path, header: list[str], coded: list[int] | None, mode: str) -> list[int | None]:
    """The AU of each AU_OCC column after the frame column (None: not an AU column)."""
    if mode not in HEADER_MODES:
        raise P.PrepareError(f"header={mode!r}; expected one of {', '.join(HEADER_MODES)}")
    if mode == "position":
        if coded is None:
            return list(range(1, len(header)))
        if len(header) != 1 + len(coded):
            raise P.PrepareError(f"{path}: {len(header)} columns; header=position expects the frame column and the "
                                 f"{len(coded)} coded AUs {coded}")
        return list(coded)
    cols: list[int | None] = []
    for h in header[1:]:
        digits = re.findall(r"\d+", h)
        cols.append(int(digits[-1]) if digits else None)  # "12", "AU12", "AU_12" name AU 12
    named = [c for c in cols if c is not None]
    dup = sorted({c for c in named if named.count(c) > 1})
    if dup:
        raise P.PrepareError(f"{path}: header names AUs {dup} more than once; fix the header")
    if coded is not None and (sorted(named) != sorted(coded) or len(named) != len(cols)):
        raise P.PrepareError(
            f"{path}: header names AUs {named} but this dataset codes the {len(coded)} AUs {coded} (after the frame "
            "column); if the columns are in that order but numbered by position, pass "
            "--option header=position, else fix the header")
    return cols


def read_occurrence(path: Path, aus: list[int], coded: list[int] | None = None, header: str = "names"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(frames, labels N x len(aus) in {0,1,-1}) from an AU_OCC csv; PrepareError naming the file on problems.

    ``coded``: the AUs the dataset codes in column order (BP4D+), whose header must name exactly them (or
    ``header="position"``); None (BP4D): any header naming the ``aus``."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise P.PrepareError(f"{path}: empty occurrence file")
    names = [h.strip().strip('"') for h in lines[0].split(",")]
    cols = [0] + _header_aus(path, names, coded, header)  # the first column is the frame number ("0" in BP4D)
    missing = [a for a in aus if a not in cols[1:]]
    if missing:
        raise P.PrepareError(f"{path}: header lacks AU columns {missing} (has {len(cols)} columns: "
                             f"{names[:8]}...)")
    table = P.read_int_table(path, header=True, ncols=len(cols))
    dup = sorted({int(f) for f in table[:, 0] if (table[:, 0] == f).sum() > 1})
    if dup:
        raise P.PrepareError(f"{path}: frames {dup[:5]} have more than one row; fix the file")
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
            try:
                f = P.parse_int(vals[0])
            except ValueError as e:
                raise P.PrepareError(f"{txt}: line {i}: frame {vals[0]!r} is not an integer") from e
            out[f] = np.asarray(vals[1:], dtype=np.float32).reshape(49, 2)
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


def _count_rows(path: Path) -> int:
    try:
        return max(0, sum(1 for ln in path.read_text().splitlines() if ln.strip()) - 1)
    except OSError:
        return 0


def list_jobs(src: Path, dataset: str, aus: list[int], intensity_aus: list[int], tasks: set[str] | None = None,
              coded: list[int] | None = None, header: str = "names", subject_prefix: str = ""
              ) -> tuple[list[P.Job], list[tuple], list[str]]:
    """Jobs (one per sequence chunk), report lines and the prepared sequence names. ``subject_prefix`` is put
    before each subject id in the index (BP4D+: ``bp4dplus_``)."""
    occ_dir = P.require_dir(src / "AUCoding" / "AU_OCC", "occurrence labels AUCoding/AU_OCC/<Subj>_<Task>.csv")
    int_dir = src / "AUCoding" / "AU_INT"
    files = sorted(occ_dir.glob("*.csv"))
    if not files:
        raise P.PrepareError(f"{occ_dir}: no <Subj>_<Task>.csv occurrence files")
    inventory = image_inventory(src)
    jobs, report, seqs = [], [], []
    labelled_seqs: set[tuple[str, str]] = set()
    only = f"only tasks {','.join(sorted(tasks))} are prepared (option tasks)" if tasks is not None else ""
    for path in files:
        m = _SEQ.match(path.stem)
        if not m:
            report.append(P.note(path, "occurrence file name is not <Subj>_<Task>.csv: not read", "excluded",
                                 _count_rows(path)))
            continue
        subj, task = m.groups()
        labelled_seqs.add((subj, task))
        if tasks is not None and task not in tasks:
            report.append(P.note(path, f"task not prepared: {only}", "excluded", _count_rows(path)))
            continue
        frames, labels = read_occurrence(path, aus, coded, header)
        images = inventory.get((subj, task), {})
        if not images:
            report.append(P.note(src / "2D+3D" / subj / task,
                                 f"labelled sequence has no frame images: the labelled frames of {path.name}",
                                 "no_image", len(frames)))
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
                report.append(P.note(name, f"labelled frame has no image: in {_where(images)}", "no_image"))
                continue
            row = {"dataset": dataset, "subject": subject_prefix + subj, "session": task, "frame": int(f)}
            row.update({P.au_name(a): int(v) for a, v in zip(aus, lab)})
            row.update({f"{P.au_name(a)}_int": int(inten[a].get(f, P.UNKNOWN)) for a in intensity_aus})
            fr = P.Frame(row=row, image=images[f], file=images[f], landmarks=lms.get(f))
            if fr.landmarks is None:  # reported here so the line names the landmark file
                report.append(P.note(images[f], f"no landmarks for this frame in the landmark file: {lm_file}"
                                     if lm_file else f"landmark file missing: {lm_expected} (or .txt)",
                                     "no_landmarks"))
                continue
            seq_frames.append(fr)
        uncoded = len(set(images) - labelled)
        if uncoded:
            report.append(P.note(f"{subj}/{task}", "images without an AU occurrence row (not coded): not prepared",
                                 "unlabelled", uncoded))
        seqs.append(path.stem)
        jobs.extend(P.chunked(f"{dataset}/{path.stem}", seq_frames))
    for (subj, task), images in sorted(inventory.items()):
        if (subj, task) in labelled_seqs:
            continue
        if tasks is not None and task not in tasks:
            report.append(P.note(_where(images), f"task not AU-coded: {only}", "unlabelled", len(images)))
        else:
            report.append(P.note(_where(images), f"sequence has no AU occurrence file: {occ_dir / subj}_{task}.csv "
                                                 "not found; its images are not prepared", "unlabelled", len(images)))
    return jobs, report, seqs


def prepare_layout(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, dataset: str,
                   aus, intensity_aus, tasks, header: str = "names", coded: list[int] | None = None,
                   subject_prefix: str = ""):
    """The BP4D layout reader behind :func:`prepare` and :func:`aurecog.data.bp4dplus.prepare`."""
    src, out = Path(src), Path(out)
    aus, intensity_aus = [int(a) for a in P.as_list(aus)], [int(a) for a in P.as_list(intensity_aus)]
    tasks = P.as_list(tasks)
    jobs, report, seqs = list_jobs(src, dataset, aus, intensity_aus, set(tasks) if tasks else None, coded=coded,
                                   header=str(header), subject_prefix=subject_prefix)
    names = [P.au_name(a) for a in aus]
    inames = [P.au_name(a) for a in intensity_aus]
    meta = {
        "name": dataset, "aus": names, "intensity_aus": inames, "expressions": [],
        "positive_threshold": 2, "sequences": len(seqs), "occurrence_header": str(header),
        "label_conventions": "occurrence 1/0 from AUCoding/AU_OCC; the dataset's unknown code 9 -> -1; "
                             "intensity 0-5 from AUCoding/AU_INT, 9 -> -1 (also -1 where no intensity file)",
        "landmark_source": "2DFeatures/<Subj>_<Task>.mat (IntraFace 49 points)",
    }
    if subject_prefix:
        meta["subject_prefix"] = subject_prefix
    return P.prepare_jobs(jobs, out, layout=LAYOUT, meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(names, inames), extra_report=report)


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, aus=BP4D_AUS,
            intensity_aus=BP4D_INTENSITY_AUS, tasks=None, header="names"):
    """Prepare BP4D (12 AUs, intensities of AUs 6/10/12/14/17, 49-point landmarks)."""
    return prepare_layout(src, out, workers=workers, image_size=image_size, progress=progress, dataset="bp4d",
                          aus=aus, intensity_aus=intensity_aus, tasks=tasks, header=header)
