"""The plain-backbone baseline: a timm ResNet + task head.

It is the 'w/o' row of every paper: CISNet Table 3's ResNet without CIS (same 512 -> 64 -> C classifier,
``head.hidden: 64``), RE-Net's ResNet18 (Table 1; Table 8 with and without ``duplicate``), IERN's Baseline
(ResNet-50, with IERN's backbone learning rate ``optim.backbone_lr`` and warm-up/hold/decay schedule).
"""

from __future__ import annotations

from aurecog.models.backbones import create_backbone
from aurecog.models.base import DUPLICATE_KEYS, AUModel
from aurecog.models.heads import TaskHead
from aurecog.models.registry import backbone_keys, register_family


@register_family("baseline")
class Baseline(AUModel):
    config_keys = AUModel.config_keys | backbone_keys() | DUPLICATE_KEYS | {
        "head.hidden", "head.dropout", "optim.backbone_lr"}

    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        self.backbone, dim = create_backbone(**cfg.get("backbone", {}))
        h = cfg.get("head", {})
        self.head = TaskHead(dim, self.task, hidden=h.get("hidden"), dropout=h.get("dropout", 0.0))
        self.backbone_lr = cfg.get("optim", {}).get("backbone_lr")
        self.init_duplication(cfg.get("duplicate"))

    def forward(self, batch: dict) -> dict:
        if not self.training:
            feat = self.backbone(batch["image"])
            return {"logits": self.head(feat), "feature": feat}
        x, y = self.duplicate(batch)
        feat = self.backbone(x)
        return {"logits": self.head(feat), "feature": feat, "target": y}

    def param_groups(self) -> list[dict]:
        """The base groups, with the backbone's parameters at ``optim.backbone_lr`` when it is set (IERN: the
        backbone at 1e-4, the rest at 2e-4; an absolute rate, not scaled by ``optim.lr_scale_batch``)."""
        groups = super().param_groups()
        if self.backbone_lr is None:
            return groups
        trunk = {id(p) for p in self.backbone.parameters()}
        out = []
        for g in groups:
            inside = [p for p in g["params"] if id(p) in trunk]
            rest = [p for p in g["params"] if id(p) not in trunk]
            if inside:
                out.append({**g, "params": inside, "lr": float(self.backbone_lr)})
            if rest:
                out.append({**g, "params": rest})
        return out
