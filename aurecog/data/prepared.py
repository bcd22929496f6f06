"""The prepared-dataset format, written by SynthAU and by every real-dataset preparer.

A prepared dataset is one folder::

    meta.json            format name + version, AU names, label conventions, image size, landmark layout
    images.npy           uint8 array N x H x W x 3 (RGB), opened with ``mmap_mode="r"``: random access,
                         no decode, nothing read into RAM until a sample is indexed
    landmarks.npy        float32 array N x L x 2, pixel coordinates (x right, y down) in ``images.npy``
    index.parquet        one row per frame, row i describes images[i]
    MANIFEST.json        size and sha256 of every other file (per 64 MiB chunk), written after all of them
    COMPLETE             written last; a folder without it is an interrupted write and is rejected
    .verified.json       (optional, written by readers) which files were hashed and found intact, keyed by
                         (size, mtime, inode), so a large dataset is hashed once and not on every open

Integrity: :meth:`PreparedDataset.open` checks every file's size against the manifest on every open and its
hashes whenever the file's (size, mtime, inode) differs from the last successful check, so truncation and
in-place overwrites (even at the same size) fail loudly as :class:`PreparedFormatError` naming the file and
the fix. :attr:`PreparedDataset.fingerprint` is a short hash of the manifest: the data version of a result.
Measured on the 2-CPU dev VM: the ``synth`` preset (2955 frames, 38 MB) opens in 0.24 s with full hashing
(its generation takes 25 s), so hashing on every open would cost nothing there; a 20k-frame 224 px folder
(3.0 GB) takes 7.0 s to open with hashing and 15 ms once remembered, so a BP4D-sized one (146k frames, ~20-30
GB) would spend about a minute per open, once per cell: hence the memo.

``index.parquet`` columns:

* ``dataset`` (str), ``subject`` (str), ``session`` (str), ``frame`` (int): provenance.
* ``AU<k>`` (int8) for every AU in ``meta["aus"]``: 1 present, 0 absent, :data:`UNKNOWN` (-1) not coded.
* ``AU<k>_int`` (int8) for every AU in ``meta["intensity_aus"]``: intensity 0-5, -1 not coded.
* ``expression`` (int8): index into ``meta["expressions"]``, -1 when no expression label applies.
* any further columns a source wants to keep (``split`` for datasets with official splits, SynthAU's
  ground-truth habit columns, ...).

Each source translates its own unknown codes (BP4D 9, Aff-Wild2 -1, ...) into :data:`UNKNOWN` when it
writes; nothing downstream needs to know the original code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aurecog.data.landmarks import N_POINTS, check_layout

FORMAT = "aurecog-prepared"
VERSION = 1
UNKNOWN = -1
MAX_INTENSITY = 5
PROVENANCE_COLUMNS = ("dataset", "subject", "session", "frame")
REQUIRED_META = ("name", "aus", "intensity_aus", "expressions", "image_size", "landmark_layout")
MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "aurecog-prepared-manifest"
VERIFIED = ".verified.json"  # readers' memo of files whose hashes matched, keyed by (size, mtime_ns, inode)
CHUNK_BYTES = 64 * 2**20  # hash granularity: chunks hash in parallel and a mismatch names its byte range
#: A file modified less than this many seconds before a check is hashed again next time (its mtime could
#: still change within the same timestamp tick, as git's "racily clean" index entries).
RACY_SECONDS = 2.0
_NOT_HASHED = (MANIFEST, "COMPLETE", VERIFIED)


class PreparedFormatError(ValueError):
    """A prepared dataset folder is missing, incomplete or inconsistent."""


def au_column(au: str) -> str:
    return au


def intensity_column(au: str) -> str:
    return f"{au}_int"


class PreparedWriter:
    """Writes a prepared dataset of a known size, atomically.

    Everything goes into ``<out>.partial/``; :meth:`finalize` validates, writes ``MANIFEST.json`` (hashes of
    every file) and ``COMPLETE`` and renames the folder into place, so a reader never sees half a dataset.
    Images are written straight into the memory-mapped array, so memory use does not grow with N.
    """

    def __init__(self, out_dir: str | os.PathLike, n: int, image_size: int, landmark_layout: str):
        check_layout(landmark_layout)
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        self.n, self.image_size, self.layout = n, image_size, landmark_layout
        self.images = np.lib.format.open_memmap(
            self.tmp_dir / "images.npy", mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3)
        )
        self.landmarks = np.lib.format.open_memmap(
            self.tmp_dir / "landmarks.npy", mode="w+", dtype=np.float32,
            shape=(n, N_POINTS[landmark_layout], 2),
        )

    def finalize(self, index: pd.DataFrame, meta: dict[str, Any]) -> Path:
        if len(index) != self.n:
            raise PreparedFormatError(f"index has {len(index)} rows but {self.n} images were allocated")
        meta = dict(meta, format=FORMAT, version=VERSION, n=self.n, landmark_layout=self.layout,
                    image_size=self.image_size)
        validate_index(index.reset_index(drop=True), meta, where=str(self.tmp_dir))
        self.images.flush()
        self.landmarks.flush()
        del self.images, self.landmarks
        index.reset_index(drop=True).to_parquet(self.tmp_dir / "index.parquet", index=False)
        (self.tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(self.tmp_dir)
        (self.tmp_dir / "COMPLETE").write_text("ok\n")
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir


def _values(col: pd.Series) -> list:
    """Distinct values as plain Python numbers (so error messages read `[9]`, not numpy reprs)."""
    return [v.item() if hasattr(v, "item") else v for v in pd.unique(col)]


def validate_index(index: pd.DataFrame, meta: dict[str, Any], where: str) -> None:
    """Check the label table against meta; raise with the offending column and values."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise PreparedFormatError(f"{where}/meta.json lacks keys {missing}")
    needed = list(PROVENANCE_COLUMNS) + [au_column(a) for a in meta["aus"]]
    needed += [intensity_column(a) for a in meta["intensity_aus"]]
    if meta["expressions"]:
        needed.append("expression")
    absent = [c for c in needed if c not in index.columns]
    if absent:
        raise PreparedFormatError(f"{where}/index.parquet lacks columns {absent}")
    for au in meta["aus"]:
        bad = set(_values(index[au_column(au)])) - {0, 1, UNKNOWN}
        if bad:
            raise PreparedFormatError(
                f"{where}: column {au} has values {sorted(bad)}; occurrence labels must be 0, 1 or {UNKNOWN} "
                "(translate the dataset's own unknown code when preparing)")
    for au in meta["intensity_aus"]:
        vals = set(_values(index[intensity_column(au)]))
        bad = vals - set(range(MAX_INTENSITY + 1)) - {UNKNOWN}
        if bad:
            raise PreparedFormatError(
                f"{where}: column {intensity_column(au)} has values {sorted(bad)}; intensities must be 0-5 "
                f"or {UNKNOWN}")
    if meta["expressions"]:
        k = len(meta["expressions"])
        bad = set(_values(index["expression"])) - set(range(k)) - {UNKNOWN}
        if bad:
            raise PreparedFormatError(
                f"{where}: column expression has values {sorted(bad)}; expected 0..{k - 1} or {UNKNOWN}")


# ------------------------------------------------------------------------------------------------ integrity


def _hash_chunk(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(left, 8 * 2**20))
            if not block:
                break  # shorter than expected: the digest will differ
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _chunk_digests(path: Path, size: int, pool: ThreadPoolExecutor, chunk: int | None = None) -> list[str]:
    """sha256 of each ``chunk``-byte piece of a file (hashlib releases the GIL, so chunks hash in parallel)."""
    chunk = chunk or CHUNK_BYTES
    offsets = range(0, max(size, 1), chunk)
    return list(pool.map(lambda o: _hash_chunk(path, o, min(chunk, size - o)), offsets))


def _file_digest(chunks: list[str]) -> str:
    """A file's digest: sha256 over its chunk digests (a one-level hash list)."""
    return hashlib.sha256("".join(chunks).encode()).hexdigest()


def _hashed_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.name not in _NOT_HASHED and not p.name.startswith(VERIFIED))


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))


def write_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Hash every file of a prepared folder into ``MANIFEST.json``; returns the manifest.

    Called by :meth:`PreparedWriter.finalize`. Run by hand (``python -m aurecog.data.prepared ROOT``) only to
    adopt a folder prepared before manifests existed, after checking that it is intact.
    """
    root = Path(root)
    files = {}
    with _pool() as pool:
        for name in _hashed_files(root):
            size = (root / name).stat().st_size
            chunks = _chunk_digests(root / name, size, pool)
            files[name] = {"size": size, "sha256": _file_digest(chunks), "chunks": chunks}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "chunk_bytes": CHUNK_BYTES, "files": files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """16 hex digits identifying a prepared folder's content (names, sizes and hashes of all its files)."""
    content = {name: [f["size"], f["sha256"]] for name, f in manifest["files"].items()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _fix(root: Path, meta: dict[str, Any] | None = None) -> str:
    if meta is None:
        try:
            meta = json.loads((root / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
    if "generator_version" in meta:
        return f"delete {root} and SynthAU regenerates it (aurecog synth {meta.get('preset', '<preset>')})"
    return (f"prepare it again: `aurecog prepare {meta.get('name', '<dataset>')} --src <distribution> --out {root}` "
            "(or `make prepare DATASET=... SRC=... DATA_ROOT=...`)")


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_memo(root: Path, fingerprint: str) -> dict[str, list[int]]:
    try:
        memo = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return memo.get("files", {}) if isinstance(memo, dict) and memo.get("fingerprint") == fingerprint else {}


def _write_memo(root: Path, fingerprint: str, files: dict[str, list[int]]) -> None:
    """Best effort: a read-only dataset folder is simply hashed again on the next open."""
    tmp = root / f"{VERIFIED}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "files": files}, sort_keys=True))
        os.replace(tmp, root / VERIFIED)
    except OSError:
        tmp.unlink(missing_ok=True)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """``MANIFEST.json`` of a prepared folder; PreparedFormatError (naming the file and the fix) if absent or bad."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise PreparedFormatError(
            f"{path} is missing: {root} was prepared before integrity manifests (or is a foreign folder) and its "
            f"content cannot be checked; {_fix(root)}. To keep a folder you trust as it is, "
            f"`python -m aurecog.data.prepared {root}` writes the manifest")
    try:
        manifest = json.loads(path.read_text())
        ok = manifest.get("format") == MANIFEST_FORMAT and isinstance(manifest.get("files"), dict)
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise PreparedFormatError(f"{path} is unreadable or not an aurecog manifest; {_fix(root)}")
    return manifest


def verify(root: str | os.PathLike, manifest: dict[str, Any] | None = None) -> str:
    """Check a prepared folder against its manifest; return its fingerprint.

    Sizes are checked every time; a file's hashes are checked unless ``.verified.json`` records that this very
    file (same size, mtime and inode) already matched. Raises PreparedFormatError naming the first bad file.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    fingerprint = manifest_fingerprint(manifest)
    chunk = int(manifest.get("chunk_bytes", CHUNK_BYTES))
    memo = _read_memo(root, fingerprint)
    checked: dict[str, list[int]] = {}
    now = time.time()
    with _pool() as pool:
        for name, entry in sorted(manifest["files"].items()):
            path = root / name
            if not path.is_file():
                raise PreparedFormatError(f"{path} is missing (listed in {MANIFEST}); {_fix(root)}")
            st = path.stat()
            if st.st_size != entry["size"]:
                raise PreparedFormatError(
                    f"{path} is {st.st_size} bytes but {MANIFEST} says {entry['size']} (truncated or replaced); "
                    f"{_fix(root)}")
            if memo.get(name) == _stamp(st):
                checked[name] = _stamp(st)
                continue
            chunks = _chunk_digests(path, st.st_size, pool, chunk)
            if chunks != entry["chunks"] or _file_digest(chunks) != entry["sha256"]:
                bad = next((i for i, (a, b) in enumerate(zip(chunks, entry["chunks"])) if a != b), 0)
                raise PreparedFormatError(
                    f"{path} does not match its sha256 in {MANIFEST} (bytes {bad * chunk}-"
                    f"{min((bad + 1) * chunk, st.st_size)} differ: corrupted or overwritten); {_fix(root)}")
            if now - st.st_mtime > RACY_SECONDS:  # a just-written file could change within its mtime tick
                checked[name] = _stamp(st)
    if checked != memo:
        _write_memo(root, fingerprint, checked)
    return fingerprint


@dataclass
class PreparedDataset:
    """Read access to a prepared folder. Arrays are memory-mapped lazily (safe to pickle into workers)."""

    root: Path
    meta: dict[str, Any]
    index: pd.DataFrame
    fingerprint: str = ""  # 16 hex digits of the manifest (see :func:`manifest_fingerprint`): the data version
    _images: np.ndarray | None = None
    _landmarks: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedDataset:
        """Open a prepared folder after checking it against its manifest (:func:`verify`)."""
        root = Path(root)
        if not root.is_dir():
            raise PreparedFormatError(
                f"prepared dataset folder {root} does not exist; create it with `aurecog prepare` "
                "(real data) or let SynthAU generate it (synthetic presets)")
        if not (root / "COMPLETE").exists():
            raise PreparedFormatError(
                f"{root} has no COMPLETE marker: an interrupted or foreign write. Re-run the preparation.")
        for name in ("meta.json", "images.npy", "landmarks.npy", "index.parquet"):
            if not (root / name).exists():
                raise PreparedFormatError(f"{root}/{name} is missing; {_fix(root)}")
        manifest = read_manifest(root)
        missing = [n for n in ("meta.json", "images.npy", "landmarks.npy", "index.parquet")
                   if n not in manifest["files"]]
        if missing:
            raise PreparedFormatError(f"{root / MANIFEST} does not cover {missing}; {_fix(root)}")
        fingerprint = verify(root, manifest)
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PreparedFormatError(
                f"{root}/meta.json says format {meta.get('format')!r} v{meta.get('version')}; "
                f"this aurecog reads {FORMAT!r} v{VERSION}. Re-run the preparation.")
        index = pd.read_parquet(root / "index.parquet")
        validate_index(index, meta, str(root))
        ds = cls(root=root, meta=meta, index=index, fingerprint=fingerprint)
        if ds.images.shape[0] != len(index) or ds.landmarks.shape[0] != len(index):
            raise PreparedFormatError(
                f"{root}: images.npy has {ds.images.shape[0]} frames, landmarks.npy "
                f"{ds.landmarks.shape[0]}, index.parquet {len(index)} rows; they must match")
        return ds

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = state["_landmarks"] = None  # re-open the memmap in each worker
        return state

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
        return self._images

    @property
    def landmarks(self) -> np.ndarray:
        if self._landmarks is None:
            self._landmarks = np.load(self.root / "landmarks.npy", mmap_mode="r")
        return self._landmarks

    @property
    def aus(self) -> list[str]:
        return list(self.meta["aus"])

    @property
    def intensity_aus(self) -> list[str]:
        return list(self.meta["intensity_aus"])

    @property
    def expressions(self) -> list[str]:
        return list(self.meta["expressions"] or [])

    def __len__(self) -> int:
        return len(self.index)


def main(argv: list[str] | None = None) -> int:
    """``python -m aurecog.data.prepared ROOT...``: write the manifest of folders prepared before manifests."""
    import sys

    roots = sys.argv[1:] if argv is None else argv
    if not roots:
        print("usage: python -m aurecog.data.prepared ROOT [ROOT ...]  (writes ROOT/MANIFEST.json)")
        return 2
    for r in roots:
        root = Path(r)
        if not (root / "COMPLETE").exists():
            print(f"error: {root} has no COMPLETE marker; prepare it again instead")
            return 1
        print(f"{root}: fingerprint {manifest_fingerprint(write_manifest(root))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
