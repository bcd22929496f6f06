"""BP4D+ through the BP4D reader: only the AU-coded tasks T1/T6/T7/T8, header names AU numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
from fixtures_real import SIZE, check_aligned, make_bp4d

from aurecog import config as C
from aurecog.data import prepare as P
from aurecog.data.prepared import PreparedDataset


def test_bp4dplus(tmp_path):
    src = tmp_path / "BP4D+"
    truth = make_bp4d(src, seqs=(("F001", "T1"), ("F001", "T6"), ("M003", "T8"), ("M003", "T2")), zipped=("F001",),
                      header="bp4dplus", first=1)
    out = P.run("bp4dplus", src, tmp_path / "bp4dplus", workers=1, image_size=SIZE, progress=False)
    ds = PreparedDataset.open(out)
    idx = ds.index
    expect = {k: v for k, v in truth["frames"].items() if k[1] != "T2"}  # T2 is not AU-coded in BP4D+
    assert len(idx) == len(expect) and set(idx["session"]) == {"T1", "T6", "T8"}
    assert (idx["dataset"] == "bp4dplus").all() and ds.meta["name"] == "bp4dplus"
    assert set(idx["subject"]) == {"bp4dplus_F001", "bp4dplus_M003"}  # not BP4D's F001
    for row in idx.itertuples():
        for col, v in expect[(row.subject.removeprefix("bp4dplus_"), row.session, int(row.frame))].items():
            assert getattr(row, col) == v
    rep = pd.read_csv(out / "report.csv")  # the labelled T2 sequence is reported, not dropped in silence
    t2 = rep[rep["file"].str.endswith("M003_T2.csv")]
    assert len(t2) == 1 and t2["kind"].iloc[0] == "excluded" and t2["frames"].iloc[0] == 6
    check_aligned(np.asarray(ds.images), np.asarray(ds.landmarks), (list(range(19, 25)), list(range(25, 31))))
    assert C.load_dataset("bp4d")["protocols"]["to_bp4dplus"] == {"type": "cross_dataset", "test_dataset": "bp4dplus"}
    assert C.load_dataset("bp4dplus")["name"] == "bp4dplus"
