"""Image + landmark augmentation with albumentations (2.0.8, MIT).

Train: resize -> random crop -> [affine] -> [Gaussian blur] -> brightness/contrast jitter -> horizontal flip (p).
Eval: resize -> centre crop. The affine and blur steps are off unless configured (IERN's paper recipe uses both).
Landmarks move with the image; on a flip their left/right rows are swapped with the layout's permutation, because
albumentations mirrors keypoint coordinates but keeps their order.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from aurecog.data.landmarks import flip_permutation

_KP = dict(format="xy", remove_invisible=False)


class FaceTransform:
    """Callable ``(image HxWx3 uint8, landmarks Lx2) -> (image 3xSxS float tensor, landmarks Lx2 tensor, flipped)``.

    Random state is seeded per process on first use from ``torch.initial_seed()`` (distinct per DataLoader worker
    and reproducible under ``seed_everything(workers=True)``).
    """

    def __init__(self, train: bool, crop: int, resize: int | None = None, layout: str = "ibug68",
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), flip_p: float = 0.5,
                 brightness: float = 0.2, contrast: float = 0.2, jitter_p: float = 0.5,
                 affine: dict | None = None, blur: dict | None = None):
        """``affine``: {p, rotate (deg), translate (fraction), scale [lo, hi], shear (deg)}; ``blur``: {p, sigma
        [lo, hi]} (Gaussian, pixels). Both train-only, off when None or p = 0."""
        self.train, self.crop, self.flip_p = train, crop, flip_p if train else 0.0
        ops: list = [A.Resize(resize, resize)] if resize else []
        ops.append(A.RandomCrop(crop, crop) if train else A.CenterCrop(crop, crop))
        if train and affine and affine.get("p", 0) > 0:
            r, t, sh = float(affine.get("rotate", 0)), float(affine.get("translate", 0)), float(affine.get("shear", 0))
            ops.append(A.Affine(rotate=(-r, r), translate_percent=(-t, t), scale=tuple(affine.get("scale", (1, 1))),
                                shear=(-sh, sh), fill=0, p=float(affine["p"])))
        if train and blur and blur.get("p", 0) > 0:
            ops.append(A.GaussianBlur(sigma_limit=tuple(blur.get("sigma", (0.1, 1.5))), p=float(blur["p"])))
        if train and jitter_p > 0:
            ops.append(A.RandomBrightnessContrast(brightness_limit=brightness, contrast_limit=contrast, p=jitter_p))
        self.pipeline = A.Compose(ops, keypoint_params=A.KeypointParams(**_KP))
        self.hflip = A.Compose([A.HorizontalFlip(p=1.0)], keypoint_params=A.KeypointParams(**_KP))
        self.perm = flip_permutation(layout)
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.std = np.asarray(std, dtype=np.float32) * 255.0
        self._rng: np.random.Generator | None = None
        self._seeded_for: int | None = None

    def _ensure_seeded(self) -> np.random.Generator:
        seed = torch.initial_seed() % 2**32
        if self._rng is None or self._seeded_for != seed:
            self.pipeline.set_random_seed(seed)
            self._rng = np.random.default_rng(seed)
            self._seeded_for = seed
        return self._rng

    def __call__(self, image: np.ndarray, landmarks: np.ndarray):
        rng = self._ensure_seeded()
        out = self.pipeline(image=np.ascontiguousarray(image), keypoints=np.asarray(landmarks, dtype=np.float32))
        img, kp = out["image"], np.asarray(out["keypoints"], dtype=np.float32)
        flipped = bool(self.flip_p > 0 and rng.random() < self.flip_p)
        if flipped:
            out = self.hflip(image=img, keypoints=kp)
            img, kp = out["image"], np.asarray(out["keypoints"], dtype=np.float32)[self.perm]
        x = (img.astype(np.float32) - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(kp[:, :2].copy()), flipped
