"""Preparation of the real datasets: distribution as shipped -> the prepared format (:mod:`aurecog.data.prepared`).

Entry point (wired to ``aurecog prepare <dataset> --src --out`` and ``make prepare``)::

    run(dataset, src, out, workers=None, image_size=256, progress=True, **options)

Shared machinery, used by one reader module per dataset (``bp4d``, ``bp4dplus``, ``disfa``, ``gft``,
``affwild2``, ``fermix``, ``generic``):

* **Alignment** (:mod:`aurecog.data.align`): a similarity transform (rotation + isotropic scale + translation)
  that maps the two eye centres (means of the eye-contour landmarks of the layout) onto the canonical positions
  ``CANONICAL_EYES`` (fractions of the output size: image-left eye at (0.35, 0.40), image-right eye at
  (0.65, 0.40)); the image is warped with it to ``image_size`` x ``image_size`` and the landmarks are
  transformed with the same matrix.
* **Landmarks**: the dataset's own landmarks where it ships them (BP4D/BP4D+ 49 points, DISFA 66, CK+ 68);
  otherwise the optional dlib detector (:func:`detect_landmarks`, iBUG 68 points), imported lazily; without it
  preparation stops with ``pip install dlib-bin face-recognition-models``.
* **Report**: a frame whose image, face or landmarks cannot be read, or whose labels are unusable, is not
  written; it is listed in ``<out>/report.csv`` (columns ``file, reason, kind, frames``: one line may stand for
  several frames, e.g. a sequence without a label file; :mod:`aurecog.data.report`), counted per kind and
  summarised on stdout (frames found, prepared, per kind, per reason); readers write the lines with
  :func:`~aurecog.data.report.note`. Nothing is dropped silently. Structural problems (missing folder, label
  file with a wrong column count, a non-integer or out-of-range code, a header that does not name what the
  reader expects) raise :class:`PrepareError` naming the file; ``aurecog prepare`` prints it as one line and
  exits 2.
* **Resumable parallel writer** (:func:`prepare_jobs`): the work is cut into jobs (a sequence, a video chunk,
  a subject); each job is processed in a ``multiprocessing.Pool`` (``workers`` processes, default: the
  machine's cores) and saved as a chunk in ``<out>.work/`` with a done-marker holding a fingerprint of the job's
  inputs. An interrupted preparation is re-run with the same command and only processes the jobs without a
  matching marker. At the end the chunks are merged,
  in a deterministic job order, into the prepared folder by :class:`~aurecog.data.prepared.PreparedWriter`
  (atomic: ``<out>.partial`` -> ``<out>``), and the work folder is removed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from aurecog.data.align import BORDER_VALUE, CANONICAL_EYES, align_face, check_landmarks
from aurecog.data.landmarks import N_POINTS, check_layout
from aurecog.data.prepared import UNKNOWN, PreparedWriter
from aurecog.data.report import note, reason_kind, report_counts, summary, write_report

DEFAULT_IMAGE_SIZE = 256
DETECTOR_HINT = "pip install dlib-bin face-recognition-models"
#: bump when the chunk format (report lines) changes: old ``<out>.work`` chunks are then redone
CHUNK_VERSION = 2


class PrepareError(RuntimeError):
    """The distribution is not where or what the preparer expects; the message names the file or folder."""


# ---------------------------------------------------------------------------------------------------- detector
_DETECTOR: Any = None  # frame -> landmarks of the face preparation aligns (None: largest_face_landmarks)
_FACES: Any = None  # frame -> every DetectedFace (None: loaded on first use)


@dataclass
class DetectedFace:
    """One face found by the detector: ``box`` (x0, y0, x1, y1) in image pixels, the detector's ``score`` (dlib
    HOG: the SVM margin, > 0 when detected at the default threshold) and the iBUG-68 ``landmarks`` (68 x 2)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        """dlib's ``rect.width() * rect.height()`` (inclusive corners)."""
        return (self.box[2] - self.box[0] + 1) * (self.box[3] - self.box[1] + 1)


def shape_predictor_file() -> Path:
    """The 68-point shape predictor that ``face-recognition-models`` installs, located without importing that
    package (its ``__init__`` needs ``pkg_resources``, which setuptools >= 81 no longer ships)."""
    import importlib.util

    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face_recognition_models is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.exists():
        raise ImportError(f"{path} is missing; reinstall face-recognition-models")
    return path


def _load_detector():
    try:
        import dlib

        model = shape_predictor_file()
    except ImportError as e:
        raise PrepareError(
            "this dataset ships no landmarks (or a frame lacks them) and no face/landmark detector is installed. "
            f"Install the optional detector with `{DETECTOR_HINT}` (dlib HOG face detector + 68-point shape "
            "predictor), or provide landmark files (see the dataset's documentation)") from e

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(model))

    def detect(image_bgr: np.ndarray) -> list[DetectedFace]:
        rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB) if image_bgr.ndim == 3 else image_bgr
        rects, scores, _ = detector.run(rgb, 1, 0.0)  # = detector(rgb, 1), with the scores
        out = []
        for r, sc in zip(rects, scores):
            shape = predictor(rgb, r)
            out.append(DetectedFace((r.left(), r.top(), r.right(), r.bottom()), float(sc),
                                    np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)))
        return out

    return detect


def detect_faces(image_bgr: np.ndarray) -> list[DetectedFace]:
    """Every face the dlib detector finds (upsampled once), in the detector's order. The detector is loaded
    lazily once per process; :class:`PrepareError` naming ``pip install dlib-bin face-recognition-models`` if
    missing."""
    global _FACES
    if _FACES is None:
        _FACES = _load_detector()
    return _FACES(image_bgr)


def largest_face_landmarks(image_bgr: np.ndarray) -> np.ndarray | None:
    """iBUG-68 landmarks of the largest face of :func:`detect_faces` (the first one on a tie), or None."""
    faces = detect_faces(image_bgr)
    if not faces:
        return None
    return max(faces, key=lambda f: f.area).landmarks


def detect_landmarks(image_bgr: np.ndarray) -> np.ndarray | None:
    """The landmarks preparation uses for a frame without landmarks: :func:`largest_face_landmarks` (tests
    replace ``_DETECTOR`` with a stand-in), or None when no face is found."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = largest_face_landmarks
    return _DETECTOR(image_bgr)


def detector_landmarks(landmarks_ibug68: np.ndarray, layout: str) -> np.ndarray:
    """The detector's iBUG-68 points in ``layout`` (the 66 DISFA points or the 49 IntraFace points)."""
    lm = np.asarray(landmarks_ibug68, dtype=np.float32)
    if layout == "ibug68":
        return lm
    from aurecog.data.landmarks import DISFA66_FROM_IBUG68, INTRAFACE49_FROM_IBUG68

    return lm[INTRAFACE49_FROM_IBUG68 if layout == "intraface49" else DISFA66_FROM_IBUG68]


def align_frame(image_bgr: np.ndarray, landmarks: np.ndarray, layout: str, size: int
                ) -> tuple[np.ndarray, np.ndarray] | str:
    """Preparation's per-image step: check the landmarks, then :func:`~aurecog.data.align.align_face`. Returns
    (RGB crop S x S x 3, aligned landmarks) or the reason the landmarks are unusable. ``aurecog predict`` calls
    this same function, so training and inference crops cannot drift apart."""
    bad = check_landmarks(landmarks, layout)
    if bad:
        return bad
    return align_face(image_bgr, landmarks, layout, size)


# ---------------------------------------------------------------------------------------------------- readers
_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_landmark_text(path: str | os.PathLike, n_points: int | None = None) -> np.ndarray:
    """Landmarks from a text file: ``x y`` per line (CK+ ``*_landmarks.txt``), an iBUG ``.pts`` file
    (``version``/``n_points``/``{ }``), or one line ``x1 y1 x2 y2 ...``. Raises PrepareError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PrepareError(f"{path}: cannot read landmark file ({e})") from e
    body = text
    if "{" in text:
        body = text[text.index("{") + 1: text.rindex("}") if "}" in text else len(text)]
    vals = [float(v) for v in _NUM.findall(body)]
    if len(vals) % 2 or not vals:
        raise PrepareError(f"{path}: landmark file holds {len(vals)} numbers; expected x y pairs")
    lm = np.asarray(vals, dtype=np.float32).reshape(-1, 2)
    if n_points is not None and len(lm) != n_points:
        raise PrepareError(f"{path}: {len(lm)} landmarks, expected {n_points}")
    return lm


_ZIP: dict[str, Any] = {}


def _zip_member(path: str) -> np.ndarray | None:
    import zipfile

    archive, member = path.split("::", 1)
    zf = _ZIP.get(archive)
    if zf is None:
        for old in _ZIP.values():
            old.close()
        _ZIP.clear()
        try:
            zf = _ZIP[archive] = zipfile.ZipFile(archive)
        except (OSError, zipfile.BadZipFile):
            return None
    try:
        return np.frombuffer(zf.read(member), dtype=np.uint8)
    except (KeyError, OSError, zipfile.BadZipFile):
        return None


def read_image(path: str | os.PathLike) -> np.ndarray | None:
    """BGR image or None when unreadable (missing, truncated, not an image). ``archive.zip::member`` reads a
    member of a zip archive (BP4D/BP4D+ ship ``2D+3D/<subject>.zip``)."""
    path = str(path)
    if "::" in path:
        data = _zip_member(path)
    else:
        data = np.fromfile(path, dtype=np.uint8) if os.path.exists(path) else None
    if data is None or data.size == 0:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def frame_number(name: str) -> int | None:
    """Frame number from a file name: the last run of digits in the stem (``0012.jpg``, ``S005_001_00000011``)."""
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else None


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise PrepareError(f"{path}: folder not found ({what}). Is --src the root of the distribution as shipped?")
    return path


def loadmat(path: str | os.PathLike) -> dict:
    try:
        import scipy.io
    except ImportError as e:  # pragma: no cover - scipy is installed with the suite
        raise PrepareError(f"{path}: reading .mat landmark files needs scipy (pip install scipy), or convert them "
                           "to the documented text alternative") from e
    try:
        return scipy.io.loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - scipy raises several types for corrupt files
        raise PrepareError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------------- jobs
@dataclass
class Frame:
    """One frame of a job: where its pixels and landmarks come from and its index row."""

    row: dict[str, Any]
    image: str | None = None  # image file; None when the job reads a video (``video_index`` set)
    video_index: int | None = None  # 0-based frame index in the job's video
    landmarks: np.ndarray | None = None  # source-image landmarks, or None -> ``landmark_file`` / detector
    landmark_file: str | None = None
    landmark_reader: str | None = None  # "text", "disfa_mat"; how to read landmark_file
    file: str = ""  # the name used in the report


@dataclass
class Job:
    """A unit of parallel work (one sequence / video chunk); ``key`` must be unique and stable."""

    key: str
    frames: list[Frame]
    video: str | None = None
    report: list[tuple[str, str]] = field(default_factory=list)  # problems found while listing the job
    detector: bool = False  # frames without landmarks go to the dlib detector (else: report "no landmarks")


@dataclass
class Settings:
    image_size: int
    layout: str
    part_size: int = 500  # frames per saved part: bounds a worker's memory (500 x 256^2 x 3 = 98 MB)


def _read_frame_landmarks(fr: Frame, layout: str) -> tuple[np.ndarray | None, str | None]:
    if fr.landmarks is not None:
        return np.asarray(fr.landmarks, dtype=np.float32), None
    if fr.landmark_file is None:
        return None, None
    p = Path(fr.landmark_file)
    if not p.exists():
        return None, f"landmark file missing: {p}"
    try:
        if fr.landmark_reader == "disfa_mat":
            return read_disfa_landmarks(p), None
        return read_landmark_text(p), None
    except PrepareError as e:
        return None, f"unreadable landmark file: {e}"


def read_disfa_landmarks(path: Path) -> np.ndarray:
    """DISFA ``Landmark_Points/SNxxx/tmp_frame_lm/*_lm.mat`` (variable ``pts``, 66 x 2), or the text alternative
    ``*_lm.txt`` (66 lines ``x y``)."""
    if path.suffix.lower() == ".txt":
        return read_landmark_text(path, 66)
    mat = loadmat(path)
    if "pts" not in mat:
        raise PrepareError(f"{path}: no variable 'pts' (variables: {sorted(k for k in mat if not k.startswith('__'))})")
    pts = np.asarray(mat["pts"], dtype=np.float32)
    if pts.shape == (2, 66):
        pts = pts.T
    if pts.shape != (66, 2):
        raise PrepareError(f"{path}: 'pts' has shape {pts.shape}, expected (66, 2)")
    return pts


class _VideoReader:
    """Sequential reader of a job's video; frames requested in increasing order. Frames are decoded one after the
    other from the start (no seeking: codec seeks can land on the wrong frame and silently shift labels)."""

    def __init__(self, path: str):
        self.path = path
        self.cap = cv2.VideoCapture(path)
        self.ok = self.cap.isOpened()
        self.pos = 0
        self.ended_at: int | None = None

    def get(self, idx: int) -> np.ndarray | None:
        if not self.ok or self.ended_at is not None:
            return None
        while self.pos < idx:
            if not self.cap.grab():
                self.ended_at = self.pos
                return None
            self.pos += 1
        ok, frame = self.cap.read()
        if not ok:
            self.ended_at = self.pos
            return None
        self.pos += 1
        return frame

    def close(self):
        self.cap.release()


def iter_job_parts(job: Job, settings: Settings):
    """Read, landmark and align the frames of ``job`` in parts of ``settings.part_size`` frames; yields (images,
    landmarks, index rows, report lines) per part. A video is opened once and decoded sequentially."""
    video = None
    if job.video is not None:
        video = _VideoReader(job.video)
        if not video.ok:
            report = [note(f.file or f"{job.video}#{f.video_index}", f"cannot open video: {job.video}", "unreadable")
                      for f in job.frames]
            yield _stack([], [], settings.image_size, settings.layout) + ([], list(job.report) + report)
            return
    step = max(1, int(settings.part_size))
    try:
        for i in range(0, max(len(job.frames), 1), step):
            yield _process_frames(job.frames[i:i + step], job, settings, video, list(job.report) if i == 0 else [])
    finally:
        if video is not None:
            video.close()


def process_job(job: Job, settings: Settings) -> tuple[np.ndarray, np.ndarray, list[dict], list[tuple[str, str]]]:
    """All of ``job`` at once (images, landmarks, index rows, report lines); see :func:`iter_job_parts`."""
    parts = list(iter_job_parts(job, settings))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [r for p in parts for r in p[2]], [r for p in parts for r in p[3]])


def _process_frames(frames: list[Frame], job: Job, settings: Settings, video: _VideoReader | None, report: list):
    size, layout = settings.image_size, settings.layout
    images, lms, rows = [], [], []
    for fr in frames:
        if video is not None:
            img = video.get(fr.video_index)
            if img is None:
                ended = video.ended_at
                report.append(note(fr.file, "unreadable frame", "unreadable") if ended is None else note(
                    fr.file, f"video ended before this frame: frame index {fr.video_index}, the video has {ended} "
                             "frames", "no_image"))
                continue
        else:
            img = read_image(fr.image)
            if img is None:
                if "::" not in fr.image and os.path.exists(fr.image):
                    report.append(note(fr.file or fr.image, "unreadable image", "unreadable"))
                else:
                    report.append(note(fr.file or fr.image, "image missing or unreadable" if "::" in fr.image
                                       else "image missing", "no_image"))
                continue
        lm, problem = _read_frame_landmarks(fr, layout)
        if lm is None and problem is None and job.detector:
            lm = detect_landmarks(img)
            if lm is None:
                report.append(note(fr.file, "no face detected", "no_landmarks"))
                continue
            lm = detector_landmarks(lm, layout)
        if lm is None:
            report.append(note(fr.file, problem or "no landmarks", "no_landmarks"))
            continue
        aligned = align_frame(img, lm, layout, size)
        if isinstance(aligned, str):
            report.append(note(fr.file, aligned, "no_landmarks"))
            continue
        crop, out_lm = aligned
        images.append(crop)
        lms.append(out_lm)
        rows.append(fr.row)
    return _stack(images, lms, size, layout) + (rows, report)


def _stack(images, lms, size, layout):
    if images:
        return np.stack(images), np.stack(lms)
    return (np.zeros((0, size, size, 3), np.uint8), np.zeros((0, N_POINTS[layout], 2), np.float32))


def _safe(key: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
    return f"{clean}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _work_one(args) -> str:
    job, settings, work = args
    base = Path(work) / _safe(job.key)
    parts, rows, report = [], [], []
    for k, (images, lms, prow, prep) in enumerate(iter_job_parts(job, settings)):
        name = f"{base.name}.p{k:04d}.npz"
        tmp = base.parent / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, images=images, landmarks=lms)
        os.replace(tmp, base.parent / name)
        parts.append([name, len(prow)])
        rows.extend(prow)
        report.extend(prep)
    tmpj = base.with_suffix(".tmp.json")
    tmpj.write_text(json.dumps({"key": job.key, "parts": parts, "rows": rows, "report": report},
                               default=_json_default))
    os.replace(tmpj, base.with_suffix(".json"))
    base.with_suffix(".done").write_text(job_fingerprint(job) + "\n")
    return job.key


def job_fingerprint(job: Job) -> str:
    """Hash of everything a job reads (frame rows, files, landmarks): a chunk is reused only when it matches."""
    h = hashlib.sha1(json.dumps([job.key, job.video, job.detector], default=str).encode())
    for fr in job.frames:
        h.update(json.dumps([fr.row, fr.image, fr.video_index, fr.landmark_file, fr.landmark_reader],
                            default=_json_default, sort_keys=True).encode())
        if fr.landmarks is not None:
            h.update(np.ascontiguousarray(fr.landmarks, dtype=np.float32).tobytes())
    return h.hexdigest()


def _is_done(work: Path, job: Job) -> bool:
    marker = (work / _safe(job.key)).with_suffix(".done")
    try:
        return marker.read_text().strip() == job_fingerprint(job)
    except OSError:
        return False


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def prepare_jobs(jobs: Sequence[Job], out: str | os.PathLike, *, layout: str, meta: dict[str, Any],
                 image_size: int = DEFAULT_IMAGE_SIZE, workers: int | None = None, progress: bool = True,
                 columns: dict[str, Any] | None = None, extra_report: Sequence[tuple[str, str, str, int]] = (),
                 part_size: int = 500) -> Path:
    """Process ``jobs`` (resumably, in parallel) and write the prepared dataset to ``out``.

    ``columns`` maps index columns to dtypes (``int8`` labels etc.); ``extra_report`` holds the :func:`note`
    lines found while listing the distribution; ``part_size`` frames are held in a worker's memory at a time.
    Returns ``out``.
    """
    check_layout(layout)
    out = Path(out)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        dup = [k for k, c in Counter(keys).items() if c > 1]
        raise PrepareError(f"internal error: duplicate job keys {dup[:5]}")
    work = out.with_name(out.name + ".work")
    stamp = {"name": meta.get("name"), "image_size": image_size, "layout": layout, "chunks": CHUNK_VERSION,
             "meta": hashlib.sha1(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()}
    stamp_file = work / "settings.json"
    if work.exists():
        try:
            old = json.loads(stamp_file.read_text())
        except (OSError, ValueError):
            old = None
        if old != stamp:
            print(f"[prepare] {work} holds chunks of a different preparation; starting over", file=sys.stderr)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    settings = Settings(image_size=image_size, layout=layout, part_size=part_size)
    pending = [j for j in jobs if not _is_done(work, j)]
    if len(pending) < len(jobs):
        print(f"[prepare] resuming: {len(jobs) - len(pending)} of {len(jobs)} chunks already done in {work}")
    workers = default_workers() if not workers else int(workers)
    if _DETECTOR is None and any(j.detector and any(f.landmarks is None and f.landmark_file is None
                                                    for f in j.frames) for j in pending):
        detect_faces(np.zeros((8, 8, 3), np.uint8))  # fail fast, before any work, when the detector is missing
    tasks = [(j, settings, str(work)) for j in pending]
    bar = _bar(len(jobs), progress, f"prepare {meta.get('name')}", initial=len(jobs) - len(pending))
    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                _work_one(t)
                bar.update(1)
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for _ in pool.imap_unordered(_work_one, tasks):
                    bar.update(1)
    finally:
        bar.close()
    return _merge(jobs, work, out, layout, meta, image_size, columns or {}, extra_report, progress)


def _bar(total, progress, desc, initial=0):
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="chunk", initial=initial)

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


def _merge(jobs, work, out, layout, meta, image_size, columns, extra_report, progress) -> Path:
    parts = []
    n = 0
    for j in jobs:
        base = work / _safe(j.key)
        info = json.loads(base.with_suffix(".json").read_text())
        parts.append((base, info))
        n += len(info["rows"])
    report = [note(*r) for r in extra_report]
    for _, info in parts:
        report.extend(note(*r) for r in info["report"])
    if n == 0:
        write_report(out.with_name(out.name + ".report.csv"), report)
        raise PrepareError(
            f"no frame could be prepared ({len(report)} problems, listed in {out.name}.report.csv next to {out}); "
            "check --src")
    writer = PreparedWriter(out, n, image_size, layout)
    rows = []
    pos = 0
    bar = _bar(len(parts), progress, "merge")
    for _base, info in parts:
        for name, k in info["parts"]:
            if k:
                with np.load(work / name) as z:
                    writer.images[pos:pos + k] = z["images"]
                    writer.landmarks[pos:pos + k] = z["landmarks"]
                pos += k
        rows.extend(info["rows"])
        bar.update(1)
    bar.close()
    index = pd.DataFrame(rows)
    for col, dtype in columns.items():
        if col in index.columns:
            index[col] = index[col].astype(dtype)
    for col in index.columns:
        if re.fullmatch(r"AU\d+(_int)?", col) or col == "expression":
            index[col] = index[col].fillna(UNKNOWN).astype(np.int8)
    index["frame"] = index["frame"].astype(np.int64)
    for col in ("dataset", "subject", "session"):
        index[col] = index[col].astype(str)
    reasons = Counter(reason_kind(r[1]) for r in report)
    counts = report_counts(n, report)
    meta = dict(meta, n_reported=len(report), report_reasons=dict(reasons), counts=counts,
                alignment={"method": "similarity transform on the eye centres",
                           "canonical_eyes": [list(e) for e in CANONICAL_EYES], "border": list(BORDER_VALUE)})
    write_report(writer.tmp_dir / "report.csv", report)
    writer.finalize(index, meta)
    shutil.rmtree(work, ignore_errors=True)
    old_report = out.with_name(out.name + ".report.csv")
    if old_report.exists():
        old_report.unlink()
    print(summary(meta.get("name"), out, counts, report))
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def parse_int(text: str) -> int:
    """An integer code written as ``3``, ``3.0`` or ``3.0000000e+00``; ValueError for anything else (``0.6`` is
    not rounded: a label code that is not an integer means the file is not what the reader expects)."""
    t = str(text).strip()
    try:
        return int(t)
    except ValueError:
        x = float(t)  # ValueError for non-numbers
        if not np.isfinite(x) or x != int(x):
            raise ValueError(f"{t!r} is not an integer") from None
        return int(x)


def read_int_table(path: Path, *, header: bool, ncols: int | None = None, sep: str = ",") -> np.ndarray:
    """An integer CSV/TXT table; PrepareError naming the file and line on a wrong column count or a value that
    is not an integer (``1.0`` is accepted, ``0.6`` is not rounded)."""
    try:
        rows = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError as e:
        raise PrepareError(f"{path}: cannot read ({e})") from e
    if header:
        rows = rows[1:]
    out = []
    for i, ln in enumerate(rows, start=2 if header else 1):
        parts = [p.strip() for p in (ln.split(sep) if sep else ln.split())]
        if ncols is not None and len(parts) != ncols:
            raise PrepareError(f"{path}: line {i} has {len(parts)} columns, expected {ncols}")
        row = []
        for j, p in enumerate(parts, start=1):
            try:
                row.append(parse_int(p))
            except ValueError as e:
                raise PrepareError(f"{path}: line {i}, column {j}: {p!r} is not an integer code; fix the file "
                                   "(codes are never rounded)") from e
        out.append(row)
    if out and len({len(r) for r in out}) > 1:
        raise PrepareError(f"{path}: rows have different column counts")
    return np.asarray(out, dtype=np.int64).reshape(len(out), -1 if out else (ncols or 0))


def chunked(key: str, frames: list[Frame], size: int = 500, **job_kwargs) -> list[Job]:
    """Cut a sequence into jobs of at most ``size`` frames (bounded worker memory: 500 x 256^2 x 3 = 98 MB)."""
    if not frames:
        return [Job(key=key, frames=[], **job_kwargs)]
    return [Job(key=f"{key}#{i // size:05d}", frames=frames[i:i + size], **job_kwargs)
            for i in range(0, len(frames), size)]


def as_list(value) -> list[str] | None:
    """Option values from the command line arrive as strings: ``"a,b"`` -> ``["a", "b"]``."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def au_name(k: int | str) -> str:
    return f"AU{int(k)}"


def int8_columns(aus: Sequence[str], intensity_aus: Sequence[str] = (), expression: bool = False) -> dict:
    cols = {a: np.int8 for a in aus}
    cols.update({f"{a}_int": np.int8 for a in intensity_aus})
    if expression:
        cols["expression"] = np.int8
    return cols


# ---------------------------------------------------------------------------------------------------- registry
#: dataset name -> (reader module, function); each function is
#: ``prepare(src, out, workers=None, image_size=256, progress=True, *, <options>)``
PREPARERS: dict[str, tuple[str, str]] = {
    "bp4d": ("bp4d", "prepare"),
    "bp4dplus": ("bp4dplus", "prepare"),
    "disfa": ("disfa", "prepare"),
    "gft": ("gft", "prepare"),
    "generic": ("gft", "prepare_generic"),
    "affwild2": ("affwild2", "prepare"),
    "fermix": ("fermix", "prepare"),
}


def preparer(dataset: str) -> Callable:
    """The prepare function of ``dataset`` (its module imported on first use)."""
    if dataset not in PREPARERS:
        raise PrepareError(f"no preparer for {dataset!r}; known: {', '.join(sorted(PREPARERS))}")
    module, function = PREPARERS[dataset]
    return getattr(importlib.import_module(f"aurecog.data.{module}"), function)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def options(dataset: str) -> dict[str, tuple[Any, str]]:
    """``--option`` keys of ``dataset``: key -> (default, description); the keyword-only parameters of its
    prepare function, described in its module's ``OPTION_HELP``."""
    import inspect

    fn = preparer(dataset)
    helps = getattr(sys.modules[fn.__module__], "OPTION_HELP", {})
    out = {}
    for name, par in inspect.signature(fn).parameters.items():
        if par.kind is inspect.Parameter.KEYWORD_ONLY:
            out[name] = (par.default, helps.get(name, ""))
    return out


def options_help() -> str:
    """The datasets ``aurecog prepare`` knows and each one's ``--option`` keys with their defaults."""
    lines = ["datasets and their --option KEY=VALUE keys (default after =):"]
    for name in PREPARERS:
        fn = preparer(name)
        doc = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "") if fn.__doc__ else ""
        lines.append(f"  {name:9s} {doc}")
        for key, (default, text) in options(name).items():
            kv = f"{key}={_show(default)}"
            lines.append(f"      {kv:36s} {text}")
    return "\n".join(lines)


def run(dataset: str, src: str | os.PathLike, out: str | os.PathLike, workers: int | None = None,
        image_size: int = DEFAULT_IMAGE_SIZE, progress: bool = True, **opts) -> Path:
    """Prepare ``dataset`` from the distribution folder ``src`` into the prepared folder ``out``; ``opts`` are
    the dataset's :func:`options` (unknown keys: PrepareError listing the known ones)."""
    fn = preparer(dataset)
    known = options(dataset)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise PrepareError(f"unknown --option {', '.join(unknown)} for {dataset}; its options are "
                           f"{', '.join(f'{k}={_show(d)}' for k, (d, _) in known.items()) or 'none'}")
    for key, value in list(opts.items()):
        default = known[key][0]
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, str):
            try:
                opts[key] = int(value)
            except ValueError:
                raise PrepareError(f"--option {key}={value}: expected an integer (default {default})") from None
    src = Path(src)
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a folder")
    if int(image_size) < 16:
        raise PrepareError(f"image_size {image_size} is too small")
    return fn(src, Path(out), workers=workers, image_size=int(image_size), progress=progress, **opts)
