"""Face alignment for preparation: a similarity transform (rotation + isotropic scale + translation) that maps
the two eye centres (means of the eye-contour landmarks of the layout) onto :data:`CANONICAL_EYES` (fractions of
the output size); the image is warped with it and the landmarks are transformed with the same matrix.
"""

from __future__ import annotations

import cv2
import numpy as np

from aurecog.data.landmarks import N_POINTS

#: Canonical eye centres as fractions of the output size (x, y): image-left eye, image-right eye.
CANONICAL_EYES = ((0.35, 0.40), (0.65, 0.40))
#: Eye-contour landmark indices of each layout: (image-left eye, image-right eye) for a frontal face.
EYE_INDICES = {
    "ibug68": (list(range(36, 42)), list(range(42, 48))),
    "disfa66": (list(range(36, 42)), list(range(42, 48))),  # DISFA drops 60/64 only: eyes keep iBUG indices
    "intraface49": (list(range(19, 25)), list(range(25, 31))),
}
BORDER_VALUE = (0, 0, 0)


def canonical_eyes(size: int) -> np.ndarray:
    """Canonical eye centres in pixels for an output of ``size`` x ``size`` (2 x 2: left, right)."""
    return np.asarray(CANONICAL_EYES, dtype=np.float64) * size


def eye_centres(landmarks: np.ndarray, layout: str) -> np.ndarray:
    left, right = EYE_INDICES[layout]
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[left].mean(0), lm[right].mean(0)])


def similarity_from_eyes(eyes: np.ndarray, size: int) -> np.ndarray:
    """2 x 3 similarity matrix mapping the two source eye centres exactly onto the canonical ones."""
    src = eyes[:, 0] + 1j * eyes[:, 1]
    dst_xy = canonical_eyes(size)
    dst = dst_xy[:, 0] + 1j * dst_xy[:, 1]
    if abs(src[1] - src[0]) < 1e-6:
        raise ValueError("eye centres coincide")
    c = (dst[1] - dst[0]) / (src[1] - src[0])  # rotation + scale
    t = dst[0] - c * src[0]
    return np.array([[c.real, -c.imag, t.real], [c.imag, c.real, t.imag]], dtype=np.float64)


def check_landmarks(landmarks, layout: str) -> str | None:
    """None when usable, else the reason (wrong shape, NaN, degenerate eyes)."""
    lm = np.asarray(landmarks, dtype=np.float64) if landmarks is not None else None
    if lm is None or lm.size == 0:
        return "no landmarks"
    if lm.shape != (N_POINTS[layout], 2):
        return f"landmarks of the wrong shape: {tuple(lm.shape)}, expected ({N_POINTS[layout]}, 2) for {layout}"
    if not np.isfinite(lm).all():
        return "landmarks contain NaN/inf"
    eyes = eye_centres(lm, layout)
    if np.linalg.norm(eyes[1] - eyes[0]) < 1.0:
        return "degenerate landmarks (eye centres coincide)"
    return None


def align_face(image_bgr: np.ndarray, landmarks: np.ndarray, layout: str, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Warp a BGR (or gray) frame to the canonical ``size`` crop; returns (RGB uint8 S x S x 3, landmarks L x 2)."""
    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    elif image_bgr.shape[2] == 4:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_BGRA2BGR)
    lm = np.asarray(landmarks, dtype=np.float64)
    m = similarity_from_eyes(eye_centres(lm, layout), size)
    crop = cv2.warpAffine(image_bgr, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_VALUE)
    out_lm = lm @ m[:, :2].T + m[:, 2]
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB), out_lm.astype(np.float32)
