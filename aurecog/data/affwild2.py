"""Aff-Wild2 reader (ABAW AU Detection Challenge annotations).

Expected layout under ``--src``::

    annotations/AU_Detection_Challenge/Train_Set/<video>.txt        header line, then line j = frame j (1-based):
    annotations/AU_Detection_Challenge/Validation_Set/<video>.txt   12 comma-separated ints AU1, AU2, AU4, AU6, AU7,
                                                                    AU10, AU12, AU15, AU23, AU24, AU25, AU26
    cropped_aligned/<video>/00001.jpg                               frame j = ``{j:05d}.jpg`` (``cropped/`` also
                                                                    accepted, option ``frames``)

Label convention: 1 present, 0 absent, **-1 = not annotated** -> unknown (masked). A frame whose 12 values are all
-1 carries no label and is reported ("not annotated"), as is a labelled frame without an image (ABAW leaves out
frames where its face detector failed). The official split is kept in the ``split`` column
(``train``/``validation``); the test set's labels are hidden and not prepared.

Landmarks: Aff-Wild2 ships none for the AU track; the optional dlib detector is used (``pip install dlib-bin
face-recognition-models``), or pass ``landmarks_dir`` holding ``<video>/<frame:05d>.txt`` (or ``.pts``) iBUG-68
files from any other landmark tool. Subjects are the video names (``_left``/``_right`` videos are different people).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aurecog.data import prepare as P

AFFWILD2_AUS = [1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26]
SPLITS = {"Train_Set": "train", "Validation_Set": "validation"}


def read_annotation(path: Path) -> np.ndarray:
    table = P.read_int_table(path, header=True, ncols=len(AFFWILD2_AUS))
    bad = set(np.unique(table).tolist()) - {0, 1, -1}
    if bad:
        raise P.PrepareError(f"{path}: values {sorted(bad)}; expected 0, 1 or -1 (not annotated)")
    return table


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, frames="cropped_aligned",
            landmarks_dir=None, chunk=500):
    """Prepare Aff-Wild2's AU track (official Train_Set / Validation_Set)."""
    src, out, chunk = Path(src), Path(out), int(chunk)
    ann_root = P.require_dir(src / "annotations" / "AU_Detection_Challenge",
                             "annotations/AU_Detection_Challenge/{Train_Set,Validation_Set}/<video>.txt")
    img_root = P.require_dir(src / frames, f"{frames}/<video>/00001.jpg frames")
    jobs, report = [], []
    found = False
    for folder, split in SPLITS.items():
        d = ann_root / folder
        if not d.is_dir():
            report.append((str(d), f"split folder missing: no {split} videos prepared"))
            continue
        for path in sorted(d.glob("*.txt")):
            found = True
            video = path.stem
            table = read_annotation(path)
            vdir = img_root / video
            frs = []
            for j, lab in enumerate(table, start=1):
                img = vdir / f"{j:05d}.jpg"
                if (lab == -1).all():
                    report.append((str(img), "not annotated (all AUs -1)"))
                    continue
                row = {"dataset": "affwild2", "subject": video, "session": video, "frame": j, "split": split}
                row.update({f"AU{a}": int(v) for a, v in zip(AFFWILD2_AUS, lab)})
                fr = P.Frame(row=row, image=str(img), file=str(img))
                if landmarks_dir is not None:
                    base = Path(landmarks_dir) / video / f"{j:05d}"
                    lp = base.with_suffix(".pts") if base.with_suffix(".pts").exists() else base.with_suffix(".txt")
                    fr.landmark_file, fr.landmark_reader = str(lp), "text"
                frs.append(fr)
            jobs.extend(P.chunked(f"affwild2/{split}/{video}", frs, size=chunk, detector=landmarks_dir is None))
    if not found:
        raise P.PrepareError(f"{ann_root}: no <video>.txt annotation files in Train_Set/ or Validation_Set/")
    names = [f"AU{a}" for a in AFFWILD2_AUS]
    meta = {
        "name": "affwild2", "aus": names, "intensity_aus": [], "expressions": [], "positive_threshold": 1,
        "label_conventions": "ABAW AU annotations: 1/0; -1 = not annotated -> unknown; frames with all 12 AUs -1 "
                             "are reported, not prepared; split column = official train/validation",
        "landmark_source": "landmarks_dir (iBUG-68 text)" if landmarks_dir else "dlib detector (iBUG-68)",
    }
    return P.prepare_jobs(jobs, out, layout="ibug68", meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(names), extra_report=report)
