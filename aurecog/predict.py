"""``aurecog predict``: a trained model on a user's own images, folders of frames and videos, with the alignment
the training data was prepared with.

Per frame: every face of the dlib detector (:func:`aurecog.data.prepare.detect_faces`), its iBUG-68 landmarks
put in the training layout (:func:`~aurecog.data.prepare.detector_landmarks`) and aligned by
:func:`~aurecog.data.prepare.align_frame`, the very function ``aurecog prepare`` calls, at the crop size of the
training data; then the model's evaluation transform (resize, centre crop, normalisation of ``data.*``) and the
model. Everything that defines that preprocessing comes from the checkpoint: ``cfg`` (``data.input_size``,
``data.resize``, ``data.mean``, ``data.std``; family), ``task`` (kind, label names, intensity threshold) and
``preprocessing`` (training crop size, landmark layout, alignment; written by the runner at training time).

Output: one CSV in the OpenFace 2.x conventions: ``frame`` (1-based), ``face_id``, ``timestamp`` (seconds; the
container's presentation time for videos), ``confidence`` (the dlib HOG detection score, an SVM margin: > 0 at
the default threshold; 0 without a face), ``success`` (1 when the face was found in the frame), then

* AU occurrence models: ``AUxx_c`` (probability >= :data:`aurecog.metrics.AU_THRESHOLD`) and ``AUxx_p``;
* AU intensity models: ``AUxx_r`` (expected intensity 0-5), ``AUxx_c`` (``AUxx_r`` >= the task's positive
  threshold, as in the evaluation) and ``AUxx_p`` (probability of a level >= that threshold);
* expression models: ``p_<class>`` and ``expression`` (the most probable class);

and ``source`` (the input file or folder). A video has one row per frame and face id (ids from tracking by box
overlap, stable across the video): a frame where a face is missing has its row with ``success = 0`` and empty
predictions, so no frame is ever missing from the table.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from aurecog.data import prepare as P

#: intersection over union at or above which a detection continues a track of the previous frames
TRACK_IOU = 0.3
#: frames a track may go undetected and still be continued by an overlapping detection
TRACK_MAX_GAP = 30
#: timestamps of a folder of frames without ``--fps`` (OpenFace FeatureExtraction's default)
DEFAULT_FOLDER_FPS = 30.0
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp")


class PredictError(RuntimeError):
    """Bad input to ``aurecog predict`` (file, model): the message names it and the fix, on one line."""


# ---------------------------------------------------------------------------------------------------- model
@dataclass
class Predictor:
    """A trained model with the preprocessing of its checkpoint; call it on aligned crops."""

    module: torch.nn.Module
    cfg: dict
    task: object  # aurecog.tasks.TaskSpec
    preprocessing: dict
    device: torch.device
    path: str = ""
    transform: object = field(init=False)

    def __post_init__(self):
        from aurecog.data.transforms import FaceTransform

        d = self.cfg.get("data") or {}
        self.transform = FaceTransform(False, crop=int(d.get("input_size", 64)), resize=d.get("resize"),
                                       layout=self.layout, mean=d.get("mean", (0.5,) * 3),
                                       std=d.get("std", (0.5,) * 3))
        self.module.eval().to(self.device)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    @property
    def layout(self) -> str:
        return str(self.preprocessing["landmark_layout"])

    @property
    def name(self) -> str:
        return str((self.cfg.get("model") or {}).get("name", "?"))

    def columns(self) -> list[str]:
        """The prediction columns, in order (:func:`au_column` names)."""
        names, kind = self.task.names, self.task.kind
        if kind == "expression":
            return [f"p_{n}" for n in names] + ["expression"]
        cols = [f"{au_column(n)}_r" for n in names] if kind == "intensity" else []
        return cols + [f"{au_column(n)}_c" for n in names] + [f"{au_column(n)}_p" for n in names]

    @torch.no_grad()
    def __call__(self, crops: Sequence[np.ndarray], landmarks: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Column -> values for aligned RGB crops (the training crop size) and their aligned landmarks."""
        from aurecog.metrics import AU_THRESHOLD

        items = [self.transform(c, lm) for c, lm in zip(crops, landmarks)]
        batch = {"image": torch.stack([x for x, _, _ in items]).to(self.device),
                 "landmarks": torch.stack([lm for _, lm, _ in items]).to(self.device)}
        logits = self.module(batch)["logits"].float()
        names, kind = self.task.names, self.task.kind
        out: dict[str, np.ndarray] = {}
        if kind == "expression":
            p = logits.softmax(-1).cpu().numpy()
            for j, n in enumerate(names):
                out[f"p_{n}"] = p[:, j]
            out["expression"] = np.asarray(names, dtype=object)[p.argmax(1)]
            return out
        if kind == "au":
            p = torch.sigmoid(logits).cpu().numpy()
            present = p >= AU_THRESHOLD
        else:  # intensity: B x C x levels
            probs = logits.softmax(-1)
            levels = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
            r = (probs * levels).sum(-1).cpu().numpy()  # = aurecog.models.losses.intensity_scores
            thr = float(self.task.positive_threshold)
            p = probs[..., int(math.ceil(thr)):].sum(-1).cpu().numpy()
            present = r >= thr
            for j, n in enumerate(names):
                out[f"{au_column(n)}_r"] = r[:, j]
        for j, n in enumerate(names):
            out[f"{au_column(n)}_c"] = present[:, j].astype(np.int8)
        for j, n in enumerate(names):
            out[f"{au_column(n)}_p"] = p[:, j]
        return out


def au_column(name: str) -> str:
    """OpenFace's AU column stem: ``AU1`` -> ``AU01``, ``AU12`` -> ``AU12``; other names as they are."""
    m = re.fullmatch(r"AU(\d+)", name)
    return f"AU{int(m.group(1)):02d}" if m else name


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PredictError(f"--device {device}: no CUDA GPU is visible; use --device cpu (or auto)")
    return torch.device(device)


def load_predictor(model: str | os.PathLike, device: str = "auto") -> Predictor:
    """A run folder (its ``checkpoints/best.ckpt``) or a ``.ckpt`` file the runner wrote, ready for inference."""
    from aurecog.models.registry import family_class
    from aurecog.runner.cell import CHECKPOINT, checkpoint_path

    ckpt = checkpoint_path(Path(model))
    if not ckpt.is_file():
        raise PredictError(f"--model {model}: no checkpoint {ckpt}; give a run folder holding {CHECKPOINT} "
                           "(results/runs/<dataset>/<model>/<fold>-<seed>) or a .ckpt file")
    try:
        hp = torch.load(ckpt, map_location="cpu", weights_only=False).get("hyper_parameters") or {}
    except Exception as e:  # noqa: BLE001 - torch raises several types for a file that is not a checkpoint
        raise PredictError(f"--model {ckpt}: cannot read the checkpoint ({type(e).__name__}: {e})") from None
    for key in ("cfg", "task"):
        if key not in hp:
            raise PredictError(f"--model {ckpt}: not a checkpoint of aurecog's runner (no hyper-parameter {key!r})")
    if not (hp.get("preprocessing") or {}).get("image_size"):
        raise PredictError(f"--model {ckpt}: the checkpoint predates stored preprocessing (hyper-parameter "
                           "'preprocessing': training crop size and landmark layout); retrain it with aurecog bench")
    dev = resolve_device(device)
    module = family_class(hp["cfg"]["model"]["family"]).load_from_checkpoint(ckpt, map_location=dev)
    return Predictor(module, hp["cfg"], module.task, dict(hp["preprocessing"]), dev, str(ckpt))


# ---------------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """One input: ``kind`` image | folder | video; ``frames`` the frame count when known (else None)."""

    path: Path
    kind: str
    frames: int | None
    fps: float | None = None
    files: list[Path] = field(default_factory=list)


def open_source(path: str | os.PathLike, fps: float | None = None) -> Source:
    """Classify and check one SOURCE; PredictError naming it when it cannot be read."""
    p = Path(path)
    if p.is_dir():
        files = P.list_images(p)
        if not files:
            raise PredictError(f"{p}: folder holds no image ({', '.join(P.IMAGE_EXTS)})")
        return Source(p, "folder", len(files), fps or DEFAULT_FOLDER_FPS, files)
    if not p.is_file():
        raise PredictError(f"{p}: no such file or folder")
    if p.suffix.lower() in P.IMAGE_EXTS:
        if P.read_image(p) is None:
            raise PredictError(f"{p}: cannot read the image (truncated or not an image)")
        return Source(p, "image", 1)
    cap = cv2.VideoCapture(str(p))
    ok = cap.isOpened() and cap.read()[0]
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    rate = float(cap.get(cv2.CAP_PROP_FPS) or 0)
    cap.release()
    if not ok:
        raise PredictError(f"{p}: cannot read it as an image ({', '.join(P.IMAGE_EXTS)}) or as a video "
                           "(OpenCV/FFmpeg opens no frame)")
    return Source(p, "video", n if n > 0 else None, rate or None)


def iter_frames(src: Source) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame number from 1, timestamp in seconds, BGR image) of a source; a video is decoded in order and each
    frame's timestamp is the container's presentation time (OpenCV's ``CAP_PROP_POS_MSEC`` after the read)."""
    if src.kind == "image":
        yield 1, 0.0, P.read_image(src.path)
        return
    if src.kind == "folder":
        for i, f in enumerate(src.files):
            img = P.read_image(f)
            if img is None:
                raise PredictError(f"{f}: cannot read the image (truncated or not an image)")
            yield i + 1, i / src.fps, img
        return
    cap = cv2.VideoCapture(str(src.path))
    try:
        i = 0
        while True:
            ok, img = cap.read()
            if not ok:
                break
            i += 1
            yield i, float(cap.get(cv2.CAP_PROP_POS_MSEC)) / 1000.0, img
    finally:
        cap.release()


# ---------------------------------------------------------------------------------------------------- tracking
def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Tracker:
    """Face ids stable across a video: each detection continues the track whose last box overlaps it most
    (IoU >= :data:`TRACK_IOU`, seen within :data:`TRACK_MAX_GAP` frames; greedy, best pairs first), else opens a
    new id. Ids count from 0 in order of first appearance."""

    def __init__(self):
        self.tracks: dict[int, tuple[int, tuple]] = {}  # id -> (last frame, last box)

    def assign(self, frame: int, boxes: Sequence[tuple]) -> list[int]:
        live = {k: b for k, (f, b) in self.tracks.items() if frame - f <= TRACK_MAX_GAP}
        pairs = sorted(((iou(b, tb), i, k) for i, b in enumerate(boxes) for k, tb in live.items()), reverse=True)
        ids: list[int | None] = [None] * len(boxes)
        used: set[int] = set()
        for score, i, k in pairs:
            if score < TRACK_IOU:
                break
            if ids[i] is None and k not in used:
                ids[i] = k
                used.add(k)
        for i in range(len(boxes)):
            if ids[i] is None:
                ids[i] = len(self.tracks)
                self.tracks[ids[i]] = (frame, boxes[i])
        for i, k in enumerate(ids):
            self.tracks[k] = (frame, boxes[i])
        return ids


# ---------------------------------------------------------------------------------------------------- predict
BASE_COLUMNS = ["frame", "face_id", "timestamp", "confidence", "success"]


@dataclass
class _Face:
    source: int
    frame: int
    timestamp: float
    face_id: int
    confidence: float
    landmarks: np.ndarray  # source-frame landmarks (detector layout, iBUG-68)
    crop: np.ndarray | None = None
    aligned: np.ndarray | None = None
    result: dict | None = None


class _Batcher:
    """Collects aligned faces and runs the model on full batches (and on what is left at the end)."""

    def __init__(self, predictor: Predictor, batch_size: int):
        self.predictor, self.batch_size, self.pending = predictor, max(1, int(batch_size)), []
        self.model_s = 0.0

    def add(self, face: _Face) -> None:
        self.pending.append(face)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        res = self.predictor([f.crop for f in self.pending], [f.aligned for f in self.pending])
        self.model_s += time.perf_counter() - t0
        for i, f in enumerate(self.pending):
            f.result = {k: v[i] for k, v in res.items()}
            f.crop = f.aligned = None
        self.pending = []


def predict(sources: Sequence[str | os.PathLike], predictor: Predictor, out: str | os.PathLike | None = None,
            overlay: str | os.PathLike | None = None, batch_size: int = 32, fps: float | None = None,
            progress: bool = True, detect=None) -> pd.DataFrame:
    """Run ``predictor`` on every face of every source; returns the table (and writes it to ``out``, a CSV).

    Every source is checked before any work. ``overlay``: a folder receiving each frame with the boxes,
    landmarks and predictions drawn. ``detect``: frame -> list of :class:`aurecog.data.prepare.DetectedFace`
    (default: the dlib detector preparation uses)."""
    srcs = [open_source(s, fps) for s in sources]
    if detect is None:
        detect = P.detect_faces
        detect(np.zeros((8, 8, 3), np.uint8))  # load the detector (or stop naming its install) before timing
    if overlay is not None:
        Path(overlay).mkdir(parents=True, exist_ok=True)
    total = sum(s.frames or 0 for s in srcs) or None
    bar = _progress(total, progress)
    batcher = _Batcher(predictor, batch_size)
    frames: list[tuple[int, int, float]] = []  # (source, frame, timestamp)
    faces: list[_Face] = []
    ids_per_source: dict[int, set[int]] = {}
    n_faces, t0, det_s = 0, time.perf_counter(), 0.0
    try:
        for si, src in enumerate(srcs):
            tracker = Tracker()
            ids_per_source[si] = set()
            for fno, ts, img in iter_frames(src):
                t1 = time.perf_counter()
                found = detect(img)
                det_s += time.perf_counter() - t1
                ids = tracker.assign(fno, [f.box for f in found])
                frames.append((si, fno, ts))
                drawn = []
                for fid, det in zip(ids, found):
                    lm = P.detector_landmarks(det.landmarks, predictor.layout)
                    aligned = P.align_frame(img, lm, predictor.layout, predictor.image_size)
                    if isinstance(aligned, str):  # degenerate landmarks: this face counts as not found
                        continue
                    face = _Face(si, fno, ts, fid, det.score, det.landmarks, *aligned)
                    ids_per_source[si].add(fid)
                    faces.append(face)
                    drawn.append((det, face))
                    batcher.add(face)
                    n_faces += 1
                if overlay is not None:
                    batcher.flush()
                    _draw(img, drawn, predictor, Path(overlay) / f"{_stem(src)}_{fno:06d}.png")
                bar.update(1)
                el = time.perf_counter() - t0
                bar.set_postfix_str(f"{n_faces / el:.1f} faces/s", refresh=False)
        batcher.flush()
    finally:
        bar.close()
    table = _table(srcs, frames, faces, ids_per_source, predictor)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        table.to_csv(tmp, index=False, float_format="%.6g")
        os.replace(tmp, out)
    table.attrs["timing"] = {"frames": len(frames), "faces": n_faces, "detect_s": det_s, "model_s": batcher.model_s,
                             "total_s": time.perf_counter() - t0}
    return table


def _table(srcs, frames, faces, ids_per_source, predictor) -> pd.DataFrame:
    cols = predictor.columns()
    by_key = {(f.source, f.frame, f.face_id): f for f in faces}
    rows = []
    for si, fno, ts in frames:
        for fid in sorted(ids_per_source[si]) or [0]:
            f = by_key.get((si, fno, fid))
            row = {"frame": fno, "face_id": fid, "timestamp": round(ts, 6),
                   "confidence": f.confidence if f else 0.0, "success": int(f is not None)}
            row.update(f.result if f else {})
            row["source"] = str(srcs[si].path)
            rows.append(row)
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + cols + ["source"])
    for c in cols:
        if c.endswith("_c"):
            df[c] = df[c].astype("Int8")
    return df


def _stem(src: Source) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", src.path.stem if src.kind != "folder" else src.path.name)


def _draw(img: np.ndarray, drawn, predictor: Predictor, path: Path) -> None:
    canvas = img.copy()
    scale = max(1, round(max(img.shape[:2]) / 400))
    for det, face in drawn:
        x0, y0, x1, y1 = det.box
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 200, 0), scale)
        for x, y in det.landmarks:
            cv2.circle(canvas, (int(round(x)), int(round(y))), scale, (0, 255, 255), -1)
        lines = [f"id {face.face_id}"] + _labels(face.result or {}, predictor)
        for k, text in enumerate(lines):
            cv2.putText(canvas, text, (x0, y1 + (k + 1) * 14 * scale), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * scale,
                        (0, 255, 0), scale, cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)


def _labels(result: dict, predictor: Predictor) -> list[str]:
    if predictor.task.kind == "expression":
        e = result.get("expression")
        return [f"{e} {result.get(f'p_{e}', 0):.2f}"] if e is not None else []
    on = [au_column(n) for n in predictor.task.names if result.get(f"{au_column(n)}_c")]
    return [" ".join(on[i:i + 4]) for i in range(0, len(on), 4)] or ["no AU"]


def _progress(total, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="predict", unit="frame", disable=not progress)
