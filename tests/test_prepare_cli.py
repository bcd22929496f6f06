"""`aurecog prepare` through the command line: no label lost or shifted in silence (issue #18).

Each test runs ``python -m aurecog.cli prepare ...`` in a subprocess (or, where a dataset needs the optional face
detector, ``aurecog.cli.main`` with the stand-in detector) on a fixture in the distribution's layout, and checks
the exit code, the one-line error or the report lines and the printed summary against what the fixture wrote.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from fixtures_real import (
    BP4D_AUS,
    assert_one_line_error,
    aurecog,
    make_affwild2,
    make_bp4d,
    make_ckplus,
    make_disfa,
    make_generic,
    make_mmi,
    prepare_cli,
)

from aurecog.data.prepared import PreparedDataset


def _summary(stdout: str) -> dict[str, int]:
    """The counts of the printed summary: found, prepared and the per-kind lines."""
    m = re.search(r"(\d+) frames found, (\d+) prepared", stdout)
    assert m, stdout
    out = {"found": int(m.group(1)), "prepared": int(m.group(2))}
    for label in ("labelled frames without an image", "images without labels"):
        k = re.search(rf"^\[prepare\]\s+(\d+)  {label}$", stdout, re.M)
        assert k, (label, stdout)
        out[label] = int(k.group(1))
    return out


# ---------------------------------------------------------------------------------------------- help, errors
def test_help_lists_datasets_and_option_defaults():
    res = aurecog("prepare", "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for name in ("bp4d", "bp4dplus", "disfa", "gft", "generic", "affwild2", "fermix"):
        assert re.search(rf"^  {name}\b", text, re.M), (name, text)
    for opt in ("positive_threshold=2", "camera=left", "chunk=500", "tasks=T1,T6,T7,T8", "header=names",
                "landmarks_dir=None", "frames=cropped_aligned", "splits=Train_Set,Validation_Set", "unknown=9",
                "parts=ckplus,mmi,oulu", "csv=index.csv"):
        assert opt in text, (opt, text)


def test_structural_error_is_one_line_exit_2_and_debug_shows_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    res = prepare_cli("bp4d", tmp_path / "empty", tmp_path / "o")
    assert_one_line_error(res, "AUCoding/AU_OCC", "folder not found")
    res = prepare_cli("bp4d", tmp_path / "empty", tmp_path / "o", debug=True)
    assert res.returncode == 2 and "Traceback" in res.stderr and "PrepareError" in res.stderr


def test_unknown_option_is_one_line(tmp_path):
    src = tmp_path / "DISFA"
    make_disfa(src, subjects=("SN001",), n_frames=2)
    res = prepare_cli("disfa", src, tmp_path / "o", "positive_treshold=1")
    assert_one_line_error(res, "positive_treshold", "positive_threshold")
    assert_one_line_error(prepare_cli("disfa", src, tmp_path / "o", "chunk=ten"), "chunk=ten", "integer")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- 1. Aff-Wild2
def test_affwild2_annotation_without_header_fails_naming_the_file(tmp_path):
    src = tmp_path / "affwild2"
    make_affwild2(src)
    ok = prepare_cli("affwild2", src, tmp_path / "ok", detector=True, check=True)
    assert _summary(ok.stdout)["labelled frames without an image"] == 3
    ann = src / "annotations" / "AU_Detection_Challenge" / "Train_Set" / "video5.txt"
    ann.write_text("\n".join(ann.read_text().splitlines()[1:]) + "\n")
    res = prepare_cli("affwild2", src, tmp_path / "o", detector=True)
    assert_one_line_error(res, str(ann), "line 1", "header")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- 2. rounding
@pytest.mark.parametrize("dataset", ["bp4d", "generic", "gft"])
def test_non_integer_label_code_fails_naming_file_and_line(tmp_path, dataset):
    src = tmp_path / "src"
    if dataset == "bp4d":
        make_bp4d(src, seqs=(("F001", "T1"),), zipped=())
        path = src / "AUCoding" / "AU_OCC" / "F001_T1.csv"
        lines = path.read_text().splitlines()
        cells = lines[2].split(",")
        cells[1] = "0.6"  # AU1 of the second labelled frame
        where = ("line 3",)
    else:
        make_generic(src)
        path = src / "index.csv"
        lines = path.read_text().splitlines()
        cells = lines[2].split(",")
        cells[4] = "0.6"  # image,subject,frame,split,AU1
        where = ("line 3", "AU1")
    lines[2] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    res = prepare_cli(dataset, src, tmp_path / "o")
    assert_one_line_error(res, str(path), "0.6", *where)


# ---------------------------------------------------------------------------------------------- 3. empty split
def test_affwild2_empty_train_set_fails_naming_the_folder(tmp_path):
    src = tmp_path / "affwild2"
    make_affwild2(src)
    train = src / "annotations" / "AU_Detection_Challenge" / "Train_Set"
    for p in train.glob("*.txt"):
        p.unlink()
    res = prepare_cli("affwild2", src, tmp_path / "o", detector=True)
    assert_one_line_error(res, str(train), "splits=")
    # preparing only the validation videos is possible, and said so
    ok = prepare_cli("affwild2", src, tmp_path / "val", "splits=Validation_Set", detector=True, check=True)
    idx = PreparedDataset.open(tmp_path / "val").index
    assert set(idx["split"]) == {"validation"} and "Validation_Set" in ok.stdout


# ---------------------------------------------------------------------------------------------- 4. CK+ images
def test_ckplus_labelled_sequence_without_images_is_reported(tmp_path):
    src = tmp_path / "src"
    make_ckplus(src / "CK+", np.random.default_rng(0))
    shutil.rmtree(src / "CK+" / "cohn-kanade-images" / "S011" / "001")  # labelled: happiness
    res = prepare_cli("fermix", src, tmp_path / "o", "parts=ckplus", check=True)
    rep = pd.read_csv(tmp_path / "o" / "report.csv")
    hit = rep[rep["file"].str.contains("S011/001") & (rep["kind"] == "no_image")]
    assert len(hit) == 1 and hit["frames"].iloc[0] == 3, rep
    s = _summary(res.stdout)
    assert s["labelled frames without an image"] == 3 and s["prepared"] == 3  # only S005/001 remains
    assert s["images without labels"] == 3  # S011/002 has no emotion file: the 3 frames the mix would take


# ---------------------------------------------------------------------------------------------- 5. BP4D csv
def test_bp4d_sequence_without_occurrence_csv_is_reported_and_counted(tmp_path):
    src = tmp_path / "BP4D"
    truth = make_bp4d(src)
    res = prepare_cli("bp4d", src, tmp_path / "all", check=True)
    s = _summary(res.stdout)
    # per sequence: 4 prepared, 1 labelled frame without an image, 1 without landmarks, 1 image without a label row
    assert s == {"found": 21, "prepared": 12, "labelled frames without an image": 3, "images without labels": 3}
    meta = json.loads((tmp_path / "all" / "meta.json").read_text())
    assert meta["counts"]["found"] == 21 and meta["counts"]["no_landmarks"] == 3
    assert re.search(r"^\s+3\s+3  no landmarks for this frame in the landmark file$", res.stdout, re.M), res.stdout
    (src / "AUCoding" / "AU_OCC" / "F001_T2.csv").unlink()  # an unzipped sequence
    (src / "AUCoding" / "AU_OCC" / "M007_T1.csv").unlink()  # a sequence inside 2D+3D/M007.zip
    res = prepare_cli("bp4d", src, tmp_path / "o", check=True)
    s = _summary(res.stdout)
    n_f001_t2, n_m007_t1 = truth["images"][("F001", "T2")], truth["images"][("M007", "T1")]
    assert s == {"found": 4 + 1 + 1 + 1 + n_f001_t2 + n_m007_t1, "prepared": 4,
                 "labelled frames without an image": 1, "images without labels": 1 + n_f001_t2 + n_m007_t1}
    rep = pd.read_csv(tmp_path / "o" / "report.csv")
    for seq, n in (("F001/T2", n_f001_t2), ("M007/T1", n_m007_t1)):
        hit = rep[rep["file"].str.contains(seq) & rep["reason"].str.contains("no AU occurrence file")]
        assert len(hit) == 1 and hit["frames"].iloc[0] == n and hit["kind"].iloc[0] == "unlabelled", rep


# ---------------------------------------------------------------------------------------------- 6: see above
# ---------------------------------------------------------------------------------------------- 7. fallbacks
def test_bp4dplus_header_numbered_by_position(tmp_path):
    src = tmp_path / "BP4D+"
    truth = make_bp4d(src, seqs=(("F001", "T1"), ("M003", "T8")), zipped=(), header="position", first=1)
    res = prepare_cli("bp4dplus", src, tmp_path / "o")
    assert_one_line_error(res, "F001_T1.csv", "header=position")
    prepare_cli("bp4dplus", src, tmp_path / "o", "header=position", check=True)
    idx = PreparedDataset.open(tmp_path / "o").index
    assert len(idx) == len(truth["frames"])
    for row in idx.itertuples():
        expect = truth["frames"][(row.subject.removeprefix("bp4dplus_"), row.session, int(row.frame))]
        assert [getattr(row, f"AU{a}") for a in BP4D_AUS] == [expect[f"AU{a}"] for a in BP4D_AUS]


def test_mmi_subject_from_the_clip_name_and_cross_checked(tmp_path):
    src = tmp_path / "src"
    make_mmi(src / "MMI", np.random.default_rng(0), subject_id=False, meta_subject=False)
    prepare_cli("fermix", src, tmp_path / "o", "parts=mmi", detector=True, check=True)
    idx = PreparedDataset.open(tmp_path / "o").index
    assert idx.groupby("session")["subject"].first().to_dict() == {"1": "mmi_S001", "2": "mmi_S002",
                                                                  "3": "mmi_S002"}
    sx = src / "MMI" / "Sessions" / "2" / "session.xml"
    sx.write_text('<?xml version="1.0"?>\n<session sessionId="2"><subject id="7" /></session>\n')
    res = prepare_cli("fermix", src, tmp_path / "o2", "parts=mmi", detector=True)
    assert_one_line_error(res, str(sx), "S002-2")


def test_disfa_label_file_numbered_from_zero_fails(tmp_path):
    src = tmp_path / "DISFA"
    make_disfa(src, subjects=("SN001",), n_frames=3)
    for p in (src / "ActionUnit_Labels" / "SN001").glob("*.txt"):
        p.write_text("".join(f"{int(f) - 1},{v}\n" for f, v in (ln.split(",") for ln in p.read_text().split())))
    res = prepare_cli("disfa", src, tmp_path / "o")
    assert_one_line_error(res, "SN001_au", "frame 0", "1-based")


def test_every_option_is_described():
    from aurecog.data import prepare as P

    for name in P.PREPARERS:
        for key, (_default, text) in P.options(name).items():
            assert text, (name, key)
