"""One LightningDataModule family for every dataset, protocol and fold.

Batches are dicts:

=================  ===========================================================================================
``image``          float B x 3 x S x S, normalised with the model's mean/std
``landmarks``      float B x L x 2, pixel coordinates in ``image`` after crop/flip, layout ``dm.landmark_layout``
``target``         the task's labels: AU occurrence B x C (float, -1 unknown), intensities B x C (float 0-5,
                   -1 unknown) or expression B (long, -1 none)
``target_mask``    bool, known entries of ``target``
``au``/``au_mask`` AU occurrence of the dataset's AU set (whatever the task), when the dataset has AUs
``intensity``      B x C_int (float, -1 unknown), when the dataset codes intensities
``expression``     B (long, -1 none), when the dataset has expression labels
``subject``        B (long), index into ``dm.subject_names`` (every subject of every split)
``train_subject``  B (long), index into ``dm.stats.subjects`` or -1 for a subject not in the fitting set
``confounder``     B (long), index into ``dm.stats.confounders`` (subject or source dataset) or -1
``sample``         B (long), row of the frame in its prepared dataset; ``source`` B (long) 0 = main, 1 = cross
``flipped``        B (bool)
=================  ===========================================================================================
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from aurecog import config as C
from aurecog.data.landmarks import to_intraface49
from aurecog.data.prepared import UNKNOWN, PreparedDataset, intensity_column
from aurecog.data.protocols import (carve_validation, common_labels, cross_dataset_rows, in_distribution_rows, num_folds,
                                    split_rows)
from aurecog.data.transforms import FaceTransform
from aurecog.tasks import TaskSpec, TrainStats

log = logging.getLogger(__name__)


class DataRootError(FileNotFoundError):
    pass


def load_config(dataset: str | dict) -> dict:
    """A dataset config: a name under ``configs/datasets`` or such a config given inline as a dict."""
    return dict(dataset) if isinstance(dataset, dict) else C.load_dataset(dataset)


def open_source(ds_cfg: dict, data_root: str | os.PathLike | None, synth_seed: int = 0,
                progress: bool = True) -> PreparedDataset:
    """Open (and for SynthAU, generate on first use) the prepared dataset of a dataset config. A SynthAU config
    may set ``synth_overrides`` (Preset fields, e.g. ``{n_subjects: 4}``; tests use tiny presets)."""
    if ds_cfg.get("source") == "synth":
        from aurecog.data.synth import generate

        return PreparedDataset.open(generate(ds_cfg.get("preset", ds_cfg["name"]), seed=synth_seed, progress=progress,
                                             overrides=ds_cfg.get("synth_overrides")))
    root = data_root or os.environ.get("DATA_ROOT")
    name = ds_cfg["name"]
    folder = ds_cfg.get("prepared_dir", name)
    if not root:
        raise DataRootError(
            f"dataset {name!r} is licensed and not shipped with aurecog. Obtain it from its owners "
            f"({ds_cfg.get('obtain', 'see README, table of datasets')}), prepare it with "
            f"`aurecog prepare {name} --src <distribution folder> --out <DATA_ROOT>/{folder}`, then pass "
            f"DATA_ROOT=<DATA_ROOT> (or --data-root).")
    path = Path(root) / folder
    if not path.exists():
        raise DataRootError(
            f"{path} does not exist. Prepare {name!r} with "
            f"`aurecog prepare {name} --src <distribution folder> --out {path}`")
    return PreparedDataset.open(path)


def _task_targets(ds: PreparedDataset, kind: str, names: list[str], from_intensity: float | None = None) -> np.ndarray:
    """Label array of ``kind`` for ``names``; a label the dataset lacks is unknown (-1). ``from_intensity``: AU
    occurrence re-derived as intensity >= this from the ``AU<k>_int`` columns (a protocol's positive_threshold)."""
    idx = ds.index
    if kind == "au":
        out = np.full((len(idx), len(names)), UNKNOWN, dtype=np.float32)
        for j, n in enumerate(names):
            if from_intensity is not None:
                c = intensity_column(n)
                if c not in idx.columns:
                    raise C.ConfigError(
                        f"{ds.root}: the protocol sets positive_threshold (occurrence from intensity) but the data "
                        f"has no {c} column; drop positive_threshold from the protocol or prepare intensities")
                v = idx[c].to_numpy()
                out[:, j] = np.where(v >= 0, (v >= from_intensity).astype(np.float32), UNKNOWN)
            elif n in idx.columns:
                out[:, j] = idx[n].to_numpy()
        return out
    if kind == "intensity":
        out = np.full((len(idx), len(names)), UNKNOWN, dtype=np.float32)
        for j, n in enumerate(names):
            c = intensity_column(n)
            if c in idx.columns:
                out[:, j] = idx[c].to_numpy()
        return out
    if "expression" not in idx.columns:
        return np.full(len(idx), UNKNOWN, dtype=np.int64)
    ds_names = ds.expressions
    remap = np.array([names.index(n) if n in names else UNKNOWN for n in ds_names] + [UNKNOWN])
    e = idx["expression"].to_numpy().astype(np.int64)
    return remap[np.where(e < 0, len(ds_names), e)]


class _RowView:
    """``view[r]`` reads row ``r`` of a concatenation of per-source arrays (memmaps stay memory-mapped)."""

    def __init__(self, parts: list[PreparedDataset], attr: str, to49: list[str | None]):
        self.parts, self.attr, self.to49 = parts, attr, to49
        self.starts = np.cumsum([0] + [len(p.index) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, r: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, r, side="right")) - 1
        v = np.asarray(getattr(self.parts[i], self.attr)[int(r) - int(self.starts[i])])
        return to_intraface49(v, self.to49[i]) if self.to49[i] else v


class CombinedSource:
    """Several prepared datasets read as one (the training side of a leave-one-dataset-out protocol): the index
    is their concatenation with ``subject`` namespaced as ``<dataset config>/<subject>`` (BP4D and BP4D+ both
    have an F001) and a ``source_dataset`` column; labels are ``labels`` (the protocol's common AUs), each
    source's own occurrence coding. Landmarks of mixed layouts are all reduced to the 49 IntraFace points."""

    def __init__(self, parts: dict[str, PreparedDataset], labels: list[str], layout: str):
        self.names, self.parts = list(parts), list(parts.values())
        frames = []
        for name, ds in parts.items():
            idx = ds.index.copy()
            idx["subject"] = name + "/" + idx["subject"].astype(str)
            idx["source_dataset"] = name
            for n in labels:
                if n not in idx.columns:
                    idx[n] = UNKNOWN
            frames.append(idx)
        self.index = pd.concat(frames, ignore_index=True)
        for n in labels:
            self.index[n] = self.index[n].astype(np.int8)
        self.root = Path("+".join(self.names))
        to49 = [None if ds.meta["landmark_layout"] == layout else ds.meta["landmark_layout"] for ds in self.parts]
        self.images = _RowView(self.parts, "images", [None] * len(self.parts))
        self.landmarks = _RowView(self.parts, "landmarks", to49)
        sizes = {ds.meta.get("image_size") for ds in self.parts}
        if len(sizes) > 1:
            raise C.ConfigError(f"datasets {self.names} were prepared at different image sizes {sorted(sizes)}; "
                                "prepare them at one size (aurecog prepare --image-size)")
        self.meta = {"name": str(self.root), "aus": list(labels), "intensity_aus": [], "expressions": [],
                     "landmark_layout": layout, "image_size": sizes.pop(), "datasets": self.names}
        self.aus, self.intensity_aus, self.expressions = list(labels), [], []


def _common_layout(sources: list) -> str:
    layouts = {ds.meta["landmark_layout"] for ds in sources}
    return layouts.pop() if len(layouts) == 1 else "intraface49"


class FaceDataset(Dataset):
    """Rows of one prepared dataset with precomputed label arrays; images stay memory-mapped."""

    def __init__(self, ds: PreparedDataset, rows: np.ndarray, arrays: dict[str, np.ndarray],
                 transform: FaceTransform, source: int = 0):
        self.ds, self.rows, self.transform, self.source = ds, np.asarray(rows, dtype=np.int64), transform, source
        self.arrays = {k: v[self.rows] for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = int(self.rows[i])
        image, lm, flipped = self.transform(np.asarray(self.ds.images[r]), np.asarray(self.ds.landmarks[r]))
        item = {"image": image, "landmarks": lm, "sample": r, "source": self.source, "flipped": flipped}
        for k, v in self.arrays.items():
            item[k] = torch.as_tensor(v[i])
        return item


class AUDataModule(L.LightningDataModule):
    """DataModule for ``dataset`` (a name under ``configs/datasets``, or such a config as a dict), ``protocol``
    and ``fold``.

    ``task`` picks the labels (``au``, ``intensity``, ``expression``; default from the dataset config). The label
    set is ``labels`` if given, else the protocol's ``labels``, else the dataset config's. After :meth:`setup`,
    ``task_spec`` and ``stats`` (training-set statistics) describe the problem to the model.
    """

    def __init__(self, dataset: str | dict = "synth", protocol: str | None = None, fold: int = 0, task: str | None = None,
                 data_root: str | None = None, input_size: int = 64, resize: int | None = None,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), augment: dict | None = None,
                 confounder: str | None = None, val_fraction: float | None = None, split_seed: int = 0,
                 synth_seed: int = 0, labels: list[str] | None = None, max_train_samples: int | None = None,
                 progress: bool = True):
        super().__init__()
        self.cfg = load_config(dataset)
        self.name = self.cfg["name"]
        self.protocol_name = protocol or self.cfg.get("default_protocol")
        protocols = self.cfg.get("protocols") or {}
        if self.protocol_name not in protocols:
            raise C.ConfigError(
                f"dataset {dataset!r} has no protocol {self.protocol_name!r}; protocols: {', '.join(protocols)}")
        self.protocol = protocols[self.protocol_name]
        self.n_folds = num_folds(self.protocol)
        if not 0 <= fold < self.n_folds:
            raise C.ConfigError(f"fold {fold} out of range for {dataset}/{self.protocol_name} (0..{self.n_folds - 1})")
        self.fold = fold
        self.kind = task or self.cfg.get("task", "au")
        self.data_root, self.synth_seed, self.progress = data_root, synth_seed, progress
        self.input_size, self.resize = input_size, resize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = dict(augment or {})
        self.confounder_kind = confounder or self.cfg.get("confounder", "subject")
        self.val_fraction = self.cfg.get("val_fraction", 0.15) if val_fraction is None else val_fraction
        self.split_seed = split_seed
        self.label_subset = labels or self._protocol_labels()
        self.max_train_samples = max_train_samples
        self._is_setup = False

    def _protocol_labels(self) -> list[str] | None:
        """The protocol's ``labels`` (a list, or task -> list; null = every label of the task), else the dataset
        config's ``labels``."""
        unset = object()
        pl = self.protocol.get("labels", unset)
        if isinstance(pl, dict):
            pl = pl.get(self.kind, unset)
        if pl is unset:
            return self.cfg.get("labels")
        return list(pl) if pl else None

    def _other_configs(self) -> list[dict]:
        """Dataset configs other than this one that the protocol reads (names or inline dicts)."""
        p = self.protocol
        if p["type"] == "cross_dataset":
            return [load_config(p["test_dataset"])]
        if p["type"] == "leave_one_dataset_out":
            return [load_config(d) for d in p["train_datasets"]]
        return []

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        """Generate SynthAU presets once (Lightning calls this on one process per node, before ``setup``), so
        DDP ranks never write the same cache folder at the same time."""
        for cfg in [self.cfg, *self._other_configs()]:
            if cfg.get("source") == "synth":
                open_source(cfg, self.data_root, self.synth_seed, self.progress)

    def _lodo_sources(self, main: PreparedDataset) -> tuple[CombinedSource, PreparedDataset | CombinedSource]:
        """(training source, test source) of a leave-one-dataset-out protocol: train on every frame of the
        ``train_datasets``, test on every frame of this dataset, on their common AUs."""
        if self.kind != "au":
            raise C.ConfigError(f"{self.name}/{self.protocol_name}: leave_one_dataset_out is an AU-occurrence "
                                f"protocol; task {self.kind!r} is not supported")
        cfgs = self._other_configs()
        if self.name in [c["name"] for c in cfgs]:
            raise C.ConfigError(f"{self.name}/{self.protocol_name}: train_datasets lists the held-out dataset "
                                f"{self.name!r} itself; remove it")
        srcs = {c["name"]: open_source(c, self.data_root, self.synth_seed, self.progress) for c in cfgs}
        label_sets = {self.name: list(self.cfg.get("labels") or main.aus)}
        label_sets.update({c["name"]: list(c.get("labels") or srcs[c["name"]].aus) for c in cfgs})
        wanted = list(self.label_subset) if self.label_subset and self.label_subset != self.cfg.get("labels") else None
        labels = common_labels(label_sets, wanted, where=f"{self.name}/{self.protocol_name}")
        self.label_subset = labels
        layout = _common_layout([main, *srcs.values()])
        train = CombinedSource(srcs, labels, layout)
        test = main if main.meta["landmark_layout"] == layout else CombinedSource({self.name: main}, labels, layout)
        return train, test

    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:
            return
        main = open_source(self.cfg, self.data_root, self.synth_seed, self.progress)
        kind = self.protocol["type"]
        where = f"{main.root} (protocol {self.protocol_name})"
        test_ds = main
        if kind == "leave_one_dataset_out":
            main, test_ds = self._lodo_sources(main)
            train_rows, test_rows = np.arange(len(main.index)), np.arange(len(test_ds.index))
        elif kind == "cross_dataset":
            other = self._other_configs()[0]
            test_ds = open_source(other, self.data_root, self.synth_seed, self.progress)
            train_rows, test_rows = cross_dataset_rows(self.protocol, self.fold, main.index, self.cfg["protocols"],
                                                       test_ds.index, other.get("protocols") or {}, where=where)
        else:
            train_rows, test_rows = split_rows(main.index, self.protocol, self.fold,
                                               label_names=main.expressions, where=where)
        # heldout_cells id_fraction: in-distribution test sequences, scored apart (split "test_id")
        id_rows = np.zeros(0, dtype=np.int64)
        if self.protocol.get("id_fraction"):
            train_rows, id_rows = in_distribution_rows(main.index, self.protocol, self.fold, train_rows,
                                                       main.expressions, where=where)
        self.landmark_layout = main.meta["landmark_layout"]
        names = self._label_names(main)
        threshold = self.protocol.get("positive_threshold", self.cfg.get("positive_threshold"))
        self.occurrence_from_intensity = self.protocol.get("positive_threshold")
        threshold = float(threshold if threshold is not None else (main.meta.get("positive_threshold") or 2))
        self.task_spec = TaskSpec(self.kind, names, positive_threshold=threshold)

        fit_rows, val_rows = carve_validation(main.index, train_rows, self.val_fraction,
                                              seed=f"{self.name}/{self.protocol_name}/{self.fold}/{self.split_seed}")
        main_arrays = self._arrays(main)
        test_arrays = main_arrays if test_ds is main else self._arrays(test_ds)
        if self.kind == "expression":  # frames without an expression label carry nothing to learn or score
            fit_rows, val_rows = (r[main_arrays["target"][r] >= 0] for r in (fit_rows, val_rows))
            dropped = int((test_arrays["target"][test_rows] < 0).sum())
            test_rows = test_rows[test_arrays["target"][test_rows] >= 0]
            id_rows = id_rows[main_arrays["target"][id_rows] >= 0]
            if dropped:
                log.info("expression task: %d test frames without an expression label are not scored", dropped)
        if self.max_train_samples and len(fit_rows) > self.max_train_samples:
            keep = np.random.default_rng(0).choice(len(fit_rows), self.max_train_samples, replace=False)
            fit_rows = np.sort(fit_rows[keep])
        self.split_rows = {"train": fit_rows, "val": val_rows, "test": test_rows}
        self.split_sources = {"train": main, "val": main, "test": test_ds}
        if len(id_rows):
            self.split_rows["test_id"], self.split_sources["test_id"] = id_rows, main

        # subject and confounder indices
        subj_main = main.index["subject"].astype(str).to_numpy()
        train_subjects = sorted(set(subj_main[fit_rows]))
        self.subject_names = sorted(set(subj_main) | set(test_ds.index["subject"].astype(str)))
        if self.confounder_kind == "subject":
            conf_col_main, confounders = subj_main, train_subjects
        elif self.confounder_kind == "dataset":
            conf_col_main = main.index["dataset"].astype(str).to_numpy()
            confounders = sorted(set(conf_col_main[fit_rows]))
        else:
            raise C.ConfigError(f"confounder must be 'subject' or 'dataset', got {self.confounder_kind!r}")
        self.stats = self._stats(main_arrays["target"][fit_rows], subj_main[fit_rows], train_subjects,
                                 conf_col_main[fit_rows], confounders)
        self.fit_targets = main_arrays["target"][fit_rows]  # the fitting rows' task targets (trivial floors)
        for ds, arrays in ((main, main_arrays), (test_ds, test_arrays)):
            subj = ds.index["subject"].astype(str).to_numpy()
            arrays["subject"] = np.searchsorted(self.subject_names, subj).astype(np.int64)
            arrays["train_subject"] = _lookup(subj, train_subjects)
            conf = subj if self.confounder_kind == "subject" else ds.index["dataset"].astype(str).to_numpy()
            arrays["confounder"] = _lookup(conf, confounders)
        self.split_arrays = {"train": main_arrays, "val": main_arrays, "test": test_arrays, "test_id": main_arrays}
        self._is_setup = True

    def _label_names(self, ds: PreparedDataset) -> list[str]:
        if self.kind == "au":
            names = ds.aus
        elif self.kind == "intensity":
            names = ds.intensity_aus
            if not names:
                raise C.ConfigError(f"dataset {self.name!r} has no intensity labels; use task 'au'")
        else:
            names = ds.expressions
            if not names:
                raise C.ConfigError(f"dataset {self.name!r} has no expression labels")
        if self.label_subset:
            unknown = [n for n in self.label_subset if n not in names]
            if unknown:
                raise C.ConfigError(f"labels {unknown} are not in dataset {self.name!r} (has {names})")
            names = list(self.label_subset)
        return list(names)

    def _arrays(self, ds: PreparedDataset) -> dict[str, np.ndarray]:
        names = self.task_spec.names
        occ = self.occurrence_from_intensity
        arrays = {"target": _task_targets(ds, self.kind, names, occ if self.kind == "au" else None)}
        if ds.aus:
            arrays["au"] = _task_targets(ds, "au", ds.aus if self.kind != "au" else names, occ)
        if ds.intensity_aus:
            arrays["intensity"] = _task_targets(ds, "intensity", ds.intensity_aus)
        if ds.expressions:
            arrays["expression"] = _task_targets(ds, "expression", ds.expressions)
        return arrays

    def _stats(self, y: np.ndarray, subj: np.ndarray, subjects: list[str], conf: np.ndarray,
               confounders: list[str]) -> TrainStats:
        kind = self.kind
        if kind == "expression":
            k = self.task_spec.num_outputs
            onehot = np.eye(k, dtype=np.float64)[y]
            pos = onehot.sum(0)
            neg = len(y) - pos
            corr = _pearson(onehot)
        else:
            known = y >= 0
            binary = y >= self.task_spec.positive_threshold if kind == "intensity" else y > 0
            pos = (binary & known).sum(0)
            neg = known.sum(0) - pos
            rows = known.all(1)
            corr = _pearson(y[rows].astype(np.float64))
        rate = pos / np.maximum(pos + neg, 1)
        return TrainStats(
            n_train=int(len(y)), label_rate=rate.tolist(), n_pos=pos.astype(int).tolist(),
            n_neg=neg.astype(int).tolist(), label_corr=corr.tolist(), subjects=list(subjects),
            subject_counts=[int((subj == s).sum()) for s in subjects], confounder=self.confounder_kind,
            confounders=list(confounders), confounder_counts=[int((conf == c).sum()) for c in confounders])

    # ------------------------------------------------------------------ loaders
    def transform(self, train: bool) -> FaceTransform:
        a = self.augment
        return FaceTransform(train and a.get("enabled", True), crop=self.input_size, resize=self.resize,
                             layout=self.landmark_layout, mean=self.mean, std=self.std,
                             flip_p=a.get("flip_p", 0.5), brightness=a.get("brightness", 0.2),
                             contrast=a.get("contrast", 0.2), jitter_p=a.get("jitter_p", 0.5),
                             affine=a.get("affine"), blur=a.get("blur"))

    def dataset(self, split: str) -> FaceDataset:
        self.setup()
        return FaceDataset(self.split_sources[split], self.split_rows[split], self.split_arrays[split],
                           self.transform(split == "train"), source=int(self.split_sources[split] is not
                                                                         self.split_sources["train"]))

    def _world(self) -> tuple[int, int]:
        t = getattr(self, "trainer", None)
        if t is not None and t.world_size > 1:
            return t.world_size, t.global_rank
        return 1, 0

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        world, rank = self._world()
        train = split == "train"
        sampler = None
        if world > 1:
            if train:
                sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=self.split_seed,
                                             drop_last=True)
            else:  # every evaluation sample exactly once: no padding duplicates (engineering notes 2.4)
                from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

                sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        bs = self.batch_size if train else self.eval_batch_size
        return DataLoader(ds, batch_size=bs, shuffle=train and sampler is None, sampler=sampler,
                          num_workers=self.num_workers, drop_last=train and len(ds) > bs,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def test_id_dataloader(self):
        """The in-distribution test set of a ``heldout_cells`` protocol with ``id_fraction`` (else empty)."""
        return self._loader("test_id")

    def predict_dataloader(self):
        return self._loader("test")

    def split_index(self, split: str) -> pd.DataFrame:
        """Provenance rows (dataset, subject, session, frame, ...) of a split, in loader order."""
        self.setup()
        return self.split_sources[split].index.iloc[self.split_rows[split]].reset_index(drop=True)


def datamodule_from_config(cfg: dict, fold: int, data_root: str | None = None, progress: bool = True) -> AUDataModule:
    """The DataModule of a resolved cell config (``data.*``, dataset, protocol, task, confounder, labels)."""
    d = cfg.get("data", {})
    return AUDataModule(
        dataset=cfg.get("dataset_config") or cfg["dataset"], protocol=cfg.get("protocol"), fold=fold,
        task=cfg.get("task"),
        data_root=data_root, input_size=d.get("input_size", 64), resize=d.get("resize"),
        batch_size=d.get("batch_size", 32), eval_batch_size=d.get("eval_batch_size"),
        num_workers=d.get("num_workers", 0), mean=d.get("mean", (0.5,) * 3), std=d.get("std", (0.5,) * 3),
        augment=d.get("augment"), confounder=cfg.get("confounder"), val_fraction=d.get("val_fraction"),
        split_seed=d.get("split_seed", 0), synth_seed=d.get("synth_seed", 0), labels=cfg.get("labels"),
        max_train_samples=d.get("max_train_samples"), progress=progress)


def _lookup(values: np.ndarray, table: list[str]) -> np.ndarray:
    pos = {v: i for i, v in enumerate(table)}
    return np.array([pos.get(v, -1) for v in values], dtype=np.int64)


def _pearson(x: np.ndarray) -> np.ndarray:
    if len(x) < 2:
        return np.eye(x.shape[1])
    x = x - x.mean(0, keepdims=True)
    cov = x.T @ x
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    denom = np.outer(std, std)
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    np.fill_diagonal(corr, 1.0)
    return corr
