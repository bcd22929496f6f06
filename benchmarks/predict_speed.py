"""`aurecog predict` speed: frames/s of face detection + landmarks (dlib) and, separately, of each main model's
quick checkpoint on aligned faces (evaluation transform + forward, batched), plus the whole command on a short
generated video.

Detection runs on the CPU whatever the device (dlib's HOG detector); the models run on ``--device``. Each main
model's quick checkpoint is ``<results>/runs/synth/<model>/0-0/checkpoints/best.ckpt`` (``make bench``); a
checkpoint written before the runner stored its preprocessing is timed with the SynthAU preset's crop size and
layout, and a missing one with the quick config's network at random weights (speed does not depend on weights).
Writes ``results/perf/predict_speed.md`` with the command, machine and versions.

    python benchmarks/predict_speed.py [--device auto|cpu|cuda] [--frames 40] [--faces 96] [--results results]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import matplotlib.cbook
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from aurecog import config as C  # noqa: E402
from aurecog import predict as PR  # noqa: E402
from aurecog.data import prepare as P  # noqa: E402

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
FRAME = (640, 480)  # VGA: a webcam frame
BP4D_AUS = ["AU1", "AU2", "AU4", "AU6", "AU7", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]


def test_frame() -> np.ndarray:
    """The photograph (512 x 600, one face of about 190 px) scaled into a 640 x 480 frame."""
    img = P.read_image(PHOTO)
    h = FRAME[1]
    small = cv2.resize(img, (round(img.shape[1] * h / img.shape[0]), h), interpolation=cv2.INTER_AREA)
    frame = np.full((h, FRAME[0], 3), 90, np.uint8)
    x = (FRAME[0] - small.shape[1]) // 2
    frame[:, x:x + small.shape[1]] = small
    return frame


def time_detection(frame: np.ndarray, repeats: int) -> tuple[float, float, int]:
    """(frames/s of detect_faces, faces/s of the alignment, faces found)."""
    faces = P.detect_faces(frame)
    t0 = time.perf_counter()
    for _ in range(repeats):
        faces = P.detect_faces(frame)
    det = repeats / (time.perf_counter() - t0)
    lm = P.detector_landmarks(faces[0].landmarks, "ibug68")
    t0 = time.perf_counter()
    for _ in range(repeats * 10):
        P.align_frame(frame, lm, "ibug68", 64)
    return det, repeats * 10 / (time.perf_counter() - t0), len(faces)


def synth_preprocessing() -> dict:
    from aurecog.data.prepared import PreparedDataset
    from aurecog.data.synth import generate

    meta = PreparedDataset.open(generate("synth", progress=False)).meta
    return {"image_size": int(meta["image_size"]), "landmark_layout": meta["landmark_layout"], "alignment": None}


def quick_predictor(model: str, results: Path, device: str) -> tuple[PR.Predictor, str]:
    """The model's quick checkpoint as a Predictor, and where its weights and preprocessing came from."""
    from aurecog.models.backbones import no_pretrained
    from aurecog.models.registry import build_model, family_class
    from aurecog.tasks import TaskSpec

    ckpt = results / "runs" / "synth" / model / "0-0" / "checkpoints" / "best.ckpt"
    dev = PR.resolve_device(device)
    if ckpt.is_file():
        try:
            return PR.load_predictor(ckpt, device), "checkpoint"
        except PR.PredictError:  # written before the runner stored the preprocessing
            module = family_class(torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
                                  ["cfg"]["model"]["family"]).load_from_checkpoint(ckpt, map_location=dev)
            return (PR.Predictor(module, module.cfg, module.task, synth_preprocessing(), dev, str(ckpt)),
                    "checkpoint weights, SynthAU preprocessing")
    from run_all import fake_stats

    cfg = C.resolve(model, "synth", "quick")
    task = TaskSpec("au", BP4D_AUS)
    with no_pretrained():
        module = build_model(cfg, task, fake_stats(task))
    if hasattr(module, "prototype_ready"):  # AC2D: causal modules in use, as after the first training epoch
        module.prototype_ready.fill_(True)
    return PR.Predictor(module, cfg, task, synth_preprocessing(), dev), "random weights (no checkpoint)"


def time_model(pred: PR.Predictor, frame: np.ndarray, n_faces: int, batch: int) -> float:
    """Faces/s of the model part of predict: evaluation transform + forward (+ columns) on aligned crops."""
    lm = P.detector_landmarks(P.detect_faces(frame)[0].landmarks, pred.layout)
    crop, alm = P.align_frame(frame, lm, pred.layout, pred.image_size)
    crops, lms = [crop] * batch, [alm] * batch
    pred(crops, lms)  # warm-up
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    done, t0 = 0, time.perf_counter()
    while done < n_faces:
        pred(crops, lms)
        done += batch
    if pred.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def time_end_to_end(pred: PR.Predictor, frame: np.ndarray, frames: int, folder: Path) -> float:
    video = folder / "bench.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, FRAME)
    for k in range(frames):
        w.write(np.roll(frame, 2 * k, axis=1))
    w.release()
    t0 = time.perf_counter()
    table = PR.predict([video], pred, None, progress=False)
    assert table["success"].sum() == frames
    return frames / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from run_all import header

    from aurecog.runner.grid import select_models

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--models", default="default")
    ap.add_argument("--frames", type=int, default=40, help="frames timed for detection and end to end")
    ap.add_argument("--faces", type=int, default=256, help="faces timed per model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--results", default=str(ROOT / "results"), help="where the quick checkpoints are")
    ap.add_argument("--out", default=str(ROOT / "results" / "perf" / "predict_speed.md"))
    a = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    frame = test_frame()
    det_fps, align_fps, n = time_detection(frame, a.frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in select_models(a.models):
            pred, origin = quick_predictor(m, Path(a.results), a.device)
            fps = time_model(pred, frame, a.faces, a.batch)
            e2e = time_end_to_end(pred, frame, a.frames, Path(tmp)) if m == "baseline" else None
            rows.append((m, pred.cfg["model"]["family"], pred.cfg["data"]["input_size"], pred.device.type, fps,
                         origin, e2e))
            print(f"{m}: {fps:.0f} faces/s ({origin})", flush=True)
    dev = rows[0][3] if rows else "cpu"
    lines = header("`aurecog predict` speed: detection and models, separately") + [
        f"Detection: dlib HOG face detector (upsampled once, as `aurecog prepare`) + 68-point shape predictor, on "
        f"the CPU, {FRAME[0]} x {FRAME[1]} frame holding one face of about 190 px (matplotlib's "
        f"`grace_hopper.jpg` scaled); alignment: `aurecog.data.prepare.align_frame` to a 64 px crop. Models: each "
        f"main model's quick checkpoint (`{Path(a.results).name}/runs/synth/<model>/0-0`) on aligned faces, "
        f"batch {a.batch}, evaluation transform (albumentations, CPU) + forward on {dev}; {a.faces} faces after a "
        "warm-up. End to end: `aurecog.predict.predict` on a generated MJPG video of the same frame "
        f"({a.frames} frames, one face each), decoding, detection, alignment, model and table. Load average "
        f"when it started: {load:.1f} on {os.cpu_count()} cores (other processes share this CPU: the numbers are "
        "lower bounds).", "",
        "| stage | frames/s |", "|---|---|",
        f"| detection + landmarks ({n} face) | {det_fps:.1f} |",
        f"| alignment (per face) | {align_fps:.0f} |", "",
        "| model | class | input | device | faces/s (model only) | weights |", "|---|---|---|---|---|---|"]
    for m, fam, size, d, fps, origin, _ in rows:
        lines.append(f"| {m} | {fam} | {size} | {d} | {fps:.0f} | {origin} |")
    e2e = [r for r in rows if r[6] is not None]
    if e2e:
        lines += ["", f"End to end (baseline, one face per frame): {e2e[0][6]:.1f} frames/s; the detector bounds it."]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
