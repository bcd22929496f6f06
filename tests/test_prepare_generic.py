"""The generic CSV layout (and GFT through it): landmark columns, landmark files, the optional detector."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures_real import SIZE, check_aligned, disc_detector, make_generic

from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset

EYES68 = (list(range(36, 42)), list(range(42, 48)))


@pytest.mark.parametrize("landmarks", ["columns", "file"])
@pytest.mark.parametrize("dataset", ["generic", "gft"])
def test_generic_csv(tmp_path, landmarks, dataset):
    src = tmp_path / "src"
    truth = make_generic(src, landmarks=landmarks)
    out = P.run(dataset, src, tmp_path / dataset, workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    assert ds.meta["name"] == dataset and ds.meta["landmark_layout"] == "ibug68"
    assert ds.aus == [f"AU{a}" for a in (1, 2, 4, 6, 10, 12, 14, 15, 23, 24)]
    idx = ds.index
    assert len(idx) == len(truth["rows"]) == 9
    expect = pd.DataFrame(truth["rows"])
    got = idx[["subject", "frame"] + ds.aus].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expect[["subject", "frame"] + ds.aus], check_dtype=False)
    assert (idx["split"] == np.where(idx["subject"] == "s3", "test", "train")).all()
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), EYES68)
    assert not pd.read_csv(out / "report.csv").shape[0]


def test_generic_detector_path(tmp_path, monkeypatch):
    src = tmp_path / "src"
    truth = make_generic(src, landmarks="none", split=False)
    monkeypatch.setattr(P, "_DETECTOR", None)
    import builtins

    real_import = builtins.__import__

    def no_dlib(name, *a, **k):
        if name in ("dlib", "face_recognition_models"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with pytest.raises(P.PrepareError, match="pip install dlib-bin face-recognition-models"):
        P.run("generic", src, tmp_path / "g", workers=1, image_size=SIZE, progress=False)
    monkeypatch.setattr(builtins, "__import__", real_import)
    monkeypatch.setattr(P, "_DETECTOR", disc_detector)
    # one frame without a face: the detector finds nothing -> reported
    blank = src / "images" / "s2" / "001.png"
    import cv2

    cv2.imwrite(str(blank), np.zeros((40, 40, 3), np.uint8))
    out = P.run("generic", src, tmp_path / "g", workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    assert len(ds.index) == len(truth["rows"]) - 1
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), EYES68, tol=0.05)
    rep = pd.read_csv(out / "report.csv")
    assert rep.to_dict("records") == [{"file": str(blank), "reason": "no face detected", "kind": "no_landmarks",
                                       "frames": 1}]


def test_generic_corrupt_inputs(tmp_path):
    src = tmp_path / "src"
    make_generic(src, landmarks="file")
    (src / "images" / "s1" / "000.png").write_bytes(b"\x89PNG broken")
    (src / "landmarks" / "s2" / "002.pts").unlink()
    out = P.run("generic", src, tmp_path / "g", workers=1, image_size=SIZE, progress=False)
    rep = pd.read_csv(out / "report.csv")
    assert set(zip(rep["file"], rep["reason"])) == {
        (str(src / "images" / "s1" / "000.png"), "unreadable image"),
        (str(src / "images" / "s2" / "002.png"), f"landmark file missing: {src / 'landmarks' / 's2' / '002.pts'}"),
    }
    csv = src / "index.csv"
    lines = csv.read_text().splitlines()
    bad = lines.copy()
    bad[3] += ",extra"
    csv.write_text("\n".join(bad) + "\n")
    with pytest.raises(P.PrepareError, match="index.csv: line 4 has 16 columns, expected 15"):
        P.run("generic", src, tmp_path / "g2", workers=1, image_size=SIZE, progress=False)
    bad = lines.copy()
    bad[2] = bad[2].replace(",s1,1,train,", ",s1,1,train,7,", 1).rsplit(",", 1)[0]
    csv.write_text("\n".join(bad) + "\n")
    with pytest.raises(P.PrepareError, match="line 3, column AU1: value 7"):
        P.run("generic", src, tmp_path / "g3", workers=1, image_size=SIZE, progress=False)
    with pytest.raises(P.PrepareError, match="index CSV not found"):
        P.run("gft", src / "images", tmp_path / "g4", workers=1, image_size=SIZE, progress=False)
