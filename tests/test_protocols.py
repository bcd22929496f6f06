"""Protocols beyond a single split: fold re-draws, leave-one-dataset-out, the papers' own variants (RE-Net's DISFA,
AC2D's fold-wise cross-dataset tests), and the reported tables' protocol names.

DataModule tests run on tiny SynthAU presets (a few subjects, a dozen frames each) generated into a temporary
cache, so the whole file runs in seconds."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
from helpers import dataset_config, make_prepared

from aurecog import config as C
from aurecog.config import REPO_ROOT
from aurecog.data import synth
from aurecog.data.bp4d import BP4D_AUS
from aurecog.data.datamodule import AUDataModule
from aurecog.data.disfa import DISFA_AUS, DISFA_BENCH_AUS
from aurecog.data.gft import GFT_AUS
from aurecog.data.landmarks import to_intraface49
from aurecog.data.prepared import PreparedDataset, PreparedWriter
from aurecog.data.protocols import (
    ProtocolError,
    carve_validation,
    common_labels,
    cross_dataset_rows,
    num_folds,
    redraw_of,
    split_rows,
)

TINY = {"n_subjects": 6, "sessions_per_subject": 1, "frames_per_session": (10, 12)}
AU_PRESETS = ("synth-bp4d", "synth-bp4dplus", "synth-disfa", "synth-gft")
COMMON_AUS = ["AU1", "AU2", "AU4", "AU6", "AU12"]


def _subject_index(subjects, per=4) -> pd.DataFrame:
    return pd.DataFrame({"subject": np.repeat(subjects, per), "frame": np.arange(len(subjects) * per)})


# ---------------------------------------------------------------- fold re-draws
def test_repeated_kfold_tests_every_subject_once_per_redraw():
    subjects = [f"S{i:02d}" for i in range(17)]
    idx = _subject_index(subjects)
    proto = {"type": "repeated_subject_kfold", "k": 3, "repeats": 4, "seed": 7}
    assert num_folds(proto) == 12
    partitions = []
    for r in range(4):
        tested = []
        for part in range(3):
            fold = r * 3 + part
            assert redraw_of(proto, fold) == (r, part)
            tr, te = split_rows(idx, proto, fold)
            assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(idx)))  # every row, once
            s_tr, s_te = set(idx.subject.iloc[tr]), set(idx.subject.iloc[te])
            assert not s_tr & s_te and len(s_te) in (5, 6)  # subject-exclusive, balanced (17 = 6 + 6 + 5)
            fit, val = carve_validation(idx, tr, 0.15, seed=fold)
            assert not set(idx.subject.iloc[val]) & (s_te | set(idx.subject.iloc[fit]))
            tested += sorted(s_te)
        assert sorted(tested) == subjects  # each subject tested exactly once in this re-draw
        partitions.append(frozenset(frozenset(idx.subject.iloc[split_rows(idx, proto, r * 3 + p)[1]])
                                    for p in range(3)))
    assert len(set(partitions)) == 4  # four different partitions
    again = frozenset(frozenset(idx.subject.iloc[split_rows(idx, proto, 3 + p)[1]]) for p in range(3))
    assert again == partitions[1]  # deterministic
    other = dict(proto, seed=8)
    assert frozenset(frozenset(idx.subject.iloc[split_rows(idx, other, 3 + p)[1]]) for p in range(3)) != again
    with pytest.raises(ProtocolError, match="out of range"):
        split_rows(idx, proto, 12)


# ---------------------------------------------------------------- cross-dataset fold variants (AC2D Table 9)
def test_ac2d_table9_cross_dataset_folds():
    bp4d, gft = C.load_dataset("bp4d"), C.load_dataset("gft")
    parts = bp4d["protocols"]["folds3"]["parts"]
    b_idx = _subject_index([s for p in parts for s in p], per=2)
    g_subj = [f"G{i:02d}" for i in range(12)]
    g_idx = _subject_index(g_subj, per=3)
    g_idx["split"] = np.where(g_idx.subject.isin(g_subj[:9]), "train", "test")
    # BP4D -> GFT: fold k = the folds3 fold-k model, tested on all of GFT
    p = bp4d["protocols"]["to_gft_folds3"]
    assert num_folds(p) == 3
    for k in range(3):
        tr, te = cross_dataset_rows(p, k, b_idx, bp4d["protocols"], g_idx, gft["protocols"])
        assert set(b_idx.subject.iloc[tr]) == {s for j, q in enumerate(parts) if j != k for s in q}
        assert te.tolist() == list(range(len(g_idx)))
    # GFT -> BP4D: one GFT model (official training partition) tested on each BP4D part
    p = gft["protocols"]["to_bp4d_folds3"]
    for k in range(3):
        tr, te = cross_dataset_rows(p, k, g_idx, gft["protocols"], b_idx, bp4d["protocols"])
        assert set(g_idx.subject.iloc[tr]) == set(g_subj[:9])
        assert set(b_idx.subject.iloc[te]) == set(parts[k])
    # the plain protocol is one fold on all rows of both
    tr, te = cross_dataset_rows(bp4d["protocols"]["to_gft"], 0, b_idx, bp4d["protocols"], g_idx, gft["protocols"])
    assert len(tr) == len(b_idx) and len(te) == len(g_idx)
    with pytest.raises(ProtocolError, match="has 3 folds but"):
        cross_dataset_rows(dict(p, folds=2), 0, g_idx, gft["protocols"], b_idx, bp4d["protocols"])
    with pytest.raises(ProtocolError, match="not a protocol of the test dataset"):
        cross_dataset_rows(dict(p, test_protocol="nope"), 0, g_idx, gft["protocols"], b_idx, bp4d["protocols"])


# ---------------------------------------------------------------- leave-one-dataset-out: configs
def test_lodo_configs_hold_each_dataset_out_on_the_common_aus():
    real = {"bp4d": [f"AU{a}" for a in BP4D_AUS], "bp4dplus": [f"AU{a}" for a in BP4D_AUS],
            "disfa": [f"AU{a}" for a in DISFA_BENCH_AUS], "gft": [f"AU{a}" for a in GFT_AUS]}
    assert C.load_dataset("disfa")["labels"] == real["disfa"]
    common = sorted(set.intersection(*map(set, real.values())), key=lambda a: int(a[2:]))
    assert common == COMMON_AUS
    for family, names in (("real", list(real)), ("synth", list(AU_PRESETS))):
        for name in names:
            p = C.load_dataset(name)["protocols"]["lodo"]
            assert p["type"] == "leave_one_dataset_out" and num_folds(p) == 1, (family, name)
            assert sorted(p["train_datasets"]) == sorted(set(names) - {name}), name
            assert p["labels"] == common, name
    presets = {n: [synth.au_name(a) for a in synth.PRESETS[n].aus] for n in AU_PRESETS}
    assert common_labels(presets) == COMMON_AUS
    with pytest.raises(ProtocolError, match="AU9.*synth-bp4d"):
        common_labels(presets, ["AU1", "AU9"], where="x")


# ---------------------------------------------------------------- DataModules on tiny SynthAU presets
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("AURECOG_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def tiny_cfg(name: str, depth: int = 1) -> dict:
    """The dataset config ``name`` on a tiny preset; the datasets its protocols read become tiny too."""
    cfg = copy.deepcopy(C.load_dataset(name))
    cfg["synth_overrides"] = TINY
    if depth:
        for p in cfg["protocols"].values():
            if "test_dataset" in p:
                p["test_dataset"] = tiny_cfg(p["test_dataset"], depth - 1)
            if "train_datasets" in p:
                p["train_datasets"] = [tiny_cfg(d, depth - 1) for d in p["train_datasets"]]
    return cfg


def tiny_index(name: str) -> pd.DataFrame:
    return PreparedDataset.open(synth.generate(name, progress=False, overrides=TINY)).index


def _dm(name: str, protocol: str, fold: int = 0, **kw) -> AUDataModule:
    dm = AUDataModule(tiny_cfg(name), protocol=protocol, fold=fold, batch_size=8, progress=False, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("name", AU_PRESETS)
def test_lodo_datamodule_trains_on_no_frame_of_the_held_out_dataset(tiny_cache, name):
    dm = _dm(name, "lodo")
    held = tiny_index(name)
    others = [n for n in AU_PRESETS if n != name]
    assert dm.task_spec.names == COMMON_AUS
    train = pd.concat([dm.split_index("train"), dm.split_index("val")])
    assert set(train["source_dataset"]) == set(others)
    assert len(train) == sum(len(tiny_index(n)) for n in others)  # every training frame once, none held out
    assert not set(train["subject"]) & set(held["subject"]) and all("/" in s for s in train["subject"])
    assert not set(train["subject"].str.split("/").str[1]) & set(held["subject"])  # raw names too (SN.. vs B..)
    src = dm.split_sources["train"]
    for n in others:  # each training row reads the image and landmarks of its own frame in its source
        part = train[train["source_dataset"] == n]
        assert sorted(part["frame"]) == sorted(tiny_index(n)["frame"])
        own = PreparedDataset.open(synth.generate(n, progress=False, overrides=TINY))
        pos = np.flatnonzero(src.index["source_dataset"].to_numpy() == n)
        for r in pos[[0, len(pos) // 2, -1]]:
            row = src.index.iloc[r]
            local = np.flatnonzero((own.index["subject"] == row["subject"].split("/")[1]).to_numpy()
                                   & (own.index["frame"] == row["frame"]).to_numpy()
                                   & (own.index["session"] == row["session"]).to_numpy())
            assert len(local) == 1
            assert (src.images[r] == own.images[local[0]]).all() and (src.landmarks[r] == own.landmarks[local[0]]).all()
    test = dm.split_index("test")
    assert len(test) == len(held) and (test["subject"].to_numpy() == held["subject"].to_numpy()).all()
    # targets: each source's own occurrence columns, in the common-AU order
    for split, idx in (("train", dm.split_index("train")), ("test", test)):
        t = dm.split_arrays[split]["target"][dm.split_rows[split]]
        assert (t == idx[COMMON_AUS].to_numpy()).all(), split
    fit_s, val_s = set(dm.split_index("train").subject), set(dm.split_index("val").subject)
    assert not fit_s & val_s and val_s
    b = next(iter(dm.train_dataloader()))
    assert b["target"].shape == (8, 5) and b["landmarks"].shape == (8, 68, 2)
    assert dm.stats.subjects == sorted(fit_s)


def test_lodo_mixed_landmark_layouts_and_equal_subject_names(tmp_path):
    """Prepared datasets (not SynthAU): two ibug68 training sets whose subjects share names (S00...) and an
    IntraFace-49 held-out set coding fewer AUs -> 49-point landmarks, namespaced subjects, the common AUs."""
    make_prepared(tmp_path / "a", n_subjects=3, per_subject=4, size=16, seed=1)
    make_prepared(tmp_path / "b", n_subjects=3, per_subject=4, size=16, seed=2)
    w = PreparedWriter(tmp_path / "c", 8, 16, "intraface49")
    w.images[:] = 5
    w.landmarks[:] = np.arange(98, dtype=np.float32).reshape(49, 2)
    idx = pd.DataFrame({"dataset": "c", "subject": np.repeat(["X0", "X1"], 4), "session": "1", "frame": range(8),
                        **{au: np.int8(1) for au in ("AU1", "AU4", "AU24")}})
    w.finalize(idx, {"name": "c", "aus": ["AU1", "AU4", "AU24"], "intensity_aus": [], "expressions": []})
    lodo = {"type": "leave_one_dataset_out", "train_datasets": [dataset_config("a"), dataset_config("b")]}
    dm = AUDataModule(dataset_config("c", protocol=lodo), data_root=str(tmp_path), input_size=16, batch_size=4,
                      val_fraction=0.2, progress=False)
    dm.setup()
    assert dm.task_spec.names == ["AU1", "AU4", "AU24"]  # the common AUs, no list given
    assert dm.landmark_layout == "intraface49"
    src, a = dm.split_sources["train"], PreparedDataset.open(tmp_path / "a")
    assert (src.landmarks[0] == to_intraface49(np.asarray(a.landmarks[0]), "ibug68")).all()
    assert src.landmarks[len(a.index)].shape == (49, 2)  # first row of b
    subjects = set(src.index["subject"])
    assert {"a/S00", "b/S00"} <= subjects and len(subjects) == 6  # equal names, two subjects
    b = next(iter(dm.train_dataloader()))
    assert b["landmarks"].shape[1:] == (49, 2) and b["target"].shape[1] == 3
    assert next(iter(dm.test_dataloader()))["landmarks"].shape[1:] == (49, 2)
    assert set(dm.split_index("test")["subject"]) == {"X0", "X1"}


def test_lodo_rejects_a_label_one_dataset_lacks(tiny_cache):
    cfg = tiny_cfg("synth-gft")
    cfg["protocols"]["lodo"]["labels"] = ["AU1", "AU14"]  # AU14: not a DISFA AU
    with pytest.raises(ProtocolError, match="AU14.*synth-disfa"):
        AUDataModule(cfg, protocol="lodo", progress=False).setup()


def test_repeated_kfold_datamodule_redraw_covers_every_subject(tiny_cache):
    subjects = sorted(set(tiny_index("synth")["subject"]))
    for r in (0, 1):
        tested = []
        for part in range(3):
            dm = _dm("synth", "kfold3_r5", fold=r * 3 + part)
            s_te = set(dm.split_index("test").subject)
            s_tr = set(dm.split_index("train").subject) | set(dm.split_index("val").subject)
            assert not s_te & s_tr and s_te | s_tr == set(subjects)
            tested += sorted(s_te)
        assert sorted(tested) == subjects


def test_renet_disfa_variant_counts_intensity_above_zero_as_occurrence(tiny_cache):
    idx = tiny_index("synth-disfa")
    std, gt0 = _dm("synth-disfa", "kfold3"), _dm("synth-disfa", "kfold3_gt0")
    aus = [synth.au_name(a) for a in synth.DISFA_AUS]
    assert std.task_spec.names == gt0.task_spec.names == aus
    rows = gt0.split_rows["test"]
    ints = idx[[f"{a}_int" for a in aus]].to_numpy()[rows]
    expected = np.where(ints >= 0, ints >= 1, -1)
    assert (gt0.split_arrays["test"]["target"][rows] == expected).all()
    assert (std.split_arrays["test"]["target"][rows] == np.where(ints >= 0, ints >= 2, -1)).all()
    assert ((ints == 1) & (gt0.split_arrays["test"]["target"][rows] == 1)).any()  # the variants really differ
    assert gt0.task_spec.positive_threshold == 1
    inten = _dm("synth-disfa", "kfold3_gt0", task="intensity")
    assert inten.task_spec.names == [synth.au_name(a) for a in synth.DISFA_INTENSITY_AUS]


def test_synth_cross_dataset_fold_variants(tiny_cache):
    b, g = tiny_index("synth-bp4d"), tiny_index("synth-gft")
    b_parts = [sorted(set(b.subject))[i::3] for i in range(3)]
    g_parts = [sorted(set(g.subject))[i::3] for i in range(3)]
    for k in range(3):
        dm = _dm("synth-bp4d", "to_gft_kfold3", fold=k)
        train = set(dm.split_index("train").subject) | set(dm.split_index("val").subject)
        assert train == set(b.subject) - set(b_parts[k]) and len(dm.split_index("test")) == len(g)
        t = dm.split_arrays["test"]["target"][dm.split_rows["test"]]
        unscored = [dm.task_spec.names.index(a) for a in ("AU7", "AU17")]  # BP4D AUs that GFT does not code
        assert (t[:, unscored] == -1).all()
        dm = _dm("synth-gft", "to_bp4d_kfold3", fold=k)
        train = set(dm.split_index("train").subject) | set(dm.split_index("val").subject)
        assert train == set(g.subject) - set(g_parts[k]) and set(dm.split_index("test").subject) == set(b_parts[k])


# ---------------------------------------------------------------- protocol-level label sets and thresholds
def test_protocol_labels_per_task_and_threshold_errors(tmp_path):
    make_prepared(tmp_path / "fake", n_subjects=6, per_subject=4, size=16)
    proto = {"type": "subject_kfold", "k": 3, "labels": {"au": ["AU6", "AU12"], "intensity": None}}
    cfg = dataset_config(protocol=proto, labels=["AU1", "AU6", "AU12"])
    dm = AUDataModule(cfg, data_root=str(tmp_path), progress=False)
    dm.setup()
    assert dm.task_spec.names == ["AU6", "AU12"]
    dm = AUDataModule(cfg, data_root=str(tmp_path), task="intensity", progress=False)
    dm.setup()
    assert dm.task_spec.names == ["AU6", "AU10", "AU12"]  # null: every intensity AU, not the dataset's subset
    plain = AUDataModule(dataset_config(labels=["AU1", "AU6"]), data_root=str(tmp_path), progress=False)
    plain.setup()
    assert plain.task_spec.names == ["AU1", "AU6"]  # no protocol labels: the dataset config's
    bad = dataset_config(protocol={"type": "subject_kfold", "k": 3, "positive_threshold": 1})
    with pytest.raises(C.ConfigError, match="AU1_int"):
        AUDataModule(bad, data_root=str(tmp_path), progress=False).setup()


# ---------------------------------------------------------------- reported tables name our protocols
def _reported() -> pd.DataFrame:
    return pd.concat([pd.read_csv(f) for f in sorted((REPO_ROOT / "results" / "reported").glob("*.csv"))])


def test_every_reported_protocol_is_a_protocol_of_its_dataset():
    rep = _reported()
    for (ds, proto), _ in rep.groupby(["dataset", "protocol"]):
        assert proto in C.load_dataset(ds)["protocols"], (ds, proto)
    # every synth reference mapping points at a protocol the real dataset has
    for name in C.dataset_names():
        ref = C.load_dataset(name).get("reference")
        if ref:
            real = C.load_dataset(ref["dataset"])["protocols"]
            for ours, theirs in ref["protocols"].items():
                assert ours in C.load_dataset(name)["protocols"] and theirs in real, (name, ours, theirs)


def test_renet_disfa_rows_sit_on_renets_protocol():
    rep = _reported()
    renet = rep[rep.paper.str.startswith("Yang & Yin") & (rep.dataset == "disfa")]
    t2 = renet[renet.table == "Table 2"]
    starred = {"JAA", "LP-Net", "SRERL"}  # RE-Net Table 2: '*' = intensity >= 2 as positive
    assert set(t2[t2.model.isin(starred)].protocol) == {"folds3"}
    assert set(t2[~t2.model.isin(starred)].protocol) == {"folds3_gt0"}
    t5 = renet[renet.table == "Table 5"]
    assert set(t5.protocol) == {"folds3_gt0"}
    assert set(t5[t5.model == "renet"].label) - {"mean"} == {f"AU{a}" for a in DISFA_AUS}
    p = C.load_dataset("disfa")["protocols"]["folds3_gt0"]
    assert p["positive_threshold"] == 1 and p["labels"]["intensity"] is None
    assert p["labels"]["au"] == [f"AU{a}" for a in DISFA_BENCH_AUS]
    assert p["parts"] == C.load_dataset("disfa")["protocols"]["folds3"]["parts"]
    ac2d = rep[rep.paper.str.startswith("Shao") & (rep.table == "Table 9")]
    assert set(zip(ac2d.dataset, ac2d.protocol)) == {("bp4d", "to_gft_folds3"), ("gft", "to_bp4d_folds3")}
