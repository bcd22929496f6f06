"""Tiny fixtures in the real distributions' layouts and formats (images/videos written with cv2, label files with
the datasets' unknown codes, landmark files), plus the ground truth each builder used, so that tests check the
preparers against values computed independently of the readers.

Every synthetic frame shows two bright discs at the eye centres of its (randomly rotated, scaled, shifted)
landmarks on a dark background: after alignment the discs must sit at the canonical eye positions, which checks
that image, landmarks and transform were paired correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

from aurecog.data.align import CANONICAL_EYES
from aurecog.data.landmarks import DISFA66_FROM_IBUG68, INTRAFACE49_FROM_IBUG68

try:
    import scipy.io as sio
except ImportError:  # pragma: no cover
    sio = None

H, W = 120, 160
SIZE = 48  # prepared image size used by the tests


# ---------------------------------------------------------------------------------------------- faces
def face_landmarks(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """Random iBUG-68 landmarks: eye contours on small ellipses around two eye centres, the rest scattered;
    the whole shape rotated (+-15 deg), scaled and shifted."""
    pts = rng.uniform([-1.4, -0.8], [1.4, 2.4], size=(68, 2))
    t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    ring = np.stack([0.3 * np.cos(t), 0.12 * np.sin(t)], 1)
    pts[36:42] = np.array([-1.0, 0.0]) + ring
    pts[42:48] = np.array([1.0, 0.0]) + ring
    ang = np.deg2rad(rng.uniform(-15, 15))
    scale = rng.uniform(16, 22)  # half the inter-ocular distance in pixels
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    centre = np.array([w / 2 + rng.uniform(-15, 15), h / 2 - 10 + rng.uniform(-8, 8)])
    return (pts @ rot.T * scale + centre).astype(np.float32)


def eye_centres68(lm68: np.ndarray) -> np.ndarray:
    return np.stack([lm68[36:42].mean(0), lm68[42:48].mean(0)])


def face_image(lm68: np.ndarray, h: int = H, w: int = W, level: int = 30) -> np.ndarray:
    img = np.full((h, w, 3), level, np.uint8)
    for c in eye_centres68(lm68):
        cv2.circle(img, (int(round(c[0])), int(round(c[1]))), 6, (255, 255, 255), -1, lineType=cv2.LINE_AA)
    return img


def to49(lm68):
    return lm68[INTRAFACE49_FROM_IBUG68]


def to66(lm68):
    return lm68[DISFA66_FROM_IBUG68]


def check_aligned(images: np.ndarray, landmarks: np.ndarray, eye_idx: tuple[list[int], list[int]],
                  size: int = SIZE, tol: float = 0.05) -> None:
    """Eye centres of the aligned landmarks at the canonical positions and the bright discs under them."""
    canon = np.asarray(CANONICAL_EYES) * size
    left = landmarks[:, eye_idx[0]].mean(1)
    right = landmarks[:, eye_idx[1]].mean(1)
    np.testing.assert_allclose(left, np.broadcast_to(canon[0], left.shape), atol=tol)
    np.testing.assert_allclose(right, np.broadcast_to(canon[1], right.shape), atol=tol)
    for c in canon:
        x, y = int(round(c[0])), int(round(c[1]))
        assert (images[:, y, x].mean(-1) > 150).all(), "eye disc not at the canonical position"
    mid_y = int(round(canon[0][1] + 0.25 * size))  # well below the eyes: background
    assert (images[:, mid_y, size // 2].mean(-1) < 110).all()


def write_jpg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def write_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 25.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened(), "cv2 cannot write MJPG .avi here"
    for f in frames:
        vw.write(f)
    vw.release()


# ---------------------------------------------------------------------------------------------- BP4D / BP4D+
BP4D_AUS = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]
BP4D_INT = [6, 10, 12, 14, 17]


#: the 34 occurrence AUs of a BP4D+ AU_OCC csv, in column order (rPPG-Toolbox ``AU_num``, notes A.5)
BP4DPLUS_CODED = [1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 27, 28, 29, 30, 31,
                  32, 33, 34, 35, 36, 37, 38, 39]


def make_bp4d(root: Path, seed: int = 0, seqs=(("F001", "T1"), ("F001", "T2"), ("M007", "T1")),
              zipped=("M007",), n_frames: int = 5, first: int = 10, mat: bool = True, header: str = "bp4d") -> dict:
    """BP4D layout. Returns truth: ``frames`` {(subj, task, frame): {"AU1": ..., "AU6_int": ...}} for every frame
    that must be prepared, ``missing_landmarks``/``no_image`` frame keys that must be reported, ``lm68``,
    ``images`` {(subj, task): number of frame images}.

    ``header``: ``"bp4d"`` (columns 0..40: frame, AU k in column k up to 39, occlusion), ``"bp4dplus"`` (frame + the
    34 coded AUs named by number) or ``"position"`` (the BP4D+ columns numbered 1..34 by position)."""
    rng = np.random.default_rng(seed)
    occ_dir = root / "AUCoding" / "AU_OCC"
    occ_dir.mkdir(parents=True)
    truth: dict = {"frames": {}, "no_landmarks": [], "no_image": [], "uncoded": [], "lm68": {}, "images": {}}
    if header == "bp4d":  # columns 0..40 as in the real files (frame + AU columns up to 39 + occlusion)
        coded, names, tail = list(range(1, 40)), [str(c) for c in range(41)], [0]
    else:
        coded, tail = BP4DPLUS_CODED, []
        names = ["0"] + [str(a) if header == "bp4dplus" else str(i) for i, a in enumerate(coded, start=1)]
    for subj, task in seqs:
        frames = list(range(first, first + n_frames))
        img_dir = root / "2D+3D" / subj / task
        fits = []
        rows = []
        for k, f in enumerate(frames + [first + n_frames]):  # the last one: image without a label row
            lm = face_landmarks(rng)
            write_jpg(img_dir / f"{f:04d}.jpg", face_image(lm))
            empty = k == 1  # the tracker lost the face on the second frame
            fits.append(np.zeros((0, 0)) if empty else to49(lm).astype(np.float64))
            if f == first + n_frames:
                truth["uncoded"].append((subj, task, f))
                continue
            lab = {a: int(rng.random() < 0.4) for a in coded}
            for a in rng.choice(BP4D_AUS, size=2, replace=False):
                lab[int(a)] = 9
            rows.append([f] + [lab[a] for a in coded] + tail)
            if empty:
                truth["no_landmarks"].append((subj, task, f))
                continue
            truth["lm68"][(subj, task, f)] = lm
            truth["frames"][(subj, task, f)] = {f"AU{a}": (-1 if lab[a] == 9 else lab[a]) for a in BP4D_AUS}
        # a labelled frame without an image
        missing = first + n_frames + 1
        rows.append([missing] + [0] * len(coded) + tail)
        truth["no_image"].append((subj, task, missing))
        truth["images"][(subj, task)] = n_frames + 1
        with open(occ_dir / f"{subj}_{task}.csv", "w") as fh:
            fh.write(",".join(names) + "\n")
            for r in rows:
                fh.write(",".join(str(v) for v in r) + "\n")
        for a in BP4D_INT:
            d = root / "AUCoding" / "AU_INT" / f"AU{a:02d}"
            d.mkdir(parents=True, exist_ok=True)
            vals = {f: int(rng.choice([0, 1, 2, 3, 4, 5, 9])) for f in frames}
            (d / f"{subj}_{task}_AU{a:02d}.csv").write_text("".join(f"{f},{v}\n" for f, v in vals.items()))
            for f, v in vals.items():
                if (subj, task, f) in truth["frames"]:
                    truth["frames"][(subj, task, f)][f"AU{a}_int"] = -1 if v == 9 else v
        feat = root / "2DFeatures"
        feat.mkdir(exist_ok=True)
        if mat and sio is not None:
            fit = np.zeros((1, len(fits)), dtype=[("pred", "O"), ("pose", "O")])
            for k, p in enumerate(fits):
                fit[0, k]["pred"] = p
                fit[0, k]["pose"] = np.zeros(3)
            sio.savemat(str(feat / f"{subj}_{task}.mat"), {"fit": fit})
        else:  # the documented text alternative: frame x1 y1 ... x49 y49
            with open(feat / f"{subj}_{task}.txt", "w") as fh:
                for f, p in zip(frames + [first + n_frames], fits):
                    if p.size:
                        fh.write(" ".join([str(f)] + [f"{v:.4f}" for v in p.ravel()]) + "\n")
    for subj in zipped:
        folder = root / "2D+3D" / subj
        with zipfile.ZipFile(root / "2D+3D" / f"{subj}.zip", "w") as zf:
            for p in sorted(folder.rglob("*.jpg")):
                zf.write(p, p.relative_to(root / "2D+3D").as_posix())
        for p in sorted(folder.rglob("*.jpg")):
            p.unlink()
        for d in sorted(folder.rglob("*"), reverse=True):
            d.rmdir()
        folder.rmdir()
    return truth


# ---------------------------------------------------------------------------------------------- DISFA
DISFA_AUS = [1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26]


def make_disfa(root: Path, seed: int = 0, subjects=("SN001", "SN002"), n_frames: int = 6,
               drop_landmark: dict | None = None) -> dict:
    """DISFA layout: left-camera video, per-AU label files (1-based frames), per-frame 66-point .mat landmarks
    (0-based file index). ``drop_landmark`` {subject: 0-based frame} leaves out one landmark file."""
    rng = np.random.default_rng(seed)
    truth: dict = {"intensity": {}, "lm68": {}, "no_landmarks": []}
    for subj in subjects:
        frames, lms = [], []
        for _ in range(n_frames):
            lm = face_landmarks(rng)
            frames.append(face_image(lm))
            lms.append(lm)
        write_video(root / "Videos_LeftCamera" / f"LeftVideo{subj}_comp.avi", frames)
        lab_dir = root / "ActionUnit_Labels" / subj
        lab_dir.mkdir(parents=True)
        inten = rng.integers(0, 6, size=(n_frames, len(DISFA_AUS)))
        for j, a in enumerate(DISFA_AUS):
            (lab_dir / f"{subj}_au{a}.txt").write_text(
                "".join(f"{i + 1},{inten[i, j]}\n" for i in range(n_frames)))
        lm_dir = root / "Landmark_Points" / subj / "tmp_frame_lm"
        lm_dir.mkdir(parents=True)
        for i, lm in enumerate(lms):
            if drop_landmark and drop_landmark.get(subj) == i:
                truth["no_landmarks"].append((subj, i + 1))
                continue
            name = f"{subj}_{i:04d}_lm" if i % 2 == 0 else f"l0{i:04d}_lm"  # both namings occur
            if sio is not None:
                sio.savemat(str(lm_dir / f"{name}.mat"), {"pts": to66(lm).astype(np.float64)})
            else:
                np.savetxt(lm_dir / f"{name}.txt", to66(lm))
            truth["lm68"][(subj, i + 1)] = lm
            truth["intensity"][(subj, i + 1)] = {f"AU{a}": int(inten[i, j]) for j, a in enumerate(DISFA_AUS)}
    return truth


# ---------------------------------------------------------------------------------------------- generic / GFT
def make_generic(root: Path, seed: int = 0, subjects=("s1", "s2", "s3"), per_subject: int = 3,
                 aus=(1, 2, 4, 6, 10, 12, 14, 15, 23, 24), unknown: int = 9, landmarks: str = "columns",
                 split: bool = True) -> dict:
    """Generic CSV layout: index.csv with image,subject,frame[,split],AU<k>...,x0,y0,... (or a landmarks column
    naming a text file)."""
    rng = np.random.default_rng(seed)
    truth: dict = {"rows": [], "lm68": {}}
    header = ["image", "subject", "frame"] + (["split"] if split else []) + [f"AU{a}" for a in aus]
    if landmarks == "columns":
        header += [c for i in range(68) for c in (f"x{i}", f"y{i}")]
    elif landmarks == "file":
        header += ["landmarks"]
    lines = [",".join(header)]
    for si, s in enumerate(subjects):
        for f in range(per_subject):
            lm = face_landmarks(rng)
            rel = f"images/{s}/{f:03d}.png"
            write_png(root / rel, face_image(lm))
            labs = [int(rng.choice([0, 1, unknown])) for _ in aus]
            vals = [rel, s, str(f)] + (["train" if si < len(subjects) - 1 else "test"] if split else [])
            vals += [str(v) for v in labs]
            if landmarks == "columns":
                vals += [f"{v:.3f}" for v in lm.ravel()]
            elif landmarks == "file":
                lp = root / "landmarks" / s / f"{f:03d}.pts"
                lp.parent.mkdir(parents=True, exist_ok=True)
                lp.write_text("version: 1\nn_points: 68\n{\n" + "".join(f"{x:.3f} {y:.3f}\n" for x, y in lm) + "}\n")
                vals += [f"landmarks/{s}/{f:03d}.pts"]
            lines.append(",".join(vals))
            truth["rows"].append({"subject": s, "frame": f, **{f"AU{a}": (-1 if v == unknown else v)
                                                                for a, v in zip(aus, labs)}})
            truth["lm68"][(s, f)] = lm
    (root / "index.csv").write_text("\n".join(lines) + "\n")
    return truth


# ---------------------------------------------------------------------------------------------- Aff-Wild2
AFFWILD2_AUS = [1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26]


def make_affwild2(root: Path, seed: int = 0, videos=(("Train_Set", "1-30-1280x720"), ("Train_Set", "video5"),
                                                      ("Validation_Set", "video10_1")), n_frames: int = 4) -> dict:
    """ABAW layout: annotations/AU_Detection_Challenge/<split>/<video>.txt + cropped_aligned/<video>/00001.jpg.
    Landmarks come from the detector (tests monkeypatch it) keyed by the disc positions."""
    rng = np.random.default_rng(seed)
    truth: dict = {"labels": {}, "split": {}, "all_unknown": [], "no_image": []}
    for split, video in videos:
        ann = root / "annotations" / "AU_Detection_Challenge" / split
        ann.mkdir(parents=True, exist_ok=True)
        lines = ["AU1,AU2,AU4,AU6,AU7,AU10,AU12,AU15,AU23,AU24,AU25,AU26"]
        for j in range(1, n_frames + 2):
            if j == 2:  # an unannotated frame
                lab = [-1] * 12
                truth["all_unknown"].append((video, j))
            else:
                lab = [int(rng.choice([0, 1, 1, -1])) if k == 0 else int(rng.integers(0, 2)) for k in range(12)]
            lines.append(",".join(map(str, lab)))
            if j == n_frames + 1:  # a labelled frame whose image is missing (face not found by ABAW)
                truth["no_image"].append((video, j))
                continue
            lm = face_landmarks(rng, 112, 112)
            write_jpg(root / "cropped_aligned" / video / f"{j:05d}.jpg", face_image(lm, 112, 112))
            if j != 2:
                truth["labels"][(video, j)] = {f"AU{a}": v for a, v in zip(AFFWILD2_AUS, lab)}
                truth["split"][(video, j)] = "train" if split == "Train_Set" else "validation"
        (ann / f"{video}.txt").write_text("\n".join(lines) + "\n")
    return truth


def disc_detector(image_bgr: np.ndarray) -> np.ndarray | None:
    """Stand-in for the dlib detector in tests: finds the two bright discs and returns iBUG-68 landmarks with the
    eye contours around them (other points on a grid); None when there are not two discs."""
    gray = image_bgr.mean(-1) if image_bgr.ndim == 3 else image_bgr
    n, _, stats, cents = cv2.connectedComponentsWithStats((gray > 150).astype(np.uint8))
    blobs = [cents[i] for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 10]
    if len(blobs) != 2:
        return None
    left, right = sorted(blobs, key=lambda c: c[0])
    lm = np.zeros((68, 2), np.float32)
    t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    ring = np.stack([2 * np.cos(t), np.sin(t)], 1)
    lm[:] = (left + right) / 2
    lm[36:42] = left + ring
    lm[42:48] = right + ring
    return lm


# ---------------------------------------------------------------------------------------------- CK+ / MMI / Oulu
CK_EMOTIONS = {1: "anger", 3: "disgust", 4: "fear", 5: "happiness", 6: "sadness", 7: "surprise"}
MMI_EMOTIONS = {1: "anger", 2: "disgust", 3: "fear", 4: "happiness", 5: "sadness", 6: "surprise"}


def make_ckplus(root: Path, rng: np.random.Generator, seqs=(("S005", "001", 3), ("S010", "002", 2),
                                                           ("S011", "001", 5), ("S011", "002", None)),
                n_frames: int = 5) -> dict:
    """CK+ layout: cohn-kanade-images/Sxxx/yyy/*.png, Landmarks/.../*_landmarks.txt (68 'x y' lines),
    Emotion/.../*_emotion.txt (a float code; missing = no label), FACS/.../*_facs.txt."""
    truth: dict = {"frames": {}, "facs": {}, "contempt": [], "unlabelled": []}
    for subj, seq, emo in seqs:
        for i in range(1, n_frames + 1):
            stem = f"{subj}_{seq}_{i:08d}"
            lm = face_landmarks(rng)
            write_png(root / "cohn-kanade-images" / subj / seq / f"{stem}.png", face_image(lm))
            lp = root / "Landmarks" / subj / seq / f"{stem}_landmarks.txt"
            lp.parent.mkdir(parents=True, exist_ok=True)
            lp.write_text("".join(f"   {x:.7e}   {y:.7e}\n" for x, y in lm))
            if emo in CK_EMOTIONS and i > n_frames - 3:
                truth["frames"][("ckplus", subj, seq, i)] = CK_EMOTIONS[emo]
        peak = f"{subj}_{seq}_{n_frames:08d}"
        facs = {1: 2, 2: 0, 12: 3} if emo != 3 else {9: 4, 17: 1}
        fp = root / "FACS" / subj / seq / f"{peak}_facs.txt"
        fp.parent.mkdir(parents=True, exist_ok=True)
        fp.write_text("".join(f"   {a:.7e}   {v:.7e}\n" for a, v in facs.items()))
        if emo is None:
            truth["unlabelled"].append((subj, seq))
            continue
        ep = root / "Emotion" / subj / seq / f"{peak}_emotion.txt"
        ep.parent.mkdir(parents=True, exist_ok=True)
        ep.write_text(f"   {emo:.7e}\n")
        if emo == 2:
            truth["contempt"].append((subj, seq))
        else:
            truth["facs"][(subj, seq, n_frames)] = facs
    return truth


def make_mmi(root: Path, rng: np.random.Generator, sessions=(("1", "S001", 4), ("2", "S002", 6), ("3", "S002", 1)),
             n_frames: int = 7, subject_id: bool = True, meta_subject: bool = True) -> dict:
    """MMI layout: Sessions/<id>/<name>.avi (``<name>`` = ``S001-1``: the clip name carries the subject),
    <name>-oao_aucs.xml, session.xml (``<subject id>`` unless ``subject_id=False``), <name>.xml metadata with
    <Metatag Name="Emotion" Value="k"/> (and a Subject metatag unless ``meta_subject=False``). The middle 3 frames
    (n/2-1, n/2, n/2+1) are used."""
    truth: dict = {"frames": {}}
    for sid, subj, emo in sessions:
        d = root / "Sessions" / sid
        name = f"{subj}-{sid}"
        frames = [face_image(face_landmarks(rng)) for _ in range(n_frames)]
        write_video(d / f"{name}.avi", frames)
        (d / "session.xml").write_text(
            f'<?xml version="1.0"?>\n<session sessionId="{sid}">'
            + (f'<subject id="{subj[1:].lstrip("0")}" />' if subject_id else "")
            + f'<track id="0" type="1" filename="{name}.avi" /></session>\n')
        (d / f"{name}.xml").write_text(
            f'<?xml version="1.0"?>\n<Metadata><Metatag Name="Emotion" Value="{emo}" />'
            + (f'<Metatag Name="Subject" Value="{subj}" />' if meta_subject else "") + '</Metadata>\n')
        (d / f"{name}-oao_aucs.xml").write_text(
            '<?xml version="1.0"?>\n<ActionUnits><ActionUnit Number="12"><Marker Frame="2" Type="1" />'
            '</ActionUnit></ActionUnits>\n')
        mid = n_frames // 2
        for i in (mid - 1, mid, mid + 1):
            truth["frames"][("mmi", f"S{int(subj[1:]):03d}", sid, i)] = MMI_EMOTIONS[emo]
    return truth


def make_oulu(root: Path, rng: np.random.Generator, subjects=("P001", "P002"),
              emotions=("Anger", "Happiness", "Surprise"), n_frames: int = 5) -> dict:
    """Oulu-CASIA layout: OriginalImg/VL/Strong/P0xx/<Emotion>/000.jpeg (label = folder); NI and Weak are ignored."""
    truth: dict = {"frames": {}}
    for subj in subjects:
        for emo in emotions:
            for i in range(n_frames):
                for cond in ("VL/Strong", "NI/Strong", "VL/Weak"):
                    img = face_image(face_landmarks(rng))
                    write_jpg(root / "OriginalImg" / cond / subj / emo / f"{i:03d}.jpeg", img)
                if i >= n_frames - 3:
                    truth["frames"][("oulu", subj, emo, i)] = emo.lower()
    return truth


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------- command line
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
#: ``aurecog`` with the stand-in detector installed (the dlib detector is optional and not installed in tests)
_WITH_FAKE_DETECTOR = ("import sys, fixtures_real, aurecog.data.prepare as P; "
                       "P._DETECTOR = fixtures_real.disc_detector; "
                       "from aurecog.cli import main; sys.exit(main(sys.argv[1:]))")


def aurecog(*args: str, detector: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m aurecog.cli ARGS`` in a subprocess (with ``detector``: through ``aurecog.cli.main`` with
    :func:`disc_detector` standing in for dlib); returns the completed process (text stdout/stderr)."""
    cmd = [sys.executable] + (["-c", _WITH_FAKE_DETECTOR] if detector else ["-m", "aurecog.cli"]) + list(args)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "WANDB_MODE": "disabled"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO))


def prepare_cli(dataset: str, src: Path, out: Path, *options: str, detector: bool = False, debug: bool = False,
                check: bool = False) -> subprocess.CompletedProcess:
    """``aurecog prepare DATASET --src SRC --out OUT --workers 1 --size SIZE [--option K=V ...]``."""
    args = ["prepare", dataset, "--src", str(src), "--out", str(out), "--workers", "1", "--size", str(SIZE)]
    for o in options:
        args += ["--option", o]
    if debug:
        args.append("--debug")
    res = aurecog(*args, detector=detector)
    if check:
        assert res.returncode == 0, res.stdout + res.stderr
    return res


def assert_one_line_error(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line on stderr, holding every fragment; returns it."""
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
