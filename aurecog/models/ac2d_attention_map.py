"""Render AC²D's learned average self-attention A^avg(j) (Eq. 6) of every AU branch over the face (paper Fig. 5).

Usage::

    python -m aurecog.models.ac2d_attention_map --run-dir results/runs/synth/ac2d/0-0 --out results/ac2d/attention.png
    python -m aurecog.models.ac2d_attention_map --ckpt checkpoints/synth/ac2d/0-0/best.ckpt --out attention.png

A run folder is resolved to its checkpoint ``checkpoints/<dataset>/<model>/<fold>-<seed>/best.ckpt`` (the cell
runner's layout); the test split of that fold provides the faces. Each row is one test face: the face, then one
panel per AU with A^avg(j) (bilinearly upsampled from the l/8 x l/8 key grid) overlaid, as in Fig. 5's first row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


@torch.no_grad()
def attention_maps(model, batch: dict) -> torch.Tensor:
    """A^avg of every branch, (B, m, G, G), from an AC²D model in eval mode."""
    was_training = model.training
    model.eval()
    out = model(batch, return_attention=True)
    model.train(was_training)
    att = out["attention"]
    g = int(round(att.shape[-1] ** 0.5))
    return att.reshape(att.shape[0], att.shape[1], g, g)


def render_attention(model, batch: dict, out_path: str | Path, max_images: int = 4, alpha: float = 0.5,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Path:
    """Write a PNG grid (faces x [face + one panel per AU]) of the average attention maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_images, batch["image"].shape[0])
    batch = {k: (v[:n] if torch.is_tensor(v) else v) for k, v in batch.items()}
    maps = attention_maps(model, batch).float().cpu()  # n m G G
    image = batch["image"].float().cpu()
    s = image.shape[-1]
    up = F.interpolate(maps, size=(s, s), mode="bilinear", align_corners=False)
    up = up / up.amax((2, 3), keepdim=True).clamp_min(1e-12)  # per-map scaling for display
    faces = (image * torch.tensor(std)[None, :, None, None] + torch.tensor(mean)[None, :, None, None]).clamp(0, 1)
    names = list(model.task.names)
    m = len(names)
    fig, axes = plt.subplots(n, m + 1, figsize=(1.6 * (m + 1), 1.6 * n), squeeze=False)
    for i in range(n):
        face = faces[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(face)
        if i == 0:
            axes[i, 0].set_title("face", fontsize=7)
        for j in range(m):
            ax = axes[i, j + 1]
            ax.imshow(face)
            ax.imshow(up[i, j].numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
            if i == 0:
                ax.set_title(str(names[j]), fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def resolve_checkpoint(run_dir: str | Path | None = None, ckpt: str | Path | None = None) -> tuple[Path, int]:
    """(checkpoint path, fold) from a run folder ``.../<dataset>/<model>/<fold>-<seed>`` (its
    ``checkpoints/best.ckpt``) or a checkpoint path (fold from the folder name ``<fold>-<seed>`` above it)."""
    if ckpt is not None:
        ckpt = Path(ckpt)
        parent = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.parent.name
        fold = int(parent.split("-")[0]) if parent.split("-")[0].isdigit() else 0
        return ckpt, fold
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / "best.ckpt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (the cell runner writes <run folder>/checkpoints/best.ckpt;"
                                " pass --ckpt to point at one directly)")
    return path, int(run_dir.name.split("-")[0])


def load_model(ckpt: str | Path):
    from aurecog.models.ac2d import AC2D

    return AC2D.load_from_checkpoint(str(ckpt), map_location="cpu").eval()


def test_batch(cfg: dict, fold: int, n: int, data_root: str | None = None) -> dict:
    from aurecog.data.datamodule import datamodule_from_config

    dm = datamodule_from_config(cfg, fold, data_root, progress=False)
    dm.setup("test")
    ds = dm.dataset("test")
    items = [ds[i] for i in range(min(n, len(ds)))]
    return torch.utils.data.default_collate(items)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="cell run folder results/runs/<dataset>/<model>/<fold>-<seed>")
    src.add_argument("--ckpt", help="an AC²D checkpoint (best.ckpt)")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--n", type=int, default=4, help="number of test faces")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    ckpt, fold = resolve_checkpoint(args.run_dir, args.ckpt)
    model = load_model(ckpt)
    cfg = model.cfg
    batch = test_batch(cfg, fold, args.n, args.data_root)
    d = cfg.get("data", {})
    out = render_attention(model, batch, args.out, max_images=args.n, mean=d.get("mean", (0.5,) * 3),
                           std=d.get("std", (0.5,) * 3))
    print(out)
    return out


if __name__ == "__main__":
    main()
