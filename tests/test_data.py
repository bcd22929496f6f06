"""Prepared format, protocols, augmentation and the DataModule."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import BP4D_AUS, dataset_config, make_prepared

from aurecog import config as C
from aurecog.data.datamodule import AUDataModule, DataRootError
from aurecog.data.landmarks import IBUG68_FLIP, flip_permutation, to_intraface49
from aurecog.data.prepared import PreparedDataset, PreparedFormatError, PreparedWriter
from aurecog.data.protocols import ProtocolError, carve_validation, num_folds, split_rows
from aurecog.data.transforms import FaceTransform


# ---------------------------------------------------------------- prepared format
def test_prepared_round_trip(tmp_path):
    root = make_prepared(tmp_path / "d", n_subjects=3, per_subject=4, size=16)
    ds = PreparedDataset.open(root)
    assert len(ds) == 12 and ds.images.shape == (12, 16, 16, 3) and ds.landmarks.shape == (12, 68, 2)
    assert isinstance(ds.images, np.memmap)  # random access, not read into RAM
    assert ds.aus == BP4D_AUS and set(ds.index["subject"]) == {"S00", "S01", "S02"}
    w = PreparedWriter(tmp_path / "e", 2, 8, "intraface49")
    w.images[:] = 7
    w.landmarks[:] = 1.5
    idx = pd.DataFrame({"dataset": ["x", "x"], "subject": ["a", "b"], "session": ["1", "1"], "frame": [0, 1],
                        "AU1": np.array([1, -1], dtype=np.int8)})
    w.finalize(idx, {"name": "e", "aus": ["AU1"], "intensity_aus": [], "expressions": []})
    e = PreparedDataset.open(tmp_path / "e")
    assert (np.asarray(e.images) == 7).all() and e.landmarks.shape == (2, 49, 2)
    assert e.index["AU1"].tolist() == [1, -1] and not (tmp_path / "e.partial").exists()


def test_prepared_rejects_bad_labels_and_incomplete_folders(tmp_path):
    w = PreparedWriter(tmp_path / "bad", 1, 8, "ibug68")
    idx = pd.DataFrame({"dataset": ["x"], "subject": ["a"], "session": ["1"], "frame": [0], "AU1": [9]})
    with pytest.raises(PreparedFormatError, match="AU1 has values \\[9\\]"):
        w.finalize(idx, {"name": "bad", "aus": ["AU1"], "intensity_aus": [], "expressions": []})
    with pytest.raises(PreparedFormatError, match="does not exist"):
        PreparedDataset.open(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(PreparedFormatError, match="COMPLETE"):
        PreparedDataset.open(tmp_path / "half")


# ---------------------------------------------------------------- protocols
def _index(subjects, per=3, datasets=None, expr=None):
    rows = []
    for i, s in enumerate(subjects):
        for j in range(per):
            ds = datasets or ["d"]
            # 3-frame sequences, one expression each
            rows.append({"subject": s, "dataset": ds[i % len(ds)],
                         "expression": (expr[(j // 3) % len(expr)] if expr else -1),
                         "split": "train" if i % 3 else "validation", "session": f"q{j // 3}"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", C.dataset_names())
def test_every_configured_protocol_is_subject_exclusive(name):
    cfg = C.load_dataset(name)
    for pname, proto in cfg["protocols"].items():
        if proto["type"] in ("cross_dataset", "leave_one_dataset_out", "heldout_cells"):
            continue  # other data (tests/test_protocols.py) / not subject-independent by design (IERN MixBasic)
        if proto["type"] == "subject_folds":
            subjects = [s for part in proto["parts"] for s in part]
        elif proto["type"] == "fixed_split" and "train" in proto:
            subjects = list(proto["train"]) + list(proto["test"])
        else:
            subjects = [f"S{i:02d}" for i in range(18)]
        idx = _index(subjects)
        if proto["type"] == "fixed_split" and "column" in proto:  # assign the split column by subject
            train_s = set(subjects[i] for i in range(len(subjects)) if i % 3)
            idx[proto["column"]] = [proto["train_values"][0] if s in train_s else proto["test_values"][0]
                                    for s in idx.subject]
        for fold in range(num_folds(proto)):
            tr, te = split_rows(idx, proto, fold)
            fit, val = carve_validation(idx, tr, 0.15, seed=fold)
            s_fit, s_val, s_te = (set(idx.subject.iloc[r]) for r in (fit, val, te))
            assert s_te and s_fit, (name, pname, fold)
            assert not (s_fit & s_te) and not (s_val & s_te) and not (s_fit & s_val), (name, pname, fold)


def test_subject_kfold_partitions_every_subject_once():
    idx = _index([f"S{i}" for i in range(10)])
    seen = []
    for f in range(3):
        _, te = split_rows(idx, {"type": "subject_kfold", "k": 3}, f)
        seen += sorted(set(idx.subject.iloc[te]))
    assert sorted(seen) == sorted(set(idx.subject))


def test_subject_folds_reject_unlisted_subjects():
    idx = _index(["A", "B", "C", "D"])
    with pytest.raises(ProtocolError, match="in no part"):
        split_rows(idx, {"type": "subject_folds", "parts": [["A"], ["B"], ["C"]]}, 0)


def test_heldout_cells_bias100_and_bias90():
    emotions = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    idx = _index([f"S{i}" for i in range(9)], per=60, datasets=["ckplus", "mmi", "oulu"], expr=list(range(6)))
    proto = C.load_dataset("synth-fermix")["protocols"]["bias100"]
    tests = []
    for f in range(3):
        tr, te = split_rows(idx, proto, f, label_names=emotions)
        assert not set(tr) & set(te)
        held = proto["folds"][f]
        cells = set(zip(idx.dataset.iloc[te], idx.expression.iloc[te]))
        assert cells == {(d, emotions.index(e)) for d, es in held.items() for e in es}
        tests += list(te)
    assert sorted(tests) == list(range(len(idx)))  # the three test sets are disjoint and cover everything
    p90 = C.load_dataset("synth-fermix")["protocols"]["bias90"]
    tr100, te100 = split_rows(idx, proto, 0, label_names=emotions)
    tr90, te90 = split_rows(idx, p90, 0, label_names=emotions)
    # bias90 moves 10% of each held-out cell's *sequences* (3-frame sessions here), whole, into training
    assert set(te90) < set(te100) and len(te100) - len(te90) == pytest.approx(0.1 * len(te100), abs=9)
    seq = idx["subject"] + "/" + idx["session"]
    assert not set(seq.iloc[te90]) & set(seq.iloc[tr90])



def test_in_distribution_sequences_leave_training_whole_and_only_from_seen_cells():
    """heldout_cells ``id_fraction``: that fraction of the sequences of every (dataset, expression) cell that is
    not held out leaves training, whole, as the in-distribution test set; held-out cells and bias90's moved
    sequences are untouched; a protocol without the key is unchanged."""
    from aurecog.data.protocols import in_distribution_rows

    emotions = ["anger", "disgust", "fear", "happiness", "sadness", "surprise"]
    idx = _index([f"S{i}" for i in range(9)], per=60, datasets=["ckplus", "mmi", "oulu"], expr=list(range(6)))
    seq = (idx["subject"] + "/" + idx["session"]).to_numpy()
    for name in ("bias100", "bias90"):
        proto = dict(C.load_dataset("synth-fermix")["protocols"][name])
        assert proto.get("id_fraction", 0) > 0, "the study's preset scores an in-distribution test set"
        for f in range(3):
            tr, te = split_rows(idx, proto, f, label_names=emotions)
            fit, ids = in_distribution_rows(idx, proto, f, tr, emotions)
            assert sorted([*fit, *ids]) == sorted(tr) and not set(fit) & set(ids)
            assert not set(seq[ids]) & set(seq[fit])  # whole sequences
            held = {(d, emotions.index(e)) for d, es in proto["folds"][f].items() for e in es}
            cells = set(zip(idx.dataset.iloc[ids], idx.expression.iloc[ids]))
            assert cells and not cells & held  # only seen cells
            assert len(cells) == 3 * 4  # every seen cell contributes
            for cell in cells:
                in_cell = (idx.dataset.to_numpy()[tr] == cell[0]) & (idx.expression.to_numpy()[tr] == cell[1])
                n_seq = len(set(seq[tr][in_cell]))
                n_out = len(set(seq[ids]) & set(seq[tr][in_cell]))
                assert n_out == max(1, round(proto["id_fraction"] * n_seq)), cell
    plain = {k: v for k, v in C.load_dataset("synth-fermix")["protocols"]["bias100"].items() if k != "id_fraction"}
    tr, _ = split_rows(idx, plain, 0, label_names=emotions)
    fit, ids = in_distribution_rows(idx, plain, 0, tr, emotions)
    assert len(ids) == 0 and (fit == tr).all()
    with pytest.raises(ValueError, match="id_fraction"):
        in_distribution_rows(idx, {**plain, "type": "subject_kfold", "id_fraction": 0.1}, 0, tr, emotions)

# ---------------------------------------------------------------- landmarks and augmentation
def test_flip_permutation_is_an_involution_and_maps_eyes():
    for layout in ("ibug68", "disfa66", "intraface49"):
        perm = flip_permutation(layout)
        assert (perm[perm] == np.arange(len(perm))).all()
    assert IBUG68_FLIP[36] == 45 and IBUG68_FLIP[48] == 54 and IBUG68_FLIP[8] == 8 and IBUG68_FLIP[30] == 30
    p49 = flip_permutation("intraface49")
    assert p49[19] == 28 and p49[22] == 25 and p49[31] == 37  # eye corners, mouth corners (notes 1.6)


def test_horizontal_flip_swaps_left_and_right_landmarks():
    size = 40
    img = np.zeros((size, size, 3), np.uint8)
    lm = np.tile(np.array([[20.0, 20.0]], np.float32), (68, 1))
    lm[36] = (8, 12)  # image-left eye outer corner
    lm[45] = (30, 14)  # image-right eye outer corner
    img[12, 8] = 255
    t = FaceTransform(train=True, crop=size, flip_p=1.0, jitter_p=0.0)
    x, out, flipped = t(img, lm)
    assert flipped
    # after a mirror, row 36 must again be the image-left outer eye corner: the mirror of the old 45
    np.testing.assert_allclose(out[36].numpy(), [size - 1 - 30, 14], atol=1e-4)
    np.testing.assert_allclose(out[45].numpy(), [size - 1 - 8, 12], atol=1e-4)
    # the bright pixel moved with landmark 45 (formerly 36)
    bright = (x[0] > 0.5).nonzero()[0]
    assert (bright[1].item(), bright[0].item()) == (size - 1 - 8, 12)


def test_affine_and_blur_move_landmarks_with_the_image():
    """IERN's recipe adds a random affine (and blur): the landmark of a bright blob still sits on the blob."""
    size = 64
    img = np.zeros((size, size, 3), np.uint8)
    lm = np.tile(np.array([[32.0, 32.0]], np.float32), (68, 1))
    lm[30] = (20, 40)
    img[38:43, 18:23] = 255  # a 5x5 blob centred on landmark 30 (pixel centres 18..22, 38..42)
    t = FaceTransform(train=True, crop=size, flip_p=0.0, jitter_p=0.0, blur={"p": 1.0, "sigma": [0.5, 1.0]},
                      affine={"p": 1.0, "rotate": 10, "translate": 0.1, "scale": [0.8, 1.2], "shear": 8})
    moved = 0
    for _ in range(5):
        x, out, _ = t(img, lm)
        v = x[0].numpy()
        yy, xx = np.mgrid[0:size, 0:size]
        w = np.clip(v + 1, 0, None)  # normalised [-1, 1] -> weights
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        np.testing.assert_allclose(out[30].numpy(), [cx, cy], atol=0.75)
        moved += np.abs(out[30].numpy() - lm[30]).max() > 1.0
    assert moved >= 3  # the affine really moved things


def test_to_intraface49_selection():
    lm = np.arange(68 * 2, dtype=np.float32).reshape(68, 2)
    out = to_intraface49(lm, "ibug68")
    assert out.shape == (49, 2) and (out[0] == lm[17]).all() and (out[31] == lm[48]).all()
    assert (to_intraface49(torch.from_numpy(lm), "ibug68").numpy() == out).all()


# ---------------------------------------------------------------- DataModule
def test_datamodule_batches_stats_and_subject_indices(tmp_path):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=10)
    dm = AUDataModule(dataset_config(), fold=1, data_root=str(tmp_path), input_size=28, batch_size=4,
                      val_fraction=0.2)
    dm.setup()
    idx = pd.read_parquet(tmp_path / "fake" / "index.parquet")
    fit = idx.iloc[dm.split_rows["train"]]
    for j, au in enumerate(BP4D_AUS):
        known = fit[au] >= 0
        assert dm.stats.label_rate[j] == pytest.approx((fit[au][known] == 1).mean())
    assert dm.stats.subjects == sorted(set(fit.subject))
    assert dm.stats.subject_counts == [int((fit.subject == s).sum()) for s in dm.stats.subjects]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28) and batch["landmarks"].shape == (4, 68, 2)
    assert batch["target"].shape == (4, 12) and set(batch["target"].unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert (batch["train_subject"] >= 0).all()
    test_batch = next(iter(dm.test_dataloader()))
    assert (test_batch["train_subject"] == -1).all()  # test subjects are never training subjects
    rows = test_batch["sample"].numpy()
    np.testing.assert_array_equal(test_batch["target"].numpy(), idx.iloc[rows][BP4D_AUS].to_numpy())


def test_datamodule_expression_and_intensity_tasks(tmp_path):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=10, datasets=("a", "b", "c"))
    dm = AUDataModule(dataset_config(confounder="dataset"), task="expression", data_root=str(tmp_path),
                      input_size=28, batch_size=4)
    dm.setup()
    assert dm.task_spec.kind == "expression" and dm.stats.confounders == ["a", "b", "c"] or len(dm.stats.confounders)
    b = next(iter(dm.train_dataloader()))
    assert b["target"].dtype == torch.int64 and (b["confounder"] >= 0).all()
    dm2 = AUDataModule(dataset_config(), task="intensity", data_root=str(tmp_path), input_size=28, batch_size=4)
    dm2.setup()
    assert dm2.task_spec.names == ["AU6", "AU10", "AU12"]
    assert np.asarray(dm2.stats.label_corr).shape == (3, 3)


def test_missing_data_root_explains_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    with pytest.raises(DataRootError, match="aurecog prepare fake"):
        AUDataModule(dataset_config()).setup()
    with pytest.raises(DataRootError, match="does not exist"):
        AUDataModule(dataset_config(), data_root=str(tmp_path)).setup()


def test_meta_json_is_written(tmp_path):
    root = make_prepared(tmp_path / "m", n_subjects=2, per_subject=2)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["format"] == "aurecog-prepared" and meta["n"] == 4 and meta["landmark_layout"] == "ibug68"
