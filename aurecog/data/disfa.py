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

Label frame f (1-based) is video frame f-1 (0-based) and landmark file index f-1. A label file with a frame
number below 1 (numbered from 0) or a frame listed twice stops preparation naming the file; so does an intensity
code that is not an integer 0-5 (never rounded). Video frames after the last labelled one (count from the video
header) and videos without a label folder are reported as images without labels.

Label convention: intensity 0-5 is kept in ``AU<k>_int`` for all 12 AUs (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25,
26); occurrence ``AU<k>`` = 1 where intensity >= ``positive_threshold`` (default 2, the standard DISFA
convention; OpenGraphAU uses 1), else 0. DISFA has no unknown code; a frame missing from one AU's file gets -1 for
that AU. The 8-AU benchmark subset (1, 2, 4, 6, 9, 12, 25, 26) is selected by the dataset config (``labels``).
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from aurecog.data import prepare as P

DISFA_AUS = [1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26]
DISFA_BENCH_AUS = [1, 2, 4, 6, 9, 12, 25, 26]
LAYOUT = "disfa66"
_LABEL = re.compile(r"^(SN\d+)_au(\d+)$", re.IGNORECASE)
OPTION_HELP = {
    "positive_threshold": "occurrence AU<k> = 1 where intensity >= this (OpenGraphAU: 1)",
    "camera": "left or right camera videos",
    "chunk": "frames per work chunk (bounds a worker's memory)",
}


def read_labels(lab_dir: Path, subj: str) -> dict[int, dict[int, int]]:
    """AU -> {frame (1-based): intensity} of one subject; PrepareError naming the file on problems."""
    out: dict[int, dict[int, int]] = {}
    for a in DISFA_AUS:
        path = lab_dir / f"{subj}_au{a}.txt"
        if not path.exists():
            raise P.PrepareError(f"{path}: label file missing (expected one file per AU {DISFA_AUS})")
        table = P.read_int_table(path, header=False, ncols=2)
        low = np.flatnonzero(table[:, 0] < 1)
        if len(low):
            raise P.PrepareError(f"{path}: line {low[0] + 1} has frame {table[low[0], 0]}; DISFA label frames are "
                                 "1-based (frame 1 = the first video frame): fix the numbering of this file")
        frames, counts = np.unique(table[:, 0], return_counts=True)
        if (counts > 1).any():
            raise P.PrepareError(f"{path}: frames {frames[counts > 1][:5].tolist()} are listed more than once")
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


def _frame_count(video: Path) -> int:
    """Frames of a video according to its header (0 when it cannot be opened); for the report only."""
    cap = cv2.VideoCapture(str(video))
    try:
        return max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))) if cap.isOpened() else 0
    finally:
        cap.release()


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
    used_videos = set()
    for subj in subjects:
        labels = read_labels(lab_root / subj, subj)
        frames_1b = sorted(set().union(*[set(v) for v in labels.values()]))
        video = vid_dir / f"{side}Video{subj}_comp.avi"
        if not video.exists():
            cands = sorted(vid_dir.glob(f"*{subj}*.avi"))
            if not cands:
                report.append(P.note(video, f"video missing: the labelled frames of {subj}", "no_image",
                                     len(frames_1b)))
                continue
            video = cands[0]
        used_videos.add(video.name)
        n_video = _frame_count(video)
        if n_video > frames_1b[-1]:
            report.append(P.note(video, f"video frames after the last labelled frame: frames {frames_1b[-1] + 1}-"
                                        f"{n_video} (count from the video header)", "unlabelled",
                                 n_video - frames_1b[-1]))
        gaps = frames_1b[-1] - len(frames_1b)
        if gaps:
            report.append(P.note(video, "video frames in no label file: between the labelled frames", "unlabelled",
                                 gaps))
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
                report.append(P.note(name, f"landmark file missing: {lm_root / subj / 'tmp_frame_lm'}/*{f - 1:04d}"
                                           "_lm.mat", "no_landmarks"))
                continue
            frames.append(P.Frame(row=row, video_index=f - 1, landmark_file=str(lm_file), landmark_reader="disfa_mat",
                                  file=name))
        jobs.append(P.Job(key=f"disfa/{subj}", frames=frames, video=str(video)))  # decoded sequentially
    for video in sorted(vid_dir.glob("*.avi")):
        if video.name not in used_videos:
            report.append(P.note(video, "video without a label folder: not prepared", "unlabelled",
                                 _frame_count(video)))
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
