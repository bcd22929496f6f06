"""The preparation report: ``<out>/report.csv`` lines and the printed summary (see :mod:`aurecog.data.prepare`).

Each line is ``file, reason, kind, frames``: the file, folder or frame it is about; a reason ``"<fixed phrase>"``
or ``"<fixed phrase>: <details>"`` (the summary groups on the phrase, so the phrase carries no file name or
number); a kind from :data:`REPORT_KINDS`; the number of frames the line stands for (a sequence without a label
file is one line for all its images). "Frames found" = prepared + the frames of every kind that counts as found
but not prepared.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

#: What a report line stands for -> (summary label, whether its frames count as found but not prepared).
#: ``no_image`` and ``unlabelled`` are always printed (labelled frames without images, images without labels).
REPORT_KINDS = {
    "no_image": ("labelled frames without an image", True),
    "unlabelled": ("images without labels", True),
    "unreadable": ("labelled frames whose image or video frame cannot be decoded", True),
    "no_landmarks": ("labelled frames without usable landmarks (or no face found)", True),
    "excluded": ("labelled frames outside the prepared label set", True),
    "info": ("notes on prepared frames (some labels unknown)", False),
}
REPORT_COLUMNS = ("file", "reason", "kind", "frames")


def note(file, reason: str, kind: str, frames: int = 1) -> tuple[str, str, str, int]:
    """A report line: ``file`` (the file, folder or frame it is about), ``reason`` (``"<fixed phrase>"`` or
    ``"<fixed phrase>: <details>"``; the summary groups on the phrase), ``kind`` (a key of
    :data:`REPORT_KINDS`) and the number of ``frames`` it stands for."""
    if kind not in REPORT_KINDS:
        raise ValueError(f"report kind {kind!r} not in {sorted(REPORT_KINDS)}")
    return str(file), str(reason), kind, int(frames)


def reason_kind(reason: str) -> str:
    """The fixed phrase of a report reason (the text before the first ``": "``), for the summary counts."""
    return str(reason).split(": ")[0].strip()


def report_counts(prepared: int, report) -> dict[str, int]:
    """``found`` (prepared + every reported frame not prepared), ``prepared`` and the frames of each kind."""
    counts = {"found": int(prepared), "prepared": int(prepared)}
    counts.update({k: 0 for k in REPORT_KINDS})
    for _file, _reason, kind, frames in report:
        counts[kind] += int(frames)
        if REPORT_KINDS[kind][1]:
            counts["found"] += int(frames)
    return counts


def write_report(path: Path, report):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        w.writerows(report)


def summary(name, out, counts: dict[str, int], report) -> str:
    """The printed summary: frames found and prepared, the frames of each report kind (labelled frames without
    an image and images without labels always), then frames and lines per reason."""
    lines = [f"[prepare] {name}: {counts['found']} frames found, {counts['prepared']} prepared into {out}"]
    for kind, (label, _) in REPORT_KINDS.items():
        if counts[kind] or kind in ("no_image", "unlabelled"):
            lines.append(f"[prepare] {counts[kind]:8d}  {label}")
    if report:
        frames, nlines = Counter(), Counter()
        for _file, reason, _kind, k in report:
            frames[reason_kind(reason)] += k
            nlines[reason_kind(reason)] += 1
        lines.append(f"[prepare] {len(report)} lines in {out / 'report.csv'}, by reason (frames, lines):")
        lines += [f"    {frames[r]:8d} {c:6d}  {r}" for r, c in nlines.most_common()]
    else:
        lines.append("[prepare] nothing reported: every frame found was prepared")
    return "\n".join(lines)
