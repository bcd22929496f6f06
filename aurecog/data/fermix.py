"""CK+, MMI and Oulu-CASIA readers and their 6-emotion mix (IERN's "MixBasic", notes 2.5/2.6).

Expected layout under ``--src`` (each part may instead be given by the options ``ckplus=``, ``mmi=``, ``oulu=``)::

    CK+/cohn-kanade-images/S005/001/S005_001_00000011.png
    CK+/Landmarks/S005/001/S005_001_00000011_landmarks.txt      68 lines "x y" (iBUG 68)
    CK+/Emotion/S005/001/S005_001_00000011_emotion.txt          one float code (327 of 593 sequences have one)
    CK+/FACS/S005/001/S005_001_00000011_facs.txt                lines "AU intensity" for the peak frame
    MMI/Sessions/<id>/<name>.avi                                 the session video
    MMI/Sessions/<id>/<name>.xml                                 metadata: <Metatag Name="Emotion" Value="1..6"/>
    MMI/Sessions/<id>/session.xml                                <subject id="N"/> -> subject "S00N"
                                                                 (else from the clip name S00N-...)
    Oulu-CASIA/OriginalImg/VL/Strong/P001/Anger/000.jpeg        label = the emotion folder name

(``CKPlus``/``ckplus``, ``mmi``, ``OuluCASIA``/``oulu`` folder names are accepted too.)

Frame selection and labels (as IERN's preprocessing, notes 2.5):

* CK+: the last 3 frames of every sequence with an emotion file. Codes: 0 neutral, 1 anger, 2 contempt, 3 disgust,
  4 fear, 5 happy, 6 sadness, 7 surprise. **Contempt (2) is dropped** for the 6-class mix (reported, as are
  sequences without an emotion file and neutral codes). AU labels come from the FACS file of the peak (last) frame:
  a listed AU is present (1) whatever its intensity code (0 = unspecified in CK+), an unlisted AU of the AU set
  absent (0); the two frames before the peak have unknown (-1) AUs. Landmarks: the shipped 68-point files.
* MMI: the middle 3 frames (n/2-1, n/2, n/2+1) of every session video with an emotion label; codes 1 anger,
  2 disgust, 3 fear, 4 happiness, 5 sadness, 6 surprise, from the metadata xml. AUs unknown (-1). Landmarks from
  the optional dlib detector. Not reproduced: IERN's per-subject crops/rotations of some MMI subjects (the detector
  finds the face in the full frame instead). The subject comes from ``session.xml`` (``<subject id>``), the
  metadata's ``Subject`` metatag and the clip name (``S001-001.avi``: subject S001); where several are present
  they must agree, and a session with none stops preparation (a session-per-subject fallback would break the
  subject-exclusive folds).
* Oulu-CASIA: visible light (VL), strong illumination, the last 3 frames of every sequence; label from the emotion
  folder name. AUs unknown (-1). Landmarks from the detector.

Codes (CK+ emotion and FACS files, MMI metatags) must be integers (``3.0000000e+00`` is; ``2.4`` stops
preparation naming the file: never rounded). A labelled CK+ sequence (``Emotion/``) whose image folder is missing
or empty is reported (``no_image``, counted as the 3 frames the rule would take). Report counts for sequences are
in frames the selection rule picks (at most 3 per sequence).

Subjects are written as ``<dataset>_<id>`` (``ckplus_S005``, ``mmi_S001``, ``oulu_P001``): the datasets' own
ids overlap. The ``dataset`` index column is ``ckplus``/``mmi``/``oulu`` (the mix's confounder and the
``group_column`` of the ``heldout_cells`` protocols); expressions are anger, disgust, fear, happiness, sadness,
surprise.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2

from aurecog.data import prepare as P

EXPRESSIONS = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
CK_CODES = {0: "neutral", 1: "anger", 2: "contempt", 3: "disgust", 4: "fear", 5: "happiness", 6: "sadness",
            7: "surprise"}
MMI_CODES = {1: "anger", 2: "disgust", 3: "fear", 4: "happiness", 5: "sadness", 6: "surprise"}
OULU_FOLDERS = {"anger": "anger", "disgust": "disgust", "fear": "fear", "happiness": "happiness", "happy": "happiness",
                "sadness": "sadness", "sad": "sadness", "surprise": "surprise"}
CK_AUS = [1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26, 27]
N_FRAMES = 3
_MMI_CLIP = re.compile(r"^S(\d+)[-_]", re.IGNORECASE)
OPTION_HELP = {
    "ckplus": "CK+ root (default: <src>/CK+ or CKPlus, ckplus, CK)",
    "mmi": "MMI root (default: <src>/MMI or mmi, MMI-Facial-Expression)",
    "oulu": "Oulu-CASIA root (default: <src>/Oulu-CASIA or OuluCASIA, oulu, Oulu_CASIA)",
    "parts": "datasets of the mix to prepare",
}
PART_FOLDERS = {"ckplus": ("CK+", "CKPlus", "ckplus", "CK"), "mmi": ("MMI", "mmi", "MMI-Facial-Expression"),
                "oulu": ("Oulu-CASIA", "OuluCASIA", "oulu", "Oulu_CASIA")}


def _unknown_aus() -> dict:
    return {f"AU{a}": P.UNKNOWN for a in CK_AUS}


def _row(dataset, subject, session, frame, emotion):
    # subject ids of the three datasets overlap (CK+ S005 vs MMI S005): prefix them with the dataset
    return {"dataset": dataset, "subject": f"{dataset}_{subject}", "session": session, "frame": int(frame),
            "expression": EXPRESSIONS.index(emotion), **_unknown_aus()}


def _code(path: Path, text: str, what: str, line: int | None = None) -> int:
    try:
        return P.parse_int(text)
    except ValueError as e:
        at = f"line {line}: " if line is not None else ""
        raise P.PrepareError(f"{path}: {at}{what} {text!r} is not an integer code; fix the file (codes are never "
                             "rounded)") from e


def read_single_code(path: Path) -> int:
    vals = P._NUM.findall(path.read_text())
    if len(vals) != 1:
        raise P.PrepareError(f"{path}: expected one emotion code, found {len(vals)} numbers")
    return _code(path, vals[0], "emotion code")


def read_facs(path: Path) -> dict[int, int]:
    out = {}
    for i, ln in enumerate(path.read_text().splitlines(), start=1):
        vals = P._NUM.findall(ln)
        if not vals:
            continue
        if len(vals) != 2:
            raise P.PrepareError(f"{path}: line {i} has {len(vals)} columns, expected 2 (AU intensity)")
        out[_code(path, vals[0], "AU", i)] = _code(path, vals[1], "intensity", i)
    return out


def ckplus_jobs(root: Path, report: list) -> list[P.Job]:
    img_root = P.require_dir(root / "cohn-kanade-images", "CK+ cohn-kanade-images/Sxxx/yyy/*.png")
    emo_root = P.require_dir(root / "Emotion", "CK+ Emotion/Sxxx/yyy/*_emotion.txt")
    facs_root, lm_root = root / "FACS", root / "Landmarks"
    jobs = []
    labelled = {(q.parent.name, q.name) for q in emo_root.glob("*/*") if q.is_dir() and any(q.glob("*_emotion.txt"))}
    with_images = {(s.name, q.name) for s in img_root.iterdir() if s.is_dir() for q in s.iterdir() if q.is_dir()}
    for subj, seq in sorted(labelled - with_images):  # CK+ ships labels and images as separate archives
        report.append(P.note(img_root / subj / seq, "labelled sequence has no image folder: "
                             f"{emo_root / subj / seq} has an emotion label", "no_image", N_FRAMES))
    for sdir in sorted(p for p in img_root.iterdir() if p.is_dir()):
        frames = []
        for qdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            subj, seq = sdir.name, qdir.name
            images = P.list_images(qdir)
            emo_files = sorted((emo_root / subj / seq).glob("*_emotion.txt"))
            if not emo_files:
                report.append(P.note(qdir, "no emotion label: not in the mix (CK+ labels 327 of its 593 sequences)",
                                     "unlabelled", min(len(images), N_FRAMES)))
                continue
            code = read_single_code(emo_files[0])
            name = CK_CODES.get(code)
            if name is None:
                raise P.PrepareError(f"{emo_files[0]}: emotion code {code}; expected 0-7")
            if name not in EXPRESSIONS:
                report.append(P.note(emo_files[0], f"emotion not in the 6-class mix: {name}", "excluded",
                                     min(len(images), N_FRAMES)))
                continue
            if not images:
                report.append(P.note(qdir, "labelled sequence has no images", "no_image", N_FRAMES))
                continue
            peak = images[-1]
            facs_files = sorted((facs_root / subj / seq).glob("*_facs.txt"))
            facs = read_facs(facs_files[0]) if facs_files else None
            if facs is None:
                report.append(P.note(facs_root / subj / seq, "FACS file missing: AUs of the peak frame unknown",
                                     "info", 1))
            for img in images[-N_FRAMES:]:
                row = _row("ckplus", subj, seq, P.frame_number(img.name), name)
                if img == peak and facs is not None:
                    row.update({f"AU{a}": int(a in facs) for a in CK_AUS})
                frames.append(P.Frame(row=row, image=str(img), file=str(img),
                                      landmark_file=str(lm_root / subj / seq / f"{img.stem}_landmarks.txt"),
                                      landmark_reader="text"))
        if frames:
            jobs.append(P.Job(key=f"ckplus/{sdir.name}", frames=frames))
    return jobs


def _subject_id(value: str) -> str:
    digits = re.findall(r"\d+", value)
    return f"S{int(digits[-1]):03d}" if digits else value


def _mmi_meta(sdir: Path, video: Path | None) -> tuple[int | None, str, Path | None]:
    """(emotion code, subject ``S00N``, metadata file) of a session; PrepareError naming the files when the
    session's subject sources disagree or none names the subject."""
    code, meta_file = None, None
    sources: list[tuple[str, str]] = []  # (where, subject)
    for x in sorted(sdir.glob("*.xml")):
        if x.name.lower() == "session.xml" or x.name.lower().endswith("-oao_aucs.xml"):
            continue
        try:
            root = ET.parse(x).getroot()
        except ET.ParseError as e:
            raise P.PrepareError(f"{x}: malformed XML ({e})") from e
        for tag in root.iter("Metatag"):
            if tag.get("Name", "").lower() == "emotion" and tag.get("Value", "").strip():
                code, meta_file = _code(x, tag.get("Value").strip(), "Emotion metatag"), x
            if tag.get("Name", "").lower() == "subject" and tag.get("Value", "").strip():
                sources.append((f"{x} (Subject metatag)", _subject_id(tag.get("Value").strip())))
    sx = sdir / "session.xml"
    if sx.exists():
        try:
            for el in ET.parse(sx).getroot().iter():
                if el.tag.lower() == "subject" and el.get("id"):
                    sources.append((f"{sx} (<subject id>)", _subject_id(el.get("id"))))
                    break
        except ET.ParseError as e:
            raise P.PrepareError(f"{sx}: malformed XML ({e})") from e
    m = _MMI_CLIP.match(video.stem) if video is not None else None
    if m:
        sources.append((f"clip name {video.stem}", f"S{int(m.group(1)):03d}"))
    if not sources:
        raise P.PrepareError(f"{sdir}: no subject for this session (no <subject id> in session.xml, no Subject "
                             "metatag, clip name not S<NNN>-...); subject-exclusive folds need it: add "
                             "<subject id=\"N\"/> to session.xml")
    if len({s for _, s in sources}) > 1:
        raise P.PrepareError(f"{sdir}: the session's subject sources disagree: "
                             + "; ".join(f"{w} says {s}" for w, s in sources) + ". Fix the metadata")
    return code, sources[0][1], meta_file


def mmi_jobs(root: Path, report: list) -> list[P.Job]:
    sess_root = P.require_dir(root / "Sessions", "MMI Sessions/<id>/<name>.avi")
    jobs = []
    for sdir in sorted((p for p in sess_root.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        videos = sorted(sdir.glob("*.avi"))
        if not videos:
            report.append(P.note(sdir, "no .avi video in the session", "no_image", N_FRAMES))
            continue
        video = videos[0]
        code, subject, meta_file = _mmi_meta(sdir, video)
        if code is None:
            report.append(P.note(sdir, "no emotion label in the session metadata: not in the mix", "unlabelled",
                                 N_FRAMES))
            continue
        if code not in MMI_CODES:
            report.append(P.note(meta_file, f"emotion code not in 1-6: {code}, not in the mix", "excluded",
                                 N_FRAMES))
            continue
        cap = cv2.VideoCapture(str(video))
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
        cap.release()
        if n < N_FRAMES:
            report.append(P.note(video, f"video unreadable or shorter than {N_FRAMES} frames", "unreadable",
                                 N_FRAMES))
            continue
        mid = n // 2
        frames = [P.Frame(row=_row("mmi", subject, sdir.name, i, MMI_CODES[code]), video_index=i,
                          file=f"{video}#frame{i}") for i in (mid - 1, mid, mid + 1)]
        jobs.append(P.Job(key=f"mmi/{sdir.name}", frames=frames, video=str(video), detector=True))
    return jobs


def oulu_jobs(root: Path, report: list) -> list[P.Job]:
    base = P.require_dir(root / "OriginalImg" / "VL" / "Strong", "Oulu-CASIA OriginalImg/VL/Strong/P0xx/<Emotion>/")
    jobs = []
    for sdir in sorted(p for p in base.iterdir() if p.is_dir()):
        frames = []
        for edir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            emo = OULU_FOLDERS.get(edir.name.lower())
            images = P.list_images(edir)
            if emo is None:
                report.append(P.note(edir, "folder name is not one of the 6 emotions: skipped", "unlabelled",
                                     min(len(images), N_FRAMES)))
                continue
            if len(images) < N_FRAMES:
                report.append(P.note(edir, f"sequence shorter than {N_FRAMES} frames: {len(images)} images",
                                     "no_image", N_FRAMES - len(images)))
            for img in images[-N_FRAMES:]:
                frames.append(P.Frame(row=_row("oulu", sdir.name, edir.name, P.frame_number(img.name), emo),
                                      image=str(img), file=str(img)))
        if frames:
            jobs.append(P.Job(key=f"oulu/{sdir.name}", frames=frames, detector=True))
    return jobs


def _find(src: Path, part: str, given) -> Path:
    if given:
        return P.require_dir(Path(given), f"{part} root")
    for name in PART_FOLDERS[part]:
        if (src / name).is_dir():
            return src / name
    raise P.PrepareError(f"{src}: no {part} folder (expected one of {list(PART_FOLDERS[part])}, or pass {part}=<path>)")


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, ckplus=None, mmi=None,
            oulu=None, parts=("ckplus", "mmi", "oulu")):
    """Prepare the CK+/MMI/Oulu-CASIA 6-emotion mix (last/middle 3 frames per sequence; subjects <dataset>_<id>)."""
    src, out = Path(src), Path(out)
    given = {"ckplus": ckplus, "mmi": mmi, "oulu": oulu}
    builders = {"ckplus": ckplus_jobs, "mmi": mmi_jobs, "oulu": oulu_jobs}
    parts = P.as_list(parts)
    unknown = set(parts) - set(builders)
    if unknown:
        raise P.PrepareError(f"unknown parts {sorted(unknown)}; expected ckplus, mmi, oulu")
    jobs, report = [], []
    for part in parts:
        jobs.extend(builders[part](_find(src, part, given[part]), report))
    aus = [f"AU{a}" for a in CK_AUS]
    meta = {
        "name": "fermix", "aus": aus, "intensity_aus": [], "expressions": list(EXPRESSIONS), "datasets": list(parts),
        "positive_threshold": 1,
        "label_conventions": "expression from CK+ Emotion codes (contempt and neutral dropped), MMI metadata Emotion "
                             "1-6, Oulu-CASIA folder names (VL/Strong); AUs only for the CK+ peak frame (FACS file: "
                             "listed = 1, else 0), -1 elsewhere",
        "frames_per_sequence": N_FRAMES,
        "landmark_source": "CK+ Landmarks (68 points); dlib detector for MMI and Oulu-CASIA",
    }
    return P.prepare_jobs(jobs, out, layout="ibug68", meta=meta, image_size=image_size, workers=workers,
                          progress=progress, columns=P.int8_columns(aus, expression=True), extra_report=report)
