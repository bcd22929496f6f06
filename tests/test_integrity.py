"""Integrity of prepared folders (manifest, verification on open, fingerprint) and of the SynthAU cache
(verification, regeneration, a file lock for concurrent generation)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import make_prepared

from aurecog.data import prepared as P
from aurecog.data import synth
from aurecog.data.prepared import PreparedDataset, PreparedFormatError

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_subjects": 3, "sessions_per_subject": 1, "frames_per_session": (10, 12)}


def zero_pixels(path: Path) -> None:
    """Overwrite the data of an .npy file with zeros in place: same size, valid header (the measured failure)."""
    arr = np.load(path, mmap_mode="r+")
    arr[:] = 0
    arr.flush()
    del arr


def truncate(path: Path, keep: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * keep))


def age(root: Path, seconds: float = 60.0) -> None:
    """Move every file's mtime into the past (as if prepared earlier), so that a check may be remembered."""
    t = time.time() - seconds
    for p in root.iterdir():
        os.utime(p, (t, t))


# ---------------------------------------------------------------- prepared folders


def test_manifest_lists_every_file_with_independent_hashes(tmp_path):
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"meta.json", "images.npy", "landmarks.npy", "index.parquet"}
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert entry["size"] == len(data)
        assert entry["chunks"] == [hashlib.sha256(data).hexdigest()]  # one chunk: the plain file hash
        assert entry["sha256"] == hashlib.sha256(entry["chunks"][0].encode()).hexdigest()
    ds = PreparedDataset.open(root)
    assert len(ds.fingerprint) == 16 and int(ds.fingerprint, 16) >= 0


def test_fingerprint_is_the_content(tmp_path):
    a, b, c = (PreparedDataset.open(make_prepared(tmp_path / sub / "d", n_subjects=2, per_subject=3, size=8,
                                                  seed=seed)) for sub, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_same_size_zero_overwrite_is_detected(tmp_path):
    """Old code opened the zeroed images silently (a SynthAU run trained on them with exit 0)."""
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    PreparedDataset.open(root)
    size = (root / "images.npy").stat().st_size
    zero_pixels(root / "images.npy")
    assert (root / "images.npy").stat().st_size == size
    with pytest.raises(PreparedFormatError, match=r"images\.npy does not match its sha256.*aurecog prepare"):
        PreparedDataset.open(root)


def test_truncated_file_names_file_and_fix(tmp_path):
    """Old code: `ValueError: mmap length is greater than file size`, naming neither file nor fix."""
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    truncate(root / "landmarks.npy")
    with pytest.raises(PreparedFormatError, match=r"landmarks\.npy is \d+ bytes but MANIFEST.json says \d+ "
                                                  r"\(truncated or replaced\); prepare it again: `aurecog prepare"):
        PreparedDataset.open(root)
    (root / "meta.json").unlink()
    with pytest.raises(PreparedFormatError, match=r"meta\.json is missing"):
        PreparedDataset.open(root)


def test_chunked_hashes_name_the_bad_byte_range(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "CHUNK_BYTES", 256)
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)  # images: 6*8*8*3 + 128 bytes
    entry = json.loads((root / "MANIFEST.json").read_text())["files"]["images.npy"]
    data = (root / "images.npy").read_bytes()
    assert entry["chunks"] == [hashlib.sha256(data[i:i + 256]).hexdigest() for i in range(0, len(data), 256)]
    with open(root / "images.npy", "r+b") as f:
        f.seek(600)
        f.write(bytes([data[600] ^ 1]))  # one flipped bit in the third chunk
    with pytest.raises(PreparedFormatError, match="bytes 512-768 differ"):
        PreparedDataset.open(root)


def test_old_folder_without_manifest_fails_until_adopted(tmp_path, capsys):
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    fp = PreparedDataset.open(root).fingerprint
    (root / "MANIFEST.json").unlink()
    (root / ".verified.json").unlink(missing_ok=True)
    with pytest.raises(PreparedFormatError, match=r"MANIFEST.json is missing.*python -m aurecog.data.prepared"):
        PreparedDataset.open(root)
    assert P.main([str(root)]) == 0 and fp in capsys.readouterr().out
    assert PreparedDataset.open(root).fingerprint == fp


def test_verified_files_are_not_hashed_again_until_they_change(tmp_path, monkeypatch):
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    PreparedDataset.open(root)
    assert not (root / ".verified.json").exists() or not json.loads((root / ".verified.json").read_text())["files"]
    age(root)  # just-written files are never remembered (their mtime may not have ticked yet)
    PreparedDataset.open(root)
    assert set(json.loads((root / ".verified.json").read_text())["files"]) == {
        "meta.json", "images.npy", "landmarks.npy", "index.parquet"}
    hashed = []
    real = P._hash_chunk
    monkeypatch.setattr(P, "_hash_chunk", lambda path, *a: hashed.append(Path(path).name) or real(path, *a))
    PreparedDataset.open(root)
    assert hashed == []
    zero_pixels(root / "images.npy")  # rewriting changes the mtime: hashed again, and caught
    with pytest.raises(PreparedFormatError, match=r"images\.npy does not match"):
        PreparedDataset.open(root)
    assert hashed == ["images.npy"]


def test_unwritable_memo_only_costs_a_rehash(tmp_path, monkeypatch):
    root = make_prepared(tmp_path / "d", n_subjects=2, per_subject=3, size=8)
    age(root)

    def refuse(self, *a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(Path, "write_text", refuse)
    assert PreparedDataset.open(root).fingerprint
    assert not (root / ".verified.json").exists()


# ---------------------------------------------------------------- SynthAU cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A freshly generated tiny preset: the bytes a regenerated cache must equal."""
    root = synth.generate("synth", seed=2, cache_dir=tmp_path_factory.mktemp("ref"), progress=False, overrides=TINY)
    return (root / "images.npy").read_bytes(), root


def _gen(cache: Path) -> Path:
    return synth.generate("synth", seed=2, cache_dir=cache, progress=False, overrides=TINY)


@pytest.mark.parametrize("damage", ["zeros", "truncated", "no COMPLETE", "no manifest"])
def test_bad_synth_cache_is_regenerated(damage, reference, tmp_path, caplog):
    """Old code returned the damaged folder (it trusted COMPLETE): zeros trained silently, truncation crashed."""
    root = _gen(tmp_path)
    {"zeros": lambda: zero_pixels(root / "images.npy"), "truncated": lambda: truncate(root / "images.npy"),
     "no COMPLETE": lambda: (root / "COMPLETE").unlink(),
     "no manifest": lambda: (root / "MANIFEST.json").unlink()}[damage]()
    with caplog.at_level(logging.WARNING, logger="aurecog.data.synth"):
        assert _gen(tmp_path) == root
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "regenerating" in warnings[0] and str(root) in warnings[0]
    assert "\n" not in warnings[0]
    assert (root / "images.npy").read_bytes() == reference[0]
    assert PreparedDataset.open(root).fingerprint == PreparedDataset.open(reference[1]).fingerprint


def test_intact_synth_cache_is_reused_quietly(reference, tmp_path, caplog):
    root = _gen(tmp_path)
    stamp = (root / "images.npy").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="aurecog.data.synth"):
        _gen(tmp_path)
    assert (root / "images.npy").stat().st_mtime_ns == stamp and not caplog.records


GEN_SCRIPT = """
import sys, time
from pathlib import Path
from aurecog.data import synth
cache, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.005)
calls = []
orig = synth._render_into
synth._render_into = lambda *a: calls.append(1) or orig(*a)
root = synth.generate("synth", seed=2, cache_dir=cache, progress=False,
                      overrides={"n_subjects": 3, "sessions_per_subject": 1, "frames_per_session": (10, 12)})
print("generated" if calls else "reused", root)
"""


def test_two_processes_generate_one_preset_safely(reference, tmp_path):
    """Two real processes released at the same instant: one generates, the other waits and reuses the folder.
    Old code: both wrote `<folder>.partial` at once and one crashed."""
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", GEN_SCRIPT, str(tmp_path / "cache"), str(go), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)  # both imported and waiting at the barrier
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    kinds = sorted(out.split()[0] for out, _ in outs)
    assert kinds == ["generated", "reused"], outs
    root = Path(outs[0][0].split()[1])
    assert (root / "images.npy").read_bytes() == reference[0]
    assert not root.with_name(root.name + ".partial").exists()
