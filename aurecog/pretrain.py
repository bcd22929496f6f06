"""SynthAU trunk pretraining: the initialisation the quick profile gives every model (``make pretrain``).

The papers start their ResNets from ImageNet; the quick CPU profile has narrow trunks for which no ImageNet
weights exist, and from scratch AC²D and RE-Net do not learn in its ~300 steps (issue 17). So each quick trunk is
trained once, here, on the ``synth-pretrain`` preset (:data:`aurecog.data.synth.PRESETS`: 90 subjects whose
identities are disjoint from every benchmark preset, no subject habits, the 15 AUs of the AU presets) as a
multi-label AU detector (trunk -> pooled feature -> linear head, class-balanced BCE), and its trunk weights are
written to ``pretrained/synthau/<trunk>.pth`` with ``<trunk>.json`` beside it (command, wall time, revision, lock
hash, data version, sha256, metrics on held-out pretraining subjects).

Trunks (``configs/pretrain/synthau.yaml``), each the trunk of a quick model config (so the architecture is the one
the cells build):

* ``resnet18`` / ``resnet34`` / ``resnet50``: the narrow timm ResNets (stages 16-128) of the quick profile, saved
  as a timm state dict without classifier, the format ``backbone.pretrained_file`` loads
  (:func:`aurecog.models.backbones.load_pretrained_file`). RE-Net's conditional BNs start from these BNs; IERN's
  output stride 8 dilates the same weights.
* ``ac2d``: :class:`aurecog.models.ac2d.AC2DNet` with ONE stage-3 branch whose pooled feature feeds a linear head
  for all AUs; :func:`aurecog.models.ac2d.load_pretrained_net` copies that branch into every AU branch.

Usage: ``python -m aurecog.pretrain [--trunks resnet18,ac2d] [--out DIR] [--epochs N] [--limit-batches N]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAUROC, MultilabelF1Score

from aurecog import config as C
from aurecog.data.datamodule import AUDataModule
from aurecog.data.synth import GENERATOR_VERSION
from aurecog.models.backbones import create_backbone, file_sha256

log = logging.getLogger(__name__)

CONFIG_FILE = C.CONFIG_DIR / "pretrain" / "synthau.yaml"
#: ``ac2d.*`` keys that define AC2DNet's architecture (the rest are the loss and causal module)
AC2D_ARCH_KEYS = ("width", "depths", "heads", "sr_ratios", "mlp_ratio", "drop_path", "first_stride")
#: ``backbone.*`` keys that only say where weights come from (dropped: pretraining starts from scratch)
WEIGHT_KEYS = ("pretrained", "pretrained_file", "pretrained_tag")
#: dtype of the stored weights (loaders cast to the model's): float16 keeps the ResNet-34/50 files under 5 MB
STORE_DTYPE = torch.float16
_ARGV: list[str] = []  # the command line main() was given, for the <trunk>.json record


def load_pretrain_config(path: str | os.PathLike = CONFIG_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def trunk_spec(name: str, pcfg: dict) -> dict:
    """``{"kind": "timm", "backbone": {...}}`` or ``{"kind": "ac2d", "ac2d": {...}}``: the architecture of trunk
    ``name``, read from the resolved quick config of its model (``trunks.<name>.model``)."""
    t = pcfg["trunks"][name]
    cfg = C.resolve(t["model"], "synth", pcfg.get("profile", "quick"))
    if cfg["model"]["family"] == "ac2d":  # trunks.ac2d.ac2d: pretraining-only settings (drop_path)
        a = C.deep_merge({k: cfg["ac2d"][k] for k in AC2D_ARCH_KEYS if k in cfg["ac2d"]}, t.get("ac2d") or {})
        return {"kind": "ac2d", "ac2d": a}
    b = {k: v for k, v in C.deep_merge(cfg.get("backbone") or {}, t.get("backbone") or {}).items()
         if k not in WEIGHT_KEYS}
    b.pop("output_stride", None)  # a trunk's weights do not depend on its dilation (IERN's output stride 8)
    return {"kind": "timm", "backbone": b}


def build_trunk(spec: dict) -> tuple[nn.Module, int]:
    """The trunk network of a :func:`trunk_spec` (fresh initialisation) and its pooled-feature width."""
    if spec["kind"] == "ac2d":
        from aurecog.models.ac2d import AC2DNet

        a = spec["ac2d"]
        net = AC2DNet(1, int(a.get("width", 64)), tuple(a.get("depths", (1, 6, 3))), tuple(a.get("heads", (1, 2, 4))),
                      tuple(a.get("sr_ratios", (4, 2, 1))), int(a.get("mlp_ratio", 4)), float(a.get("drop_path", 0.1)),
                      int(a.get("first_stride", 1)))
        return net, net.norm.weight.shape[-1]
    return create_backbone(**spec["backbone"])


class TrunkPretrainer(L.LightningModule):
    """Trunk -> pooled feature -> linear head over the pretraining AUs; class-balanced BCE (positives weighted by
    negatives / positives of the training labels), AdamW with cosine decay (and optional linear warm-up)."""

    def __init__(self, spec: dict, n_labels: int, label_rate: list[float], lr: float, weight_decay: float,
                 epochs: int, warmup_epochs: int = 0, balanced: bool = True):
        super().__init__()
        self.spec = spec
        self.trunk, dim = build_trunk(spec)
        self.head = nn.Linear(dim, n_labels)
        rate = torch.tensor(label_rate, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
        self.register_buffer("pos_weight", (1 - rate) / rate if balanced else torch.ones_like(rate))
        self.lr, self.weight_decay, self.epochs, self.warmup = lr, weight_decay, epochs, warmup_epochs
        self.val_f1 = MultilabelF1Score(n_labels, threshold=0.5, average="macro")
        self.test_f1 = MultilabelF1Score(n_labels, threshold=0.5, average="macro")
        self.test_auc = MultilabelAUROC(n_labels, average="macro")
        self.history: list[dict] = []
        self._train_loss: list[float] = []

    def features(self, x: Tensor) -> Tensor:
        if self.spec["kind"] == "ac2d":
            f, _, _ = self.trunk.branches(self.trunk.trunk(x))
            return f[0]
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        known = target >= 0
        per = F.binary_cross_entropy_with_logits(logits, target.clamp_min(0).float(), reduction="none",
                                                 pos_weight=self.pos_weight)
        return (per * known).sum() / known.sum().clamp_min(1)

    def training_step(self, batch, _):
        loss = self.loss(self(batch["image"]), batch["target"])
        self._train_loss.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, _):
        logits = self(batch["image"])
        self.val_f1.update(torch.sigmoid(logits), batch["target"].clamp_min(0).long())

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:
            self.val_f1.reset()
            return
        tl = self._train_loss
        self.history.append({"epoch": self.current_epoch, "train_loss": sum(tl) / max(len(tl), 1),
                             "val_f1": float(self.val_f1.compute())})
        self._train_loss = []
        self.val_f1.reset()
        log.info("epoch %s %s", self.current_epoch, self.history[-1])

    def test_step(self, batch, _):
        s, t = torch.sigmoid(self(batch["image"])), batch["target"].clamp_min(0).long()
        self.test_f1.update(s, t)
        self.test_auc.update(s, t)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.named_parameters():  # no decay on biases and (batched) norm parameters
            (no_decay if p.ndim <= 1 or n.endswith(".bias") or "norm" in n.split(".")[-2] else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.lr)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = int(total * self.warmup / max(self.epochs, 1))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            import math

            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1)))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}


def datamodule(pcfg: dict, progress: bool = False) -> AUDataModule:
    """The ``synth-pretrain`` data through the quick cells' pipeline; test = the held-out subject part."""
    prof = C.load_profile(pcfg.get("profile", "quick"))["data"]
    h = pcfg.get("holdout") or {"k": 10, "part": 0}
    ds = {"name": pcfg["preset"], "source": "synth", "preset": pcfg["preset"], "task": "au", "confounder": "subject",
          "default_protocol": "holdout", "protocols": {"holdout": {"type": "subject_kfold", "k": int(h["k"])}}}
    return AUDataModule(ds, "holdout", int(h["part"]), "au", input_size=prof["input_size"], resize=prof["resize"],
                        batch_size=int(pcfg.get("batch_size", 64)), eval_batch_size=prof.get("eval_batch_size", 128),
                        num_workers=0, mean=prof["mean"], std=prof["std"], augment=prof.get("augment"),
                        val_fraction=float(pcfg.get("val_fraction", 0.05)), split_seed=prof.get("split_seed", 0),
                        synth_seed=int(pcfg.get("synth_seed", 0)), progress=progress)


def pretrain_trunk(name: str, pcfg: dict, out_dir: Path, epochs: int | None = None,
                   limit_batches: int | None = None, dm: AUDataModule | None = None) -> dict:
    """Train trunk ``name`` once and write ``<out_dir>/<name>.pth`` (trunk state dict) and ``<name>.json``."""
    t = pcfg["trunks"][name]
    spec = trunk_spec(name, pcfg)
    epochs = int(epochs or t["epochs"])
    optim = C.deep_merge(pcfg.get("optim") or {}, t.get("optim") or {})
    warmup = int(t.get("warmup_epochs", pcfg.get("warmup_epochs", 0)))
    threads = int(pcfg.get("threads", 1))
    torch.set_num_threads(threads)
    if dm is None:
        dm = datamodule(pcfg)
    dm.setup("fit")
    L.seed_everything(int(pcfg.get("seed", 0)), workers=True, verbose=False)
    model = TrunkPretrainer(spec, len(dm.task_spec.names), list(dm.stats.label_rate), float(optim["lr"]),
                            float(optim.get("weight_decay", 0.0)), epochs, warmup,
                            balanced=pcfg.get("loss", "balanced") == "balanced")
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=limit_batches, limit_val_batches=limit_batches,
                        limit_test_batches=limit_batches, deterministic=False)
    t0 = time.time()
    trainer.fit(model, datamodule=dm)
    fit_s = time.time() - t0
    with torch.no_grad():  # stored in half precision (< 5 MB per file); the test metrics are of what is stored
        for v in model.trunk.state_dict().values():
            if v.is_floating_point():
                v.copy_(v.to(STORE_DTYPE).to(v.dtype))
    trainer.test(model, datamodule=dm, verbose=False)
    test_f1, test_auc = float(model.test_f1.compute()), float(model.test_auc.compute())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.pth"
    torch.save({k: (v.to(STORE_DTYPE) if v.is_floating_point() else v).detach().clone().contiguous()
                for k, v in model.trunk.state_dict().items()}, path)
    record = describe(name, t, spec, pcfg, dm, path, epochs, trainer.global_step, threads, fit_s,
                      {"test_mean_f1": round(test_f1, 4), "test_mean_roc_auc": round(test_auc, 4),
                       "test_all_positive_f1": round(all_positive_f1(dm), 4), "epochs": model.history})
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def all_positive_f1(dm: AUDataModule) -> float:
    """Mean F1 of predicting every AU present on the held-out pretraining subjects (the trivial floor)."""
    ys = torch.cat([b["target"] for b in dm.test_dataloader()])
    f1 = []
    for j in range(ys.shape[1]):
        y = ys[:, j][ys[:, j] >= 0].float()
        f1.append(float(2 * y.sum() / (y.numel() + y.sum())) if y.numel() else 0.0)
    return sum(f1) / len(f1)


def describe(name, t, spec, pcfg, dm, path, epochs, steps, threads, fit_s, metrics) -> dict:
    from aurecog.runner.identity import git_state, lock_fingerprint  # the same revision / lock records as a cell

    n_params = sum(v.numel() for k, v in torch.load(path, weights_only=True).items() if "num_batches" not in k)
    return {
        "trunk": name, "model": t["model"], "architecture": spec,
        "command": " ".join(["python -m aurecog.pretrain", *_ARGV]).strip(),
        "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size, "tensors_elements": n_params,
        "data": f"synthau-v{GENERATOR_VERSION}:{pcfg['preset']}:seed{pcfg.get('synth_seed', 0)}",
        "labels": list(dm.task_spec.names), "n_train": int(dm.stats.n_train), "holdout": pcfg.get("holdout"),
        "epochs": epochs, "optimizer_steps": int(steps), "batch_size": int(pcfg.get("batch_size", 64)),
        "threads": threads, "fit_wall_s": round(fit_s, 1), **git_state(),
        "lock": lock_fingerprint(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aurecog pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--trunks", default="all", help="comma-separated trunk names of configs/pretrain/synthau.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the config's out_dir, repo-relative)")
    p.add_argument("--config", default=str(CONFIG_FILE))
    p.add_argument("--epochs", type=int, default=None, help="override every trunk's epochs (smoke runs)")
    p.add_argument("--limit-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    a = p.parse_args(argv)
    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    pcfg = load_pretrain_config(a.config)
    names = list(pcfg["trunks"]) if a.trunks == "all" else [n.strip() for n in a.trunks.split(",") if n.strip()]
    unknown = [n for n in names if n not in pcfg["trunks"]]
    if unknown:
        raise SystemExit(f"error: unknown trunk(s) {unknown}; {a.config} defines {list(pcfg['trunks'])}")
    out = Path(a.out) if a.out else C.REPO_ROOT / pcfg["out_dir"]
    dm = datamodule(pcfg, progress=True)
    dm.prepare_data()
    for n in names:
        r = pretrain_trunk(n, pcfg, out, a.epochs, a.limit_batches, dm)
        m = r["metrics"]
        print(f"{n}: {r['bytes'] / 1e6:.2f} MB, {r['optimizer_steps']} steps in {r['fit_wall_s']:.0f} s; held-out "
              f"mean F1 {m['test_mean_f1']:.3f} (all-positive {m['test_all_positive_f1']:.3f}), ROC-AUC "
              f"{m['test_mean_roc_auc']:.3f} -> {out / r['file']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
