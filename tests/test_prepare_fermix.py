"""CK+/MMI/Oulu-CASIA mix: CK+ emotion/FACS/landmark files, MMI session videos + XML, Oulu folder labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures_real import SIZE, check_aligned, disc_detector, make_ckplus, make_mmi, make_oulu

from aurecog import config as C
from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset
from aurecog.data.protocols import split_rows

EYES68 = (list(range(36, 42)), list(range(42, 48)))


@pytest.fixture(autouse=True)
def fake_detector(monkeypatch):
    monkeypatch.setattr(P, "_DETECTOR", disc_detector)


def _build(root):
    rng = np.random.default_rng(0)
    ck = make_ckplus(root / "CK+", rng)
    mmi = make_mmi(root / "MMI", rng)
    oulu = make_oulu(root / "Oulu-CASIA", rng)
    return ck, mmi, oulu


def test_fermix_labels_frames_and_protocol(tmp_path):
    ck, mmi, oulu = _build(tmp_path / "src")
    out = P.run("fermix", tmp_path / "src", tmp_path / "fermix", workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    idx = ds.index
    assert ds.expressions == ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    expected = {**ck["frames"], **mmi["frames"], **oulu["frames"]}
    assert all(s.startswith(d + "_") for s, d in zip(idx.subject, idx.dataset))
    got = {(r.dataset, r.subject.split("_", 1)[1], r.session, int(r.frame)): ds.expressions[r.expression]
           for r in idx.itertuples()}
    assert got == expected
    assert idx.groupby("dataset").size().to_dict() == {"ckplus": 6, "mmi": 9, "oulu": 18}
    # AUs: the CK+ peak frame only, from the FACS file
    for (subj, seq, f), facs in ck["facs"].items():
        row = idx[(idx.subject == "ckplus_" + subj) & (idx.session == seq) & (idx.frame == f)].iloc[0]
        for a in ds.aus:
            assert row[a] == int(int(a[2:]) in facs)
    peaks = {(s, q, f) for s, q, f in ck["facs"]}
    others = idx[[(r.subject.split("_", 1)[1], r.session, int(r.frame)) not in peaks for r in idx.itertuples()]]
    assert (others[ds.aus].to_numpy() == -1).all()
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), EYES68)
    rep = pd.read_csv(out / "report.csv")
    assert rep["reason"].str.fullmatch("emotion not in the 6-class mix: contempt").sum() == len(ck["contempt"]) == 1
    assert rep["reason"].str.contains("no emotion label").sum() == len(ck["unlabelled"]) == 1
    # the bias100 / bias90 protocols of the config: three disjoint test sets, cells held out per dataset
    cfg = C.load_dataset("fermix")
    tests = []
    for fold in range(3):
        tr, te = split_rows(idx, cfg["protocols"]["bias100"], fold, label_names=ds.expressions)
        held = cfg["protocols"]["bias100"]["folds"][fold]
        for r in idx.iloc[te].itertuples():
            assert ds.expressions[r.expression] in held[r.dataset]
        assert not set(tr) & set(te)
        tests.append(set(te))
    assert not (tests[0] & tests[1]) and not (tests[1] & tests[2])
    assert cfg["protocols"]["bias100"]["folds"][0]["oulu"] == ["fear", "surprise"]


def test_fermix_corrupt_inputs(tmp_path):
    _build(tmp_path / "src")
    src = tmp_path / "src"
    lm = next(iter(sorted((src / "CK+" / "Landmarks" / "S005" / "001").glob("*00005_landmarks.txt"))))
    lm.unlink()
    out = P.run("fermix", src, tmp_path / "o", workers=1, image_size=SIZE, progress=False)
    rep = pd.read_csv(out / "report.csv")
    assert ((rep["file"].str.endswith("S005_001_00000005.png")) & rep["reason"].str.contains(
        "landmark file missing")).sum() == 1
    facs = src / "CK+" / "FACS" / "S011" / "001" / "S011_001_00000005_facs.txt"
    facs.write_text("1 2 3\n")
    with pytest.raises(P.PrepareError, match="S011_001_00000005_facs.txt: line 1 has 3 columns, expected 2"):
        P.run("fermix", src, tmp_path / "o2", workers=1, image_size=SIZE, progress=False)
    with pytest.raises(P.PrepareError, match="no mmi folder"):
        P.run("fermix", src / "CK+", tmp_path / "o3", workers=1, image_size=SIZE, progress=False, parts=["mmi"])
