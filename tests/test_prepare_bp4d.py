"""BP4D preparation from a fixture in the distribution's layout (AU_OCC/AU_INT csv, 2DFeatures .mat, 2D+3D)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fixtures_real import BP4D_AUS, SIZE, check_aligned, make_bp4d

from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset


def _key(row):
    return (row.subject, row.session, int(row.frame))


def _report(out):
    return pd.read_csv(out / "report.csv")


@pytest.mark.parametrize("mat", [True, False], ids=["mat", "text-alternative"])
def test_bp4d_prepares_labels_landmarks_and_reports(tmp_path, mat):
    src = tmp_path / "BP4D"
    truth = make_bp4d(src, mat=mat)
    out = P.run("bp4d", src, tmp_path / "prepared" / "bp4d", workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    assert ds.aus == [f"AU{a}" for a in BP4D_AUS]
    assert ds.intensity_aus == ["AU6", "AU10", "AU12", "AU14", "AU17"]
    assert ds.meta["landmark_layout"] == "intraface49" and ds.meta["image_size"] == SIZE
    idx = ds.index
    assert len(idx) == len(truth["frames"])
    assert sorted(idx["subject"].unique()) == ["F001", "M007"]  # M007 read from 2D+3D/M007.zip
    for row in idx.itertuples():
        expect = truth["frames"][_key(row)]
        for col, v in expect.items():
            assert getattr(row, col) == v, (col, _key(row))
    unknown = sum(v == -1 for e in truth["frames"].values() for k, v in e.items() if not k.endswith("_int"))
    assert (idx[[f"AU{a}" for a in BP4D_AUS]].to_numpy() == -1).sum() == unknown
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), (list(range(19, 25)), list(range(25, 31))))
    # landmarks = the shipped ones under the same similarity transform: check pairwise distance ratios
    for i, row in enumerate(idx.itertuples()):
        src_lm = truth["lm68"][_key(row)]
        d_src = np.linalg.norm(src_lm[36:42].mean(0) - src_lm[42:48].mean(0))
        d_out = np.linalg.norm(ds.landmarks[i, 19] - ds.landmarks[i, 30])
        d_src2 = np.linalg.norm(src_lm[36] - src_lm[47])
        assert abs(d_out / d_src2 - 0.3 * SIZE / d_src) < 1e-3
    rep = _report(out)
    files = " ".join(rep["file"].astype(str))
    for _subj, _task, f in truth["no_landmarks"]:
        assert f"{f:04d}.jpg" in files
    for subj, task, f in truth["no_image"]:
        assert f"{subj}/{task}/{f}" in files
    assert rep["reason"].str.contains("not coded").sum() == 3
    assert ds.meta["n_reported"] == len(rep)


def test_bp4d_parallel_equals_serial(tmp_path):
    src = tmp_path / "BP4D"
    make_bp4d(src)
    a = PreparedDataset.open(P.run("bp4d", src, tmp_path / "a", workers=1, image_size=SIZE, progress=False))
    b = PreparedDataset.open(P.run("bp4d", src, tmp_path / "b", workers=2, image_size=SIZE, progress=False))
    pd.testing.assert_frame_equal(a.index, b.index)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_bp4d_resumes_after_interruption(tmp_path, monkeypatch):
    src = tmp_path / "BP4D"
    make_bp4d(src)
    out = tmp_path / "bp4d"

    def boom(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(P, "_merge", boom)
        with pytest.raises(KeyboardInterrupt):
            P.run("bp4d", src, out, workers=1, image_size=SIZE, progress=False)
    work = tmp_path / "bp4d.work"
    done = sorted(work.glob("*.done"))
    assert len(done) == 3 and not out.exists()
    done[0].unlink()  # as if the run died while processing this chunk (F001_T1)
    occ = src / "AUCoding" / "AU_OCC" / "M007_T1.csv"  # a corrected label file invalidates its chunk only
    lines = occ.read_text().splitlines()
    cells = lines[1].split(",")
    cells[1] = "1" if cells[1] == "0" else "0"
    lines[1] = ",".join(cells)
    occ.write_text("\n".join(lines) + "\n")
    calls = []
    real = P.iter_job_parts
    monkeypatch.setattr(P, "iter_job_parts", lambda job, s: calls.append(job.key) or real(job, s))
    P.run("bp4d", src, out, workers=1, image_size=SIZE, progress=False)
    assert sorted(k.split("#")[0] for k in calls) == ["bp4d/F001_T1", "bp4d/M007_T1"]
    assert not work.exists()
    ref = PreparedDataset.open(P.run("bp4d", src, tmp_path / "ref", workers=1, image_size=SIZE, progress=False))
    pd.testing.assert_frame_equal(PreparedDataset.open(out).index, ref.index)


def test_bp4d_corrupt_inputs(tmp_path):
    src = tmp_path / "BP4D"
    make_bp4d(src)
    # unreadable frame -> report line naming the file
    bad = src / "2D+3D" / "F001" / "T1" / "0012.jpg"
    bad.write_bytes(b"not a jpeg")
    # missing landmark file -> report lines naming it
    (src / "2DFeatures" / "F001_T2.mat").unlink()
    out = P.run("bp4d", src, tmp_path / "o", workers=1, image_size=SIZE, progress=False)
    rep = _report(out)
    assert ((rep["file"] == str(bad)) & (rep["reason"] == "unreadable image")).sum() == 1
    miss = rep[rep["reason"].str.contains("landmark file missing")]
    assert len(miss) == 5 and miss["reason"].str.contains("F001_T2.mat").all()
    # label file with a wrong column count -> error naming the file
    occ = src / "AUCoding" / "AU_OCC" / "M007_T1.csv"
    lines = occ.read_text().splitlines()
    lines[2] = ",".join(lines[2].split(",")[:-1])
    occ.write_text("\n".join(lines) + "\n")
    with pytest.raises(P.PrepareError, match="M007_T1.csv: line 3 has 40 columns, expected 41"):
        P.run("bp4d", src, tmp_path / "o2", workers=1, image_size=SIZE, progress=False)
    # wrong folder -> error naming the expected folder
    with pytest.raises(P.PrepareError, match="AU_OCC"):
        P.run("bp4d", src / "2D+3D", tmp_path / "o3", workers=1, image_size=SIZE, progress=False)
