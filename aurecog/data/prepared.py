"""The prepared-dataset format, written by SynthAU and by every real-dataset preparer.

A prepared dataset is one folder::

    meta.json            format name + version, AU names, label conventions, image size, landmark layout
    images.npy           uint8 array N x H x W x 3 (RGB), opened with ``mmap_mode="r"``: random access,
                         no decode, nothing read into RAM until a sample is indexed
    landmarks.npy        float32 array N x L x 2, pixel coordinates (x right, y down) in ``images.npy``
    index.parquet        one row per frame, row i describes images[i]
    COMPLETE             written last; a folder without it is an interrupted write and is rejected

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

import json
import os
import shutil
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


class PreparedFormatError(ValueError):
    """A prepared dataset folder is missing, incomplete or inconsistent."""


def au_column(au: str) -> str:
    return au


def intensity_column(au: str) -> str:
    return f"{au}_int"


class PreparedWriter:
    """Writes a prepared dataset of a known size, atomically.

    Everything goes into ``<out>.partial/``; :meth:`finalize` validates, writes ``COMPLETE`` and renames the
    folder into place, so a reader never sees half a dataset. Images are written straight into the
    memory-mapped array, so memory use does not grow with N.
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
                f"{where}: column {intensity_column(au)} has values {sorted(bad)}; intensities must be 0-5 or {UNKNOWN}")
    if meta["expressions"]:
        k = len(meta["expressions"])
        bad = set(_values(index["expression"])) - set(range(k)) - {UNKNOWN}
        if bad:
            raise PreparedFormatError(
                f"{where}: column expression has values {sorted(bad)}; expected 0..{k - 1} or {UNKNOWN}")


@dataclass
class PreparedDataset:
    """Read access to a prepared folder. Arrays are memory-mapped lazily (safe to pickle into workers)."""

    root: Path
    meta: dict[str, Any]
    index: pd.DataFrame
    _images: np.ndarray | None = None
    _landmarks: np.ndarray | None = None

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedDataset:
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
                raise PreparedFormatError(f"{root}/{name} is missing; re-run the preparation")
        meta = json.loads((root / "meta.json").read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PreparedFormatError(
                f"{root}/meta.json says format {meta.get('format')!r} v{meta.get('version')}; "
                f"this aurecog reads {FORMAT!r} v{VERSION}. Re-run the preparation.")
        index = pd.read_parquet(root / "index.parquet")
        validate_index(index, meta, str(root))
        ds = cls(root=root, meta=meta, index=index)
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
