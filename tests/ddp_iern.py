"""Standalone 2-process CPU DDP run of IERN's manual three-optimizer loop (launched by tests/test_iern.py).

Usage: ``python tests/ddp_iern.py OUT_DIR [variant]``. Lightning's DDP launcher re-executes this script for
rank 1. Each rank writes its final parameters to ``OUT_DIR/rank<r>.pt`` and the initial ones to
``OUT_DIR/init.pt`` (rank 0), so the test can check that training changed the weights identically on both ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import dataset_config, make_prepared  # noqa: E402

from aurecog.config import resolve  # noqa: E402
from aurecog.data.datamodule import AUDataModule  # noqa: E402
from aurecog.models.registry import build_model  # noqa: E402


def main(out: Path, variant: str = "iern") -> None:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "fake" / "index.parquet").exists() and not (data / "fake").exists():
        make_prepared(data / "fake", n_subjects=6, per_subject=8, datasets=("d0", "d1", "d2"))
    dm = AUDataModule(dataset_config("fake", task="expression", confounder="dataset"), fold=0, data_root=str(data),
                      input_size=32, batch_size=4)
    dm.setup()
    cfg = resolve(variant, "synth", "quick")
    cfg["data"]["input_size"] = 32
    cfg["iern"].update(feat_dim=8, dis_channels=[8, 8, 8, 8])
    L.seed_everything(0)
    model = build_model(cfg, dm.task_spec, dm.stats)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=1,
                        limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "init.pt")
    trainer.fit(model, datamodule=dm)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(sys.argv[2:3]))
