"""``aurecog predict``: a real photograph (matplotlib's sample ``grace_hopper.jpg``, a US Navy portrait in the
public domain) and a generated video, through the dlib detector, preparation's alignment and a SynthAU-trained
checkpoint."""

from __future__ import annotations

import math

import cv2
import matplotlib.cbook
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("dlib")

from aurecog import cli  # noqa: E402
from aurecog import predict as PR  # noqa: E402
from aurecog.data import prepare as P  # noqa: E402
from aurecog.data.align import CANONICAL_EYES, EYE_INDICES  # noqa: E402
from aurecog.data.prepared import PreparedDataset  # noqa: E402
from aurecog.data.transforms import FaceTransform  # noqa: E402
from aurecog.tasks import TaskSpec  # noqa: E402

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.eval_batch_size=256"]


@pytest.fixture(scope="module", autouse=True)
def _restore_detector():
    """The real dlib detector is loaded once for this module and unloaded after it (other modules check the
    detector's absence or replace it)."""
    saved = P._FACES, P._DETECTOR
    yield
    P._FACES, P._DETECTOR = saved


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A SynthAU baseline cell trained for 3 batches by the runner's own cell code (in this process)."""
    from aurecog.runner import grid
    from aurecog.runner.cell import run_cell

    res = tmp_path_factory.mktemp("res")
    cell = grid.expand("synth", "baseline", "0", "0", "quick", None, res, TINY)[0]
    run_cell(cell.config, 0, 0, cell.run_dir, wandb_mode="disabled", progress=False)
    return cell.run_dir


def test_photo_face_aligned_and_predicted_as_on_prepare_s_crop(run_dir, tmp_path):
    pred = PR.load_predictor(run_dir, "cpu")
    assert pred.preprocessing["image_size"] == 64 and pred.layout == "ibug68"  # SynthAU's crops, from the ckpt
    img = P.read_image(PHOTO)
    faces = P.detect_faces(img)
    assert len(faces) == 1
    import dlib  # the detector call preparation used before detect_faces existed finds the same box

    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    assert [(r.left(), r.top(), r.right(), r.bottom()) for r in dlib.get_frontal_face_detector()(rgb, 1)] == \
        [f.box for f in faces]
    x0, y0, x1, y1 = faces[0].box
    assert 150 < x0 < x1 < 400 and 100 < y0 < y1 < 360  # the face of the portrait (512 x 600)
    # `aurecog prepare generic` on the photograph (no landmarks given: the detector path), at the model's size
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.csv").write_text(f"image,subject,AU1\n{PHOTO},s0,0\n")
    ds = PreparedDataset.open(P.run("generic", src, tmp_path / "prep", workers=1, image_size=64, progress=False))
    prepared, prepared_lm = np.asarray(ds.images[0]), np.asarray(ds.landmarks[0])
    # the eye centres of the aligned landmarks land on the canonical positions
    left, right = EYE_INDICES["ibug68"]
    eyes = np.stack([prepared_lm[left].mean(0), prepared_lm[right].mean(0)])
    np.testing.assert_allclose(eyes, np.asarray(CANONICAL_EYES) * 64, atol=1e-3)
    # predict's crop is prepare's crop, pixel for pixel
    crop, lm = P.align_frame(img, P.detector_landmarks(faces[0].landmarks, "ibug68"), "ibug68", 64)
    assert np.array_equal(crop, prepared) and np.allclose(lm, prepared_lm, atol=1e-4)
    # the reference: the checkpoint's model on the prepared crop through the evaluation transform of its config
    d = pred.cfg["data"]
    x, lmt, _ = FaceTransform(False, crop=d["input_size"], resize=d["resize"], mean=d["mean"], std=d["std"])(
        prepared, prepared_lm)
    model = type(pred.module).load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", map_location="cpu").eval()
    with torch.no_grad():
        ref = model.predict_step({"image": x[None], "landmarks": lmt[None]}, 0).numpy()[0]
    table = PR.predict([PHOTO], pred, tmp_path / "out.csv", overlay=tmp_path / "ov", progress=False)
    csv = pd.read_csv(tmp_path / "out.csv")
    assert list(csv.columns[:5]) == ["frame", "face_id", "timestamp", "confidence", "success"]
    assert len(csv) == 1 and csv.loc[0, "success"] == 1 and csv.loc[0, "confidence"] > 0
    names = pred.task.names
    got = csv[[f"{PR.au_column(n)}_p" for n in names]].to_numpy()[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert (csv[[f"{PR.au_column(n)}_c" for n in names]].to_numpy()[0] == (ref >= 0.5)).all()
    assert table.loc[0, "AU01_p"] == pytest.approx(float(ref[0]), abs=1e-6)
    assert [p.name for p in (tmp_path / "ov").iterdir()] == ["grace_hopper_000001.png"]


def _patch(img: np.ndarray, size: int = 96) -> np.ndarray:
    x0, y0, x1, y1 = P.detect_faces(img)[0].box
    cx, cy, h = (x0 + x1) // 2, (y0 + y1) // 2, int((x1 - x0) * 0.8)
    return cv2.resize(img[cy - h:cy + h, cx - h:cx + h], (size, size), interpolation=cv2.INTER_AREA)


def _write_video(path, fps: float) -> dict:
    """32 frames, 256 x 160: face A alone (1-10), A and B (11-20), B slides out to the right (21-25) and is gone
    (26-30), no face at all (31-32). B is the mirrored photograph."""
    a = _patch(P.read_image(PHOTO))
    b = a[:, ::-1]
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (256, 160))
    truth = {"a": [], "b": []}
    for k in range(1, 33):
        fr = np.full((160, 256, 3), 90, np.uint8)
        if k <= 30:
            xa = 10 + k
            fr[30:126, xa:xa + 96] = a
            truth["a"].append(k)
        if 11 <= k <= 30:
            xb = 150 + max(0, k - 20) * 20
            if xb < 256:
                fr[30:126, xb:min(256, xb + 96)] = b[:, :min(96, 256 - xb)]
            if xb + 96 <= 256:
                truth["b"].append(k)  # entirely in the frame
        w.write(fr)
    w.release()
    return truth


def test_video_one_row_per_frame_and_face(run_dir, tmp_path):
    fps = 12.5
    video = tmp_path / "two.avi"
    truth = _write_video(video, fps)
    pred = PR.load_predictor(run_dir, "cpu")
    table = PR.predict([video], pred, tmp_path / "v.csv", batch_size=7, progress=False)
    csv = pd.read_csv(tmp_path / "v.csv")
    assert sorted(csv["face_id"].unique()) == [0, 1]
    assert len(csv) == 32 * 2 and len(table) == len(csv)
    assert (csv.groupby("frame").size() == 2).all() and sorted(csv["frame"].unique()) == list(range(1, 33))
    # timestamps from the container: frame k is shown at (k - 1) / 12.5 s (not the 30 fps a folder assumes)
    ts = csv.groupby("frame")["timestamp"].first()
    np.testing.assert_allclose(ts.to_numpy(), (np.arange(1, 33) - 1) / fps, atol=1e-3)
    ok = csv.pivot(index="frame", columns="face_id", values="success")
    # face A (first seen, id 0) in frames 1-30; B (id 1) while entirely in the frame; nobody in 31-32
    assert ok.loc[1:30, 0].eq(1).all() and ok.loc[31:32].eq(0).all().all()
    assert ok.loc[1:10, 1].eq(0).all() and ok.loc[truth["b"], 1].eq(1).all() and ok.loc[26:30, 1].eq(0).all()
    # a missing face has empty predictions, a found one has them all
    au = [c for c in csv.columns if c.endswith("_p")]
    assert csv.loc[csv["success"] == 0, au].isna().all().all()
    assert csv.loc[csv["success"] == 1, au].notna().all().all()
    # batching does not change the numbers: the same frames one face per model call
    again = PR.predict([video], pred, None, batch_size=1, progress=False)
    pd.testing.assert_frame_equal(again[au], table[au], rtol=1e-5, atol=1e-6)


def test_folder_of_frames_and_an_image_without_a_face(run_dir, tmp_path, capsys):
    """A folder of frames gets timestamps from --fps; an image without a face is one row with success = 0."""
    face = _patch(P.read_image(PHOTO))
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        fr = np.full((128, 160, 3), 90, np.uint8)
        if k != 1:
            fr[16:112, 20 + 10 * k:116 + 10 * k] = face
        cv2.imwrite(str(frames / f"{k:04d}.png"), fr)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 120, 3), 90, np.uint8))
    out = tmp_path / "f.csv"
    assert cli.main(["predict", str(frames), str(blank), "--model", str(run_dir), "--out", str(out), "--fps", "10",
                     "--no-progress"]) == 0
    assert "trained on crops that `aurecog prepare` did not align" in capsys.readouterr().err  # SynthAU ckpt
    csv = pd.read_csv(out)
    assert csv[["frame", "face_id", "timestamp", "success"]].values.tolist() == [
        [1, 0, 0.0, 1], [2, 0, 0.1, 0], [3, 0, 0.2, 1], [1, 0, 0.0, 0]]
    assert csv["source"].tolist() == [str(frames)] * 3 + [str(blank)]
    assert csv.loc[[1, 3], "confidence"].eq(0).all() and csv.loc[[1, 3], "AU01_p"].isna().all()


def test_tracker_keeps_ids_by_overlap():
    t = PR.Tracker()
    assert t.assign(1, [(0, 0, 10, 10), (50, 0, 60, 10)]) == [0, 1]
    assert t.assign(2, [(52, 0, 62, 10), (1, 0, 11, 10)]) == [1, 0]  # order of the detections does not matter
    assert t.assign(3, [(2, 0, 12, 10)]) == [0]
    assert t.assign(4, [(100, 100, 110, 110), (3, 0, 13, 10)]) == [2, 0]  # a new face opens a new id
    assert t.assign(4 + PR.TRACK_MAX_GAP + 1, [(55, 0, 65, 10)]) == [3]  # too long unseen: a new id


class _Fixed(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = torch.as_tensor(logits, dtype=torch.float32)

    def forward(self, batch):
        return {"logits": self.logits[: batch["image"].shape[0]]}


def _stub(kind, names, logits, threshold=2.0):
    cfg = {"model": {"name": "stub"}, "data": {"input_size": 8, "resize": None, "mean": [0.5] * 3, "std": [0.5] * 3}}
    prep = {"image_size": 8, "landmark_layout": "ibug68", "alignment": None}
    return PR.Predictor(_Fixed(logits), cfg, TaskSpec(kind, names, positive_threshold=threshold), prep,
                        torch.device("cpu"))


def test_intensity_and_expression_columns():
    crops, lms = [np.zeros((8, 8, 3), np.uint8)] * 2, [np.zeros((68, 2), np.float32)] * 2
    levels = np.log(np.array([[[0.1, 0.1, 0.2, 0.2, 0.2, 0.2]], [[0.7, 0.2, 0.1, 0, 0, 0]]]) + 1e-12)
    p = _stub("intensity", ["AU6"], levels)
    assert p.columns() == ["AU06_r", "AU06_c", "AU06_p"]
    out = p(crops, lms)
    np.testing.assert_allclose(out["AU06_r"], [0.1 + 0.4 + 0.6 + 0.8 + 1.0, 0.2 + 0.2], atol=1e-5)
    np.testing.assert_allclose(out["AU06_p"], [0.8, 0.1], atol=1e-5)  # P(level >= 2)
    assert out["AU06_c"].tolist() == [1, 0]  # expected intensity >= 2, as the evaluation counts presence
    e = _stub("expression", ["anger", "happiness"], [[0.0, math.log(3)], [math.log(4), 0.0]])
    assert e.columns() == ["p_anger", "p_happiness", "expression"]
    out = e(crops, lms)
    np.testing.assert_allclose(out["p_happiness"], [0.75, 0.2], atol=1e-6)
    assert out["expression"].tolist() == ["happiness", "anger"]


def test_one_line_errors(run_dir, tmp_path, capsys):
    bad_video = tmp_path / "clip.mp4"
    bad_video.write_text("not a video")
    bad_png = tmp_path / "face.png"
    bad_png.write_bytes(b"\x89PNG broken")
    out = str(tmp_path / "o.csv")
    (tmp_path / "empty").mkdir()
    cases = ((bad_video, "cannot read it as an image"), (bad_png, "cannot read the image"),
             (tmp_path / "missing.jpg", "no such file or folder"), (tmp_path / "empty", "folder holds no image"))
    for src, msg in cases:
        assert cli.main(["predict", str(src), "--model", str(run_dir), "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {src}: ") and msg in err and "\n" not in err, err
    # a checkpoint from before the runner stored the preprocessing
    ck = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    del ck["hyper_parameters"]["preprocessing"]
    old = tmp_path / "old.ckpt"
    torch.save(ck, old)
    assert cli.main(["predict", str(PHOTO), "--model", str(old), "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "predates stored preprocessing" in err and "\n" not in err
    assert cli.main(["predict", str(PHOTO), "--model", str(tmp_path / "nope"), "--out", out]) == 2
    assert "no checkpoint" in capsys.readouterr().err
