"""DISFA preparation from a fixture in the distribution's layout (left-camera .avi, per-AU label txt, .mat pts)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures_real import DISFA_AUS, SIZE, check_aligned, make_disfa

from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset

EYES66 = (list(range(36, 42)), list(range(42, 48)))


@pytest.mark.parametrize("threshold", [2, 1])
def test_disfa_frames_labels_threshold_landmarks(tmp_path, threshold):
    src = tmp_path / "DISFA"
    truth = make_disfa(src, drop_landmark={"SN002": 3}, n_frames=6)
    out = P.run("disfa", src, tmp_path / "disfa", workers=1, image_size=SIZE, progress=False,
                positive_threshold=threshold)
    ds = PreparedDataset.open(out)
    idx = ds.index
    assert len(idx) == len(truth["intensity"]) == 11
    assert sorted(idx["subject"].unique()) == ["SN001", "SN002"]
    assert ds.meta["positive_threshold"] == threshold
    assert ds.intensity_aus == ds.aus == [f"AU{a}" for a in DISFA_AUS]
    for row in idx.itertuples():
        inten = truth["intensity"][(row.subject, int(row.frame))]
        for a, v in inten.items():
            assert getattr(row, f"{a}_int") == v
            assert getattr(row, a) == int(v >= threshold)
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), EYES66)
    rep = pd.read_csv(out / "report.csv")
    assert len(rep) == 1 and "landmark file missing" in rep["reason"][0] and "0003_lm" in rep["reason"][0]
    assert "LeftVideoSN002_comp.avi#frame3" in rep["file"][0]


def test_disfa_video_parts_match_one_pass(tmp_path):
    """A video written in several parts (bounded memory) gives the same result as one part."""
    src = tmp_path / "DISFA"
    make_disfa(src, subjects=("SN003",), n_frames=7)
    a = PreparedDataset.open(P.run("disfa", src, tmp_path / "a", workers=1, image_size=SIZE, progress=False))
    b = PreparedDataset.open(P.run("disfa", src, tmp_path / "b", workers=2, image_size=SIZE, progress=False, chunk=3))
    pd.testing.assert_frame_equal(a.index, b.index)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    check_aligned(np.asarray(b.images), np.asarray(b.landmarks), EYES66)


def test_disfa_corrupt_inputs(tmp_path):
    src = tmp_path / "DISFA"
    make_disfa(src, n_frames=4)
    # labels beyond the end of the video: unreadable frames are reported, naming the video
    lab = src / "ActionUnit_Labels" / "SN001" / "SN001_au1.txt"
    lab.write_text(lab.read_text() + "5,0\n")
    for a in DISFA_AUS[1:]:
        p = src / "ActionUnit_Labels" / "SN001" / f"SN001_au{a}.txt"
        p.write_text(p.read_text() + "5,0\n")
    lm_dir = src / "Landmark_Points" / "SN001" / "tmp_frame_lm"
    (lm_dir / "SN001_0004_lm.txt").write_text("\n".join("1 2" for _ in range(66)))
    # a corrupt landmark .mat -> report line naming it
    bad_mat = next(iter(sorted((src / "Landmark_Points" / "SN002" / "tmp_frame_lm").glob("*.mat"))))
    bad_mat.write_bytes(b"garbage")
    out = P.run("disfa", src, tmp_path / "o", workers=1, image_size=SIZE, progress=False)
    rep = pd.read_csv(out / "report.csv")
    assert any("LeftVideoSN001_comp.avi#frame4" in f and "video ended" in r for f, r in zip(rep["file"], rep["reason"]))
    assert any(bad_mat.name in r for r in rep["reason"])
    assert len(PreparedDataset.open(out).index) == 8 - 1
    # label file with a wrong column count -> error naming the file
    lab.write_text("1,0,3\n")
    with pytest.raises(P.PrepareError, match="SN001_au1.txt: line 1 has 3 columns, expected 2"):
        P.run("disfa", src, tmp_path / "o2", workers=1, image_size=SIZE, progress=False)
    # wrong folder
    with pytest.raises(P.PrepareError, match="Videos_LeftCamera"):
        P.run("disfa", src / "ActionUnit_Labels", tmp_path / "o3", workers=1, image_size=SIZE, progress=False)


def test_disfa_prepared_feeds_the_datamodule(tmp_path):
    """The shipped disfa config (3-fold partition, 8 benchmark AUs) on a prepared fixture: fold 0 tests part 1."""
    from aurecog import config as C
    from aurecog.data.datamodule import AUDataModule

    cfg = C.load_dataset("disfa")
    parts = cfg["protocols"]["folds3"]["parts"]
    subjects = (parts[0][0], parts[1][0], parts[2][0])
    make_disfa(tmp_path / "src", subjects=subjects, n_frames=3)
    P.run("disfa", tmp_path / "src", tmp_path / "root" / "disfa", workers=1, image_size=SIZE, progress=False)
    cfg["protocols"]["folds3"]["require_all"] = False
    dm = AUDataModule(cfg, fold=0, data_root=str(tmp_path / "root"), input_size=40, val_fraction=0.0)
    dm.setup()
    assert dm.task_spec.names == ["AU1", "AU2", "AU4", "AU6", "AU9", "AU12", "AU25", "AU26"]
    test_subj = set(dm.split_sources["test"].index["subject"].iloc[dm.split_rows["test"]])
    assert test_subj == {parts[0][0]} and len(dm.split_rows["train"]) == 6
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[-1] == 40 and batch["landmarks"].shape[1:] == (66, 2)
