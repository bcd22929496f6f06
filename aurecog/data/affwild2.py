"""Aff-Wild2 reader (ABAW AU Detection Challenge annotations).

Expected layout under ``--src``::

    annotations/AU_Detection_Challenge/Train_Set/<video>.txt        header line, then line j = frame j (1-based):
    annotations/AU_Detection_Challenge/Validation_Set/<video>.txt   12 comma-separated ints AU1, AU2, AU4, AU6, AU7,
                                                                    AU10, AU12, AU15, AU23, AU24, AU25, AU26
    cropped_aligned/<video>/00001.jpg                               frame j = ``{j:05d}.jpg`` (``cropped/`` also
                                                                    accepted, option ``frames``)

Line 1 must be the header naming the 12 AUs in this order (``AU1,AU2,...,AU26``); a file whose line 1 is
anything else (a label row: the header was lost) stops preparation naming the file, since reading it would give
frame j the labels of frame j+1.

Label convention: 1 present, 0 absent, **-1 = not annotated** -> unknown (masked). A frame whose 12 values are all
-1 carries no label and is reported ("not annotated"), as is a labelled frame without an image (ABAW leaves out
frames where its face detector failed); frame images after the last annotation line and videos of ``frames``
without an annotation file (the test set) are reported as images without labels. The official split is kept in
the ``split`` column (``train``/``validation``); the test set's labels are hidden and not prepared. A split folder
of ``splits`` that is missing or holds no annotation file stops preparation (``splits=Validation_Set`` prepares
the validation videos alone).

Landmarks: Aff-Wild2 ships none for the AU track; the optional dlib detector is used (``pip install dlib-bin
face-recognition-models``), or pass ``landmarks_dir`` holding ``<video>/<frame:05d>.txt`` (or ``.pts``) iBUG-68
files from any other landmark tool. Subjects are the video names (``_left``/``_right`` videos are different people).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from aurecog.data import prepare as P

AFFWILD2_AUS = [1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26]
SPLITS = {"Train_Set": "train", "Validation_Set": "validation"}
HEADER = [f"AU{a}" for a in AFFWILD2_AUS]
OPTION_HELP = {
    "frames": "folder of the frame images: cropped_aligned or cropped",
    "landmarks_dir": "iBUG-68 text/.pts files <video>/<frame:05d>.txt instead of the dlib detector",
    "splits": "annotation split folders to prepare (Train_Set, Validation_Set)",
    "chunk": "frames per work chunk (bounds a worker's memory)",
}


def read_annotation(path: Path) -> np.ndarray:
    """The label rows of an annotation file (row j-1 = frame j), after checking that line 1 is the header."""
    try:
        with open(path) as fh:
            first = fh.readline()
    except OSError as e:
        raise P.PrepareError(f"{path}: cannot read ({e})") from e
    names = [h.strip().upper() for h in first.strip().split(",")]
    if names != HEADER:
        raise P.PrepareError(f"{path}: line 1 is {first.strip()[:60]!r}, not the header {','.join(HEADER)}; "
                             "restore the file's header line (without it every frame would get the next frame's "
                             "labels)")
    table = P.read_int_table(path, header=True, ncols=len(AFFWILD2_AUS))
    bad = set(np.unique(table).tolist()) - {0, 1, -1}
    if bad:
        raise P.PrepareError(f"{path}: values {sorted(bad)}; expected 0, 1 or -1 (not annotated)")
    return table


def _images(vdir: Path) -> dict[int, str]:
    """frame number -> image name of a video folder (names whose stem is a number)."""
    if not vdir.is_dir():
        return {}
    out = {}
    with os.scandir(vdir) as it:
        for e in it:
            stem, ext = os.path.splitext(e.name)
            if ext.lower() in P.IMAGE_EXTS and stem.isdigit():
                out[int(stem)] = e.name
    return out


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, frames="cropped_aligned",
            landmarks_dir=None, splits=tuple(SPLITS), chunk=500):
    """Prepare Aff-Wild2's AU track (official Train_Set / Validation_Set)."""
    src, out, chunk = Path(src), Path(out), int(chunk)
    splits = P.as_list(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise P.PrepareError(f"splits={','.join(splits)}: expected one or more of {', '.join(SPLITS)}")
    ann_root = P.require_dir(src / "annotations" / "AU_Detection_Challenge",
                             "annotations/AU_Detection_Challenge/{Train_Set,Validation_Set}/<video>.txt")
    img_root = P.require_dir(src / frames, f"{frames}/<video>/00001.jpg frames")
    jobs, report = [], []
    annotated = set()
    for folder in splits:
        split, d = SPLITS[folder], ann_root / folder
        paths = sorted(d.glob("*.txt")) if d.is_dir() else []
        if not paths:
            others = [s for s in splits if s != folder]
            raise P.PrepareError(
                f"{d}: {'folder not found' if not d.is_dir() else 'no <video>.txt annotation files'} (the {split} "
                f"split); extract the annotations there, or prepare the other splits only with --option "
                f"splits={','.join(others) if others else 'Validation_Set'}")
        for path in paths:
            video = path.stem
            annotated.add(video)
            table = read_annotation(path)
            vdir = img_root / video
            frs = []
            for j, lab in enumerate(table, start=1):
                img = vdir / f"{j:05d}.jpg"
                if (lab == -1).all():
                    report.append(P.note(img, "not annotated (all AUs -1)", "unlabelled"))
                    continue
                row = {"dataset": "affwild2", "subject": video, "session": video, "frame": j, "split": split}
                row.update({f"AU{a}": int(v) for a, v in zip(AFFWILD2_AUS, lab)})
                fr = P.Frame(row=row, image=str(img), file=str(img))
                if landmarks_dir is not None:
                    base = Path(landmarks_dir) / video / f"{j:05d}"
                    lp = base.with_suffix(".pts") if base.with_suffix(".pts").exists() else base.with_suffix(".txt")
                    fr.landmark_file, fr.landmark_reader = str(lp), "text"
                frs.append(fr)
            extra = sum(1 for f in _images(vdir) if f > len(table))
            if extra:
                report.append(P.note(vdir, "frame images after the last annotation line: not labelled", "unlabelled",
                                     extra))
            jobs.extend(P.chunked(f"affwild2/{split}/{video}", frs, size=chunk, detector=landmarks_dir is None))
    for vdir in sorted(p for p in img_root.iterdir() if p.is_dir() and p.name not in annotated):
        n = len(_images(vdir))
        if n:
            report.append(P.note(vdir, f"video without an annotation file in {', '.join(splits)}: not prepared "
                                       "(test set, or another track)", "unlabelled", n))
    names = [f"AU{a}" for a in AFFWILD2_AUS]
    meta = {
        "name": "affwild2", "aus": names, "intensity_aus": [], "expressions": [], "positive_threshold": 1,
        "label_conventions": "ABAW AU annotations: 1/0; -1 = not annotated -> unknown; frames with all 12 AUs -1 "
                             "are reported, not prepared; split column = official train/validation",
        "landmark_source": "landmarks_dir (iBUG-68 text)" if landmarks_dir else "dlib detector (iBUG-68)",
        "splits": list(splits),
    }
    return P.prepare_jobs(jobs, out, layout="ibug68", meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(names), extra_report=report)
