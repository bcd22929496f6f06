"""CISNet memory banks under DDP: fit a small CISNet for two epochs and save the confounder dictionary.

Usage: ``python tests/ddp_cisnet_bank.py DATA_ROOT OUT_DIR DEVICES``. ``tests/test_cisnet.py`` runs it with
2 CPU processes (Lightning's DDP launcher re-executes this script for rank 1) and compares the dictionary with a
single-process run of :func:`run`. Each rank writes ``OUT_DIR/dict_rank<r>.pt`` holding the dictionary built
from the bank-only epoch 0 (read at the first batch of epoch 1), the one built from epoch 1 (which trains with
DDP; read at the first batch of epoch 2) and the parameters after the fit (equal on both ranks iff the gradients
were all-reduced).

The backbone is replaced by a per-sample map (no batch norm), so a sample's feature does not depend on which
batch or rank it lands in; augmentation is off and the batch size is 1, so both runs see every training sample
exactly once per epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from helpers import dataset_config  # tests/ is on sys.path: this file runs as a script or from pytest
from torch import nn

from aurecog.config import resolve
from aurecog.data.datamodule import AUDataModule
from aurecog.models.registry import build_model

INPUT_SIZE = 24


def _dictionary(model) -> dict:
    return {"prototypes": model.prototypes.detach().cpu().clone(), "priors": model.priors.detach().cpu().clone(),
            "ready": bool(model.dictionary_ready)}


class _Record(L.Callback):
    """The dictionary each epoch trains with: CISNet builds it from the previous epoch's bank when the epoch starts
    (after the callbacks' ``on_train_epoch_start``), so read it at the epoch's first batch."""

    def __init__(self):
        self.by_epoch: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.by_epoch[trainer.current_epoch] = _dictionary(pl_module)


def run(data_root: str, out_dir: str, devices: int) -> dict:
    torch.set_num_threads(1)
    dm = AUDataModule(dataset_config(), fold=0, data_root=data_root, input_size=INPUT_SIZE, batch_size=1,
                      augment={"enabled": False}, val_fraction=0.2)
    cfg = resolve("cisnet", "synth", "quick")
    L.seed_everything(0)
    dm.setup("fit")
    model = build_model(cfg, dm.task_spec, dm.stats)
    feat_dim = model.projector.in_features
    model.backbone = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, feat_dim), nn.Tanh())
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    rec = _Record()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[rec])
    trainer.fit(model, datamodule=dm)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = {"epoch0": rec.by_epoch[1], "epoch1": rec.by_epoch[2], "n_train": len(dm.split_rows["train"]),
              "params": params, "initial_params": initial,
              "world_size": trainer.world_size, "global_step": trainer.global_step}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"dict_rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
