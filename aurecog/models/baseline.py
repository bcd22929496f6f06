"""The plain-backbone baseline: a timm ResNet + task head.

It is the 'w/o' row of every paper: CISNet Table 3's ResNet without CIS (same 512 -> 64 -> C classifier,
``head.hidden: 64``), RE-Net's ResNet18, IERN's Baseline (ResNet-50).
"""

from __future__ import annotations

from aurecog.models.backbones import create_backbone
from aurecog.models.base import AUModel
from aurecog.models.heads import TaskHead
from aurecog.models.registry import register_family


@register_family("baseline")
class Baseline(AUModel):
    def __init__(self, task, stats, cfg):
        super().__init__(task, stats, cfg)
        b = cfg.get("backbone", {})
        self.backbone, dim = create_backbone(**b)
        h = cfg.get("head", {})
        self.head = TaskHead(dim, self.task, hidden=h.get("hidden"), dropout=h.get("dropout", 0.0))

    def forward(self, batch: dict) -> dict:
        feat = self.backbone(batch["image"])
        return {"logits": self.head(feat), "feature": feat}
