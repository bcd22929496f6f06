"""SynthAU: determinism, label/landmark consistency, presets, habits, fermix biases, contact sheet.

Rendering tests use tiny preset overrides; label-only tests use :func:`synth.label_table` on full presets
(no rendering), so the whole file runs in a few seconds.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from aurecog.data import synth
from aurecog.data.landmarks import IBUG68_FLIP
from aurecog.data.prepared import UNKNOWN, PreparedDataset

TINY = {"n_subjects": 3, "sessions_per_subject": 1, "frames_per_session": (10, 12)}
TINY_FER = {"n_subjects": 1}


def tiny(preset: str) -> dict:
    return TINY_FER if preset == "synth-fermix" else TINY


# ---------------------------------------------------------------- helpers


def face_frame(lm: np.ndarray) -> np.ndarray:
    """Landmarks in a face-aligned frame: eye-corner line horizontal, unit inter-ocular distance, origin at the
    nose bridge top. Removes roll, translation and scale so that AU geometry can be compared across frames."""
    left, right = lm[..., 36, :], lm[..., 45, :]
    d = right - left
    scale = np.linalg.norm(d, axis=-1, keepdims=True)
    c, s = (d / scale)[..., 0], (d / scale)[..., 1]
    rot = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)  # rows: x axis, y axis
    rel = lm - lm[..., 27:28, :]
    return np.einsum("...ij,...pj->...pi", rot, rel) / scale[..., None]


def neutral_and_posed(au: int, level: float = 5.0):
    ident = synth.sample_identity(np.random.default_rng(3), family=0)
    ident.glasses, ident.beard = False, 0.0
    zero = np.zeros(len(synth.ALL_AUS))
    posed = zero.copy()
    posed[synth.ALL_AUS.index(au)] = level
    fp = synth.FrameParams()
    img0, lm0 = synth.render_face(ident, zero, fp, 128)
    img1, lm1 = synth.render_face(ident, posed, fp, 128)
    return img0, lm0, img1, lm1


# ---------------------------------------------------------------- API, caching, determinism


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="synth-bp4d"):
        synth.generate("bp4d-real")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("AURECOG_CACHE", str(tmp_path))
    assert synth.default_cache_dir() == tmp_path / "synth"
    monkeypatch.delenv("AURECOG_CACHE")
    assert synth.default_cache_dir().parts[-2:] == ("cache", "synth")
    assert (synth.default_cache_dir().parent.parent / "aurecog" / "data" / "synth.py").exists()


def test_generation_is_deterministic_and_cached(tmp_path):
    a = synth.generate("synth", seed=1, cache_dir=tmp_path / "a", progress=False, overrides=TINY)
    b = synth.generate("synth", seed=1, cache_dir=tmp_path / "b", progress=False, overrides=TINY)
    assert a.name.startswith("synth-seed1-v") and a.name == b.name
    assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    assert (a / "landmarks.npy").read_bytes() == (b / "landmarks.npy").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a / "index.parquet"), pd.read_parquet(b / "index.parquet"))
    # reused, not regenerated
    stamp = (a / "images.npy").stat().st_mtime_ns
    assert synth.generate("synth", seed=1, cache_dir=tmp_path / "a", progress=False, overrides=TINY) == a
    assert (a / "images.npy").stat().st_mtime_ns == stamp
    # another seed is another dataset
    c = synth.generate("synth", seed=2, cache_dir=tmp_path / "a", progress=False, overrides=TINY)
    assert c != a and (c / "images.npy").read_bytes() != (a / "images.npy").read_bytes()
    # the fingerprint is the content: same preset and seed give the same one, another seed another
    fa, fb, fc = (PreparedDataset.open(p).fingerprint for p in (a, b, c))
    assert fa == fb != fc


@pytest.mark.parametrize("preset", list(synth.PRESETS))
def test_presets_write_valid_prepared_folders(preset, tmp_path):
    pre = synth.PRESETS[preset]
    ds = PreparedDataset.open(synth.generate(preset, cache_dir=tmp_path, progress=False, overrides=tiny(preset)))
    meta, idx = ds.meta, ds.index
    assert meta["preset"] == preset and meta["seed"] == 0 and meta["generator_version"] == synth.GENERATOR_VERSION
    assert meta["aus"] == [f"AU{a}" for a in pre.aus]
    assert meta["intensity_aus"] == [f"AU{a}" for a in pre.intensity_aus]
    assert meta["label_type"] == pre.label_type
    assert set(idx["dataset"]) == set(meta["datasets"])
    assert set(meta["habits"]) == set(idx["subject"])
    assert ds.images.shape == (len(idx), pre.image_size, pre.image_size, 3)
    assert idx["habit_active"].dtype == bool
    lm = np.asarray(ds.landmarks)
    assert np.isfinite(lm).all() and lm.min() >= 0 and lm.max() <= pre.image_size - 1
    # frames of a session are consecutive samples
    for _, g in idx.groupby(["subject", "session"]):
        assert (np.diff(g["frame"].to_numpy()) == 1).all()
    if pre.fer_sources:
        assert meta["expressions"] == list(synth.FER_EXPRESSIONS) and (idx["expression"] >= 0).all()
    else:
        assert meta["expressions"][0] == "neutral" and len(meta["expressions"]) == 8
    if preset == "synth-affwild2":
        assert set(idx["split"]) == {"train", "validation"}
        assert idx.groupby("subject")["split"].nunique().max() == 1


def test_label_only_table_matches_generated_index(tmp_path):
    ds = PreparedDataset.open(synth.generate("synth-bp4d", cache_dir=tmp_path, progress=False, overrides=TINY))
    idx, meta = synth.label_table("synth-bp4d", overrides=TINY)
    pd.testing.assert_frame_equal(idx, ds.index)
    assert meta["habits"] == ds.meta["habits"]


# ---------------------------------------------------------------- labels vs rendered geometry


def test_each_au_moves_its_region_and_scales_with_intensity():
    lm = {}
    for au in synth.ALL_AUS:
        img0, lm0, img1, lm1 = neutral_and_posed(au)
        _, _, img_weak, _ = neutral_and_posed(au, 1.0)
        lm[au] = (lm0, lm1)
        strong = np.abs(img1.astype(int) - img0).sum()
        weak = np.abs(img_weak.astype(int) - img0).sum()
        assert 0 < weak < strong, f"AU{au}: effect must be visible and grow with intensity"
    dy = {au: (b - a)[:, 1] for au, (a, b) in lm.items()}
    dx = {au: (b - a)[:, 0] for au, (a, b) in lm.items()}
    assert dy[1][[21, 22]].max() < -1 and abs(dy[1][[17, 26]]).max() < 0.5  # inner brows up
    assert dy[2][[17, 26]].max() < -1 and dy[2][[17, 26]].mean() < dy[2][[21, 22]].mean()  # outer brows up
    assert dy[4][[21, 22]].min() > 1 and dx[4][21] > 0 > dx[4][22]  # brows down and together
    assert dy[5][[37, 38, 43, 44]].max() < -0.5  # upper lids up
    assert dy[6][[40, 41, 46, 47]].max() < -0.3 and dy[7][[40, 41, 46, 47]].max() < -0.3  # lower lids up
    assert dy[9][[31, 33, 35]].max() < -0.5  # nose base up
    assert dy[10][[50, 51, 52]].max() < -1  # upper lip up
    assert dy[12][[48, 54]].max() < -1 and dx[12][48] < 0 < dx[12][54]  # corners up and out
    assert dx[14][48] > 0 > dx[14][54]  # corners in
    assert dy[15][[48, 54]].min() > 1  # corners down
    assert dy[17][[56, 57, 58]].max() < -0.5  # lower lip up
    assert dx[20][48] < -1 and dx[20][54] > 1  # corners stretched
    width = {au: lm[au][1][54, 0] - lm[au][1][48, 0] for au in lm}
    assert width[23] < width[1] - 0.5  # narrower mouth
    assert (lm[24][1][57, 1] - lm[24][1][51, 1]) < (lm[1][1][57, 1] - lm[1][1][51, 1]) - 0.5  # thinner lips
    assert dy[25][66] > 0.5 and dy[26][8] > 2  # lips part; jaw drops


def test_textures_are_localised():
    """Furrows/wrinkles appear where FACS puts them: compare the changed pixels' centre with the landmarks."""
    regions = {4: (21, 22), 9: (27, 28, 29), 14: (48, 54), 17: (7, 8, 9, 57), 1: (19, 20, 21, 22, 23, 24)}
    for au, points in regions.items():
        img0, lm0, img1, _ = neutral_and_posed(au)
        diff = np.abs(img1.astype(int) - img0).sum(-1)
        ys, xs = np.nonzero(diff > 10)
        centre = np.array([xs.mean(), ys.mean()])
        target = lm0[list(points)].mean(0)
        assert np.linalg.norm(centre - target) < 0.12 * 128, f"AU{au} effect centred at {centre}, expected {target}"


def test_landmarks_agree_with_labels_across_a_dataset():
    _, lm, idx, meta = synth.synthesize("synth-disfa", overrides={"n_subjects": 4, "frames_per_session": (80, 80)})
    f = face_frame(lm.astype(float))
    gap = f[:, [65, 66, 67], 1].mean(1) - f[:, [61, 62, 63], 1].mean(1)
    open_ = (idx["AU25_int"] >= 2) | (idx["AU26_int"] >= 2)
    rest = idx[[f"{a}_int" for a in meta["intensity_aus"]]].eq(0).all(axis=1)
    assert open_.sum() > 20 and rest.sum() > 20
    assert gap[open_].mean() > gap[rest].mean() + 0.04
    assert np.median(gap[open_]) > np.percentile(gap[rest], 95)
    corner = f[:, [48, 54], 1].mean(1) - f[:, 33, 1]  # corner height below the nose base (face units)
    smile = (idx["AU12_int"] >= 2) & (idx["AU15_int"] == 0)
    frown = (idx["AU15_int"] >= 2) & (idx["AU12_int"] == 0)
    assert smile.sum() > 10 and frown.sum() > 10
    assert corner[smile].mean() < corner[frown].mean() - 0.05


def test_disfa_occurrence_is_intensity_threshold():
    idx, meta = synth.label_table("synth-disfa")
    assert meta["positive_threshold"] == 2 and meta["label_type"] == "intensity"
    assert len(meta["aus"]) == 8 and len(meta["intensity_aus"]) == 12
    for au in meta["aus"]:
        np.testing.assert_array_equal(idx[au].to_numpy(), (idx[f"{au}_int"] >= 2).astype(np.int8))
    assert (idx[[f"{a}_int" for a in meta["intensity_aus"]]].to_numpy() >= 1).mean() > 0.05


def test_unknown_labels_come_in_runs():
    idx, meta = synth.label_table("synth-bp4d")
    lab = idx[meta["aus"]].to_numpy()
    frac = (lab == UNKNOWN).mean()
    assert 0.01 < frac < 0.04
    # coder gaps are runs: an unknown entry's neighbour frame in the same session is mostly unknown too
    same = (idx["session"].to_numpy()[1:] == idx["session"].to_numpy()[:-1])[:, None]
    unk = lab == UNKNOWN
    assert (unk[1:] & unk[:-1] & same).sum() > 0.7 * unk.sum()
    # an unknown occurrence also hides the intensity of the same AU
    assert (idx.loc[idx["AU12"] == UNKNOWN, "AU12_int"] == UNKNOWN).all()
    aw, aw_meta = synth.label_table("synth-affwild2")
    assert (aw[aw_meta["aus"]].to_numpy() == UNKNOWN).mean() > 2 * frac


def test_expression_labels_match_aus():
    idx, meta = synth.label_table("synth-disfa")
    ints = idx[[f"{a}_int" for a in meta["intensity_aus"]]]
    neutral = idx["expression"] == meta["expressions"].index("neutral")
    assert neutral.sum() > 10 and (ints[neutral] == 0).all().all()  # a neutral face shows no AU
    happy = idx["expression"] == meta["expressions"].index("happiness")
    surprise = idx["expression"] == meta["expressions"].index("surprise")
    assert (idx.loc[happy, "AU12_int"] >= 1).mean() > 0.6 > (idx.loc[surprise, "AU12_int"] >= 1).mean()
    assert (idx.loc[surprise, "AU26_int"] >= 1).mean() > 0.6 > (idx.loc[happy, "AU26_int"] >= 1).mean()


def test_labels_are_temporally_coherent():
    idx, meta = synth.label_table("synth-bp4d")
    for _, g in list(idx.groupby(["subject", "session"]))[:20]:
        ints = g[[f"{a}_int" for a in meta["intensity_aus"]]].to_numpy().astype(int)
        ints = np.where(ints < 0, 0, ints)
        assert np.abs(np.diff(ints, axis=0)).max() <= 3
        expr = g["expression"].to_numpy()
        runs = np.diff(np.flatnonzero(np.diff(expr) != 0))
        assert len(runs) == 0 or np.median(runs) >= 4


# ---------------------------------------------------------------- habits and the subject confounder


def test_habits_in_meta_agree_with_labels():
    idx, meta = synth.label_table("synth")
    aus = set(meta["aus"])
    checked_suppress = checked_add = 0
    for subject, h in meta["habits"].items():
        rows = idx[idx["subject"] == subject]
        for au in set(h["suppresses"]) & aus:
            assert (rows[au] != 1).all(), f"{subject} never shows {au}"
            checked_suppress += 1
        for trigger, added in h["adds"].items():
            for au in set(added) & aus - set(h["suppresses"]):
                if trigger in aus:
                    on = rows[(rows[trigger] == 1) & (rows[au] != UNKNOWN)]
                    assert (on[au] == 1).all(), f"{subject}: {trigger} should bring {au}"
                    checked_add += len(on) > 0
        assert (rows["habit_group"] == h["group"]).all()
    assert checked_suppress >= 3 and checked_add >= 6
    assert idx["habit_active"].any() and not idx["habit_active"].all()


def test_habit_active_flags_only_frames_a_habit_can_change():
    """For add-only habit groups, a frame's labels can only change while a trigger AU is present."""
    idx, meta = synth.label_table("synth")
    n_flagged, per_group = 0, {}
    for subject, h in meta["habits"].items():
        if h["suppresses"]:
            continue
        rows = idx[idx["subject"] == subject]
        triggered = (rows[list(h["adds"])] == 1).any(axis=1)
        assert not (rows["habit_active"] & ~triggered).any(), subject
        n_flagged += rows["habit_active"].sum()
        g = per_group.setdefault(h["group_name"], [0, 0])
        g[0], g[1] = g[0] + int(rows.loc[triggered, "habit_active"].sum()), g[1] + int(triggered.sum())
    # and a trigger does change labels in most frames (the added AUs are rarely present on their own); pooled
    # over a group's subjects: a 2 x 35-frame subject may see only a few triggers, all inside episodes that
    # already show the added AUs
    for name, (changed, triggered) in per_group.items():
        assert triggered > 100 and changed / triggered > 0.5, (name, changed, triggered)
    assert n_flagged > 100


def test_each_fold_tests_a_contrarian_with_contradicting_habits():
    idx, meta = synth.label_table("synth")
    subjects = sorted(idx["subject"].unique())
    habits = meta["habits"]
    for k in range(3):
        test = [s for i, s in enumerate(subjects) if i % 3 == k]
        train = [s for i, s in enumerate(subjects) if i % 3 != k]
        contrarians = [s for s in test if habits[s]["contrarian"]]
        assert contrarians, f"fold {k} has no contrarian test subject"
        train_groups = {habits[s]["group"] for s in train}
        for c in contrarians:
            assert habits[c]["group"] not in train_groups
            look_alikes = [s for s in train if habits[s]["appearance_family"] == habits[c]["appearance_family"]]
            assert look_alikes, "the contrarian must look like some training subjects"
            # a co-occurrence that holds for the look-alike training subjects is broken for the contrarian
            gaps = []
            for trig in meta["aus"]:
                for tgt in meta["aus"]:
                    if trig == tgt:
                        continue
                    tr = idx[idx["subject"].isin(look_alikes) & (idx[trig] == 1)]
                    te = idx[(idx["subject"] == c) & (idx[trig] == 1)]
                    if len(tr) > 20 and len(te) > 5:
                        gaps.append(abs((tr[tgt] == 1).mean() - (te[tgt] == 1).mean()))
            assert max(gaps) > 0.5, f"fold {k}: contrarian {c} does not contradict its look-alikes"


def test_identity_is_correlated_with_habit_group():
    imgs, lm, idx, meta = synth.synthesize("synth", overrides={"n_subjects": 9, "sessions_per_subject": 1,
                                                                "frames_per_session": (3, 3)})
    # skin brightness below the left eye (between the lower lid and the cheek), located from the landmarks
    below_eye = 0.15 * np.linalg.norm(lm[:, 45] - lm[:, 36], axis=1)  # ~0.15 face units
    centre = (lm[:, [40, 41]].mean(1) + np.stack([0 * below_eye, below_eye], 1)).round().astype(int)
    skin = np.array([img[y - 1:y + 2, x - 1:x + 2].mean() for img, (x, y) in zip(imgs, centre)])
    fam = np.array([meta["habits"][s]["appearance_family"] for s in idx["subject"]])
    means = [skin[fam == f].mean() for f in range(3)]
    assert means[0] > means[1] > means[2], f"skin brightness per family {means}"


# ---------------------------------------------------------------- synth-fermix


def test_fermix_cells_subjects_and_biases():
    idx, meta = synth.label_table("synth-fermix")
    assert meta["datasets"] == ["ckplus", "mmi", "oulu"]
    cells = pd.crosstab(idx["dataset"], idx["expression"])
    assert cells.shape == (3, 6) and cells.to_numpy().min() >= 30
    assert idx.groupby("subject")["dataset"].nunique().max() == 1
    assert all(s.startswith({"ckplus": "ck_", "mmi": "mmi_", "oulu": "oulu_"}[d])
               for s, d in zip(idx["subject"], idx["dataset"]))
    anger = meta["expressions"].index("anger")
    mmi_open = idx[(idx["dataset"] == "mmi") & (idx["expression"] == anger)]
    ck_angry = idx[(idx["dataset"] == "ckplus") & (idx["expression"] == anger)]
    assert len(mmi_open) and len(ck_angry)
    imgs, lm, small, _ = synth.synthesize("synth-fermix", overrides=TINY_FER)
    f = face_frame(lm.astype(float))
    gap = f[:, [65, 66, 67], 1].mean(1) - f[:, [61, 62, 63], 1].mean(1)
    is_anger = (small["expression"] == anger).to_numpy()
    ds = small["dataset"].to_numpy()
    assert gap[is_anger & (ds == "mmi")].mean() > gap[is_anger & (ds == "ckplus")].mean() + 0.04  # open-mouth anger
    grey = (imgs[..., 0] == imgs[..., 1]).all(axis=(1, 2)) & (imgs[..., 1] == imgs[..., 2]).all(axis=(1, 2))
    assert grey[ds == "ckplus"].all() and not grey[ds != "ckplus"].any()
    border = np.concatenate([imgs[:, :3].reshape(len(imgs), -1, 3), imgs[:, :, :3].reshape(len(imgs), -1, 3),
                             imgs[:, :, -3:].reshape(len(imgs), -1, 3)], axis=1).astype(int)
    blue = (border[..., 2] > border[..., 0] + 60).mean(1)
    assert (blue[ds == "mmi"] > 0.08).all() and blue[ds == "mmi"].mean() > 2 * blue[ds != "mmi"].mean()  # backdrop
    grey = imgs.astype(np.float32).mean(-1)
    edges = np.array([np.abs(cv2.Laplacian(cv2.GaussianBlur(g, (0, 0), 0.8), cv2.CV_32F)).mean() for g in grey])
    assert edges[ds == "oulu"].mean() < 0.7 * min(edges[ds == "ckplus"].mean(), edges[ds == "mmi"].mean())  # blur


# ---------------------------------------------------------------- misc


def test_flip_permutation_is_the_renderer_mirror():
    assert (synth.MIRROR[:68] == IBUG68_FLIP).all()
    ident = synth.sample_identity(np.random.default_rng(0), 1)
    p = ident.neutral
    np.testing.assert_allclose(p[synth.MIRROR][:, 0], -p[:, 0], atol=1e-9)  # neutral faces are symmetric


def test_tabulated_textures_match_their_definition():
    """The renderer applies _texture_points as a precomputed affine map; it must stay affine (exact match)."""
    rng = np.random.default_rng(5)
    ident = synth.sample_identity(rng, 2)
    p3 = synth.posed_points(ident.neutral, rng.uniform(0, 5, len(synth.ALL_AUS)), blink=0.4)
    fast = (synth._TEX_MATRIX @ p3[:, :2].ravel() + synth._TEX_OFFSET).reshape(-1, 2)
    for name, points in synth._texture_points(p3).items():
        np.testing.assert_allclose(fast[synth._TEX_ROWS[name]], points, atol=1e-9, err_msg=name)


def test_contact_sheet(tmp_path):
    out = synth.contact_sheet("synth", tmp_path / "sheet.png", n=6, cache_dir=tmp_path, overrides=TINY)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
