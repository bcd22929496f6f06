"""Facial landmark layouts: left/right flip permutations and conversion to the 49-point layout.

Three layouts occur in the supported datasets:

* ``ibug68``: the iBUG 300-W 68-point layout (SynthAU, CK+, Aff-Wild2 annotations, dlib).
  0-16 jaw, 17-21 / 22-26 brows, 27-30 nose bridge, 31-35 nose base, 36-41 / 42-47 eyes,
  48-59 outer lip, 60-67 inner lip. "Left/right" are the image sides.
* ``disfa66``: DISFA's 66 points = iBUG 68 without the two inner-mouth corners 60 and 64.
* ``intraface49``: the 49-point IntraFace layout of BP4D/GFT/BP4D+ and of JAA-Net/AC2D
  (iBUG 68 without the jaw 0-16 and the inner-mouth corners 60, 64), see
  ``../shared/notes/reference-implementations.md`` section 1.6.

albumentations mirrors keypoint coordinates on a horizontal flip but keeps their order, so after a
flip index ``i`` holds the mirror of the other side's point; :func:`flip_permutation` gives the row
order that restores the semantic layout (``lm_flipped = lm_mirrored[perm]``).
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("ibug68", "disfa66", "intraface49")
N_POINTS = {"ibug68": 68, "disfa66": 66, "intraface49": 49}


def _ibug68_flip() -> np.ndarray:
    perm = np.arange(68)
    pairs = [(i, 16 - i) for i in range(8)]  # jaw
    pairs += [(17 + i, 26 - i) for i in range(5)]  # brows
    pairs += [(31, 35), (32, 34)]  # nose base
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (59, 55), (58, 56)]  # outer lip
    pairs += [(60, 64), (61, 63), (67, 65)]  # inner lip
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


IBUG68_FLIP = _ibug68_flip()

#: iBUG-68 index of each DISFA-66 point (DISFA drops the inner-mouth corners 60 and 64).
DISFA66_FROM_IBUG68 = np.array([i for i in range(68) if i not in (60, 64)])
#: iBUG-68 index of each IntraFace-49 point (notes 1.6: k <-> k+17 for k <= 30, 31-42 <-> 48-59,
#: 43-45 <-> 61-63, 46-48 <-> 65-67).
INTRAFACE49_FROM_IBUG68 = np.array(
    list(range(17, 48)) + list(range(48, 60)) + [61, 62, 63] + [65, 66, 67]
)


def _sub_layout_flip(from_ibug: np.ndarray) -> np.ndarray:
    pos = {int(v): i for i, v in enumerate(from_ibug)}
    return np.array([pos[int(IBUG68_FLIP[v])] for v in from_ibug])


_FLIP = {
    "ibug68": IBUG68_FLIP,
    "disfa66": _sub_layout_flip(DISFA66_FROM_IBUG68),
    "intraface49": _sub_layout_flip(INTRAFACE49_FROM_IBUG68),
}
_TO_49 = {
    "ibug68": INTRAFACE49_FROM_IBUG68,
    # DISFA-66 index of each 49-point landmark: drop the 17 jaw points (PyTorch-JAANet read_disfa_49land).
    "disfa66": np.array([int(np.where(DISFA66_FROM_IBUG68 == v)[0][0]) for v in INTRAFACE49_FROM_IBUG68]),
    "intraface49": np.arange(49),
}


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown landmark layout {layout!r}; expected one of {LAYOUTS}")


def flip_permutation(layout: str) -> np.ndarray:
    """Row permutation that restores left/right semantics after mirroring x."""
    check_layout(layout)
    return _FLIP[layout]


def to_intraface49(landmarks, layout: str):
    """Select the 49 IntraFace points from landmarks of ``layout`` (last two dims: points x 2).

    Works on numpy arrays and torch tensors alike.
    """
    check_layout(layout)
    idx = _TO_49[layout]
    if landmarks.shape[-2] != N_POINTS[layout]:
        raise ValueError(
            f"landmarks have {landmarks.shape[-2]} points but layout {layout!r} has {N_POINTS[layout]}"
        )
    if hasattr(landmarks, "index_select"):  # torch
        import torch

        return landmarks.index_select(-2, torch.as_tensor(idx, device=landmarks.device))
    return landmarks[..., idx, :]
