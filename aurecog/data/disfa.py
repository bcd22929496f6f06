"""DISFA reader.

Expected layout under ``--src`` (the distribution as shipped)::

    Videos_LeftCamera/LeftVideoSN001_comp.avi           left camera (the literature default; ``camera="right"``
    Videos_RightCamera/RightVideoSN001_comp.avi         reads the right one)
    ActionUnit_Labels/SN001/SN001_au1.txt ... _au26.txt one file per AU, lines "frame,intensity", frame 1-based,
                                                        intensity 0-5
    Landmark_Points/SN001/tmp_frame_lm/SN001_0000_lm.mat  66 points, variable ``pts`` (66 x 2), one file per frame,
                                                        0-based frame index = the last number in the name
                                                        (``l0XXXX_lm.mat`` names occur too and are accepted)

Text alternative for landmarks: ``*_lm.txt`` next to / instead of the .mat (66 lines ``x y``).

Label frame f (1-based) is video frame f-1 (0-based) and landmark file index f-1.

Label convention: intensity 0-5 is kept in ``AU<k>_int`` for all 12 AUs (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25,
26); occurrence ``AU<k>`` = 1 where intensity >= ``positive_threshold`` (default 2, the standard DISFA
convention; OpenGraphAU uses 1), else 0. DISFA has no unknown code; a frame missing from one AU's file gets -1 for
that AU. The 8-AU benchmark subset (1, 2, 4, 6, 9, 12, 25, 26) is selected by the dataset config (``labels``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from aurecog.data import prepare as P

DISFA_AUS = [1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26]
DISFA_BENCH_AUS = [1, 2, 4, 6, 9, 12, 25, 26]
LAYOUT = "disfa66"
_LABEL = re.compile(r"^(SN\d+)_au(\d+)$", re.IGNORECASE)


def read_labels(lab_dir: Path, subj: str) -> dict[int, dict[int, int]]:
    """AU -> {frame (1-based): intensity} of one subject; PrepareError naming the file on problems."""
    out: dict[int, dict[int, int]] = {}
    for a in DISFA_AUS:
        path = lab_dir / f"{subj}_au{a}.txt"
        if not path.exists():
            raise P.PrepareError(f"{path}: label file missing (expected one file per AU {DISFA_AUS})")
        table = P.read_int_table(path, header=False, ncols=2)
        bad = set(np.unique(table[:, 1]).tolist()) - set(range(6))
        if bad:
            raise P.PrepareError(f"{path}: intensities {sorted(bad)}; expected 0-5")
        out[a] = {int(f): int(v) for f, v in table}
    return out


def landmark_files(folder: Path) -> dict[int, Path]:
    """0-based frame index -> landmark file (.mat preferred, .txt alternative)."""
    out: dict[int, Path] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in (".mat", ".txt"):
            continue
        m = re.search(r"(\d+)_lm$", p.stem)
        if not m:
            continue
        i = int(m.group(1))
        if i not in out or p.suffix.lower() == ".mat":
            out[i] = p
    return out


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, positive_threshold=2,
            camera="left", chunk=500):
    """Prepare DISFA (12 AUs with intensities, occurrence at intensity >= ``positive_threshold``)."""
    src, out = Path(src), Path(out)
    if camera not in ("left", "right"):
        raise P.PrepareError(f"camera must be 'left' or 'right', got {camera!r}")
    side = {"left": "Left", "right": "Right"}[camera]
    chunk = int(chunk)
    vid_dir = P.require_dir(src / f"Videos_{side}Camera", f"{side}VideoSNxxx_comp.avi videos")
    lab_root = P.require_dir(src / "ActionUnit_Labels", "ActionUnit_Labels/SNxxx/SNxxx_au<k>.txt")
    lm_root = src / "Landmark_Points"
    subjects = sorted(p.name for p in lab_root.iterdir() if p.is_dir() and re.fullmatch(r"SN\d+", p.name))
    if not subjects:
        raise P.PrepareError(f"{lab_root}: no SNxxx subject folders")
    thr = int(positive_threshold)
    jobs, report = [], []
    for subj in subjects:
        video = vid_dir / f"{side}Video{subj}_comp.avi"
        if not video.exists():
            cands = sorted(vid_dir.glob(f"*{subj}*.avi"))
            if not cands:
                report.append((str(video), f"video missing: all labelled frames of {subj} not prepared"))
                continue
            video = cands[0]
        labels = read_labels(lab_root / subj, subj)
        frames_1b = sorted(set().union(*[set(v) for v in labels.values()]))
        lms = landmark_files(lm_root / subj / "tmp_frame_lm")
        frames = []
        for f in frames_1b:
            row = {"dataset": "disfa", "subject": subj, "session": camera, "frame": f}
            for a in DISFA_AUS:
                v = labels[a].get(f)
                row[f"AU{a}_int"] = P.UNKNOWN if v is None else v
                row[f"AU{a}"] = P.UNKNOWN if v is None else int(v >= thr)
            name = f"{video}#frame{f - 1}"
            lm_file = lms.get(f - 1)
            if lm_file is None:
                report.append((name, f"landmark file missing: {lm_root / subj / 'tmp_frame_lm'}/*{f - 1:04d}_lm.mat"))
                continue
            frames.append(P.Frame(row=row, video_index=f - 1, landmark_file=str(lm_file), landmark_reader="disfa_mat",
                                  file=name))
        jobs.append(P.Job(key=f"disfa/{subj}", frames=frames, video=str(video)))  # decoded sequentially
    names = [f"AU{a}" for a in DISFA_AUS]
    meta = {
        "name": "disfa", "aus": names, "intensity_aus": names, "expressions": [], "positive_threshold": thr,
        "camera": camera, "benchmark_aus": [f"AU{a}" for a in DISFA_BENCH_AUS],
        "label_conventions": f"intensity 0-5 kept in AU<k>_int; AU<k> = 1 where intensity >= {thr} else 0; "
                             "-1 where a frame is missing from an AU's label file",
        "landmark_source": "Landmark_Points/SNxxx/tmp_frame_lm/*_lm.mat (66 points, variable pts)",
    }
    return P.prepare_jobs(jobs, out, layout=LAYOUT, meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(names, names), extra_report=report,
                          part_size=chunk)
