"""Aff-Wild2 (ABAW AU track) preparation: annotation txt with -1, cropped_aligned frames, detector landmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures_real import AFFWILD2_AUS, SIZE, check_aligned, disc_detector, make_affwild2

from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset

EYES68 = (list(range(36, 42)), list(range(42, 48)))


@pytest.fixture(autouse=True)
def fake_detector(monkeypatch):
    monkeypatch.setattr(P, "_DETECTOR", disc_detector)


def test_affwild2_labels_split_and_report(tmp_path):
    src = tmp_path / "affwild2"
    truth = make_affwild2(src)
    out = P.run("affwild2", src, tmp_path / "aw", workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    idx = ds.index
    assert ds.aus == [f"AU{a}" for a in AFFWILD2_AUS]
    assert len(idx) == len(truth["labels"])
    for row in idx.itertuples():
        key = (row.subject, int(row.frame))
        assert row.split == truth["split"][key]
        for a, v in truth["labels"][key].items():
            assert getattr(row, a) == v
    assert (idx[ds.aus].to_numpy() == -1).sum() == sum(v == -1 for d in truth["labels"].values() for v in d.values())
    assert sorted(idx["subject"].unique()) == sorted({v for v, _ in truth["labels"]})
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), EYES68)
    rep = pd.read_csv(out / "report.csv")
    assert sorted(rep["reason"]) == sorted(["not annotated (all AUs -1)"] * 3 + ["image missing"] * 3)
    for video, j in truth["no_image"]:
        assert (rep["file"] == str(src / "cropped_aligned" / video / f"{j:05d}.jpg")).any()


def test_affwild2_corrupt_inputs(tmp_path):
    src = tmp_path / "affwild2"
    make_affwild2(src)
    ann = src / "annotations" / "AU_Detection_Challenge" / "Train_Set" / "video5.txt"
    lines = ann.read_text().splitlines()
    lines[3] = "0,1,0"
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(P.PrepareError, match="video5.txt: line 4 has 3 columns, expected 12"):
        P.run("affwild2", src, tmp_path / "o", workers=1, image_size=SIZE, progress=False)
    with pytest.raises(P.PrepareError, match="AU_Detection_Challenge"):
        P.run("affwild2", src / "cropped_aligned", tmp_path / "o", workers=1, image_size=SIZE, progress=False)
