"""SynthAU: an embedded, procedurally rendered facial action unit dataset whose labels are known exactly.

Why it exists: the benchmark must run end to end without any licensed data, and its causal methods (CISNet's
subject confounder, IERN's dataset confounder) need data where the confounding structure is *known*. SynthAU
draws cartoon-like faces with OpenCV from 68 iBUG landmarks; every action unit (AU) is a blend shape that moves
landmarks (so the stored landmarks are exactly the drawn geometry) plus, where FACS describes one, a texture cue
(furrows, wrinkles, dimples, teeth) whose strength scales with intensity.

Generative story, per preset (see :data:`PRESETS`):

1. **Subjects.** Subject ``i`` (names sort in generation order) gets a *habit group* (:data:`HABIT_GROUPS`)
   from its position in the downstream 3-fold split (fold ``i % 3``). Most groups are common to all folds; the
   last subject(s) of every fold (``contrarians_per_fold``: 3 in ``synth``, 1 elsewhere) belong to a *contrarian*
   group found in no other fold, whose habits contradict
   those of the same-looking training subjects. The group fixes the appearance family (skin tone, hair), so
   identity predicts habit (S -> X and S -> R in CISNet's graph), and that shortcut fails on contrarians.
2. **Sessions.** Each session is a run of consecutive frames filled with expression episodes (EMFACS-style
   prototypes, :data:`PROTOTYPES`) and spontaneous AU events, each with a smooth onset/apex/offset envelope.
   The universal AU intensities are then passed through the subject's habits (co-activations, suppressions).
3. **Rendering.** Intensities -> landmark blend shapes -> 3D head pose -> orthographic projection -> drawing at
   :data:`SUPERSAMPLE` x resolution -> area downsampling -> illumination, blur, noise (and greyscale for the
   CK+-like source of ``synth-fermix``).

Labels are the rounded habit-applied intensities (0-5); occurrence is ``intensity >= positive_threshold``.

Output: a prepared folder (:mod:`aurecog.data.prepared`) written by :func:`generate`. Besides the standard
columns (``dataset``, ``subject``, ``session``, ``frame``, ``AU<k>``, ``AU<k>_int``, ``expression``) the index has
ground-truth columns for analysis (never model inputs): ``habit_active`` (bool: the subject's habits changed
this frame's stored labels), ``habit_group`` (int8), ``yaw``/``pitch``/``roll`` (float32, degrees),
``occluded`` (bool), and ``split`` ("train"/"validation") for presets with an official split. ``meta.json``
adds ``preset``, ``seed``, ``generator_version``, ``label_type``, ``positive_threshold``, ``datasets``,
``habits`` ({subject: {"adds": {"AU12": ["AU10", ...]}, "suppresses": [...], "group": int, ...}}),
``habit_groups`` and ``folds`` (the subject-split rule the contrarians are designed for).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from tqdm import tqdm

from aurecog.data.landmarks import IBUG68_FLIP
from aurecog.data.prepared import (
    MAX_INTENSITY,
    UNKNOWN,
    PreparedDataset,
    PreparedFormatError,
    PreparedWriter,
    verify,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 4  # bump whenever images or labels change: cached folders are keyed by it (v1: pre-release;
#                        v2 -> v3: AU_GAIN 1.25 -> 2.0; v3 -> v4: `synth` 45 subjects x 2 sessions with 3
#                        contrarians per fold, sized by benchmarks/study_power.py)

# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

#: Every AU SynthAU can render, in the order of the internal intensity vectors.
ALL_AUS = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 24, 25, 26)
_AU = {au: i for i, au in enumerate(ALL_AUS)}
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
BP4D_INTENSITY_AUS = (6, 10, 12, 14, 17)
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)
DISFA_INTENSITY_AUS = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
GFT_AUS = (1, 2, 4, 6, 10, 12, 14, 15, 23, 24)
AFFWILD2_AUS = (1, 2, 4, 6, 7, 10, 12, 15, 23, 24, 25, 26)
#: every AU an occurrence preset stores (BP4D, DISFA, GFT, Aff-Wild2): the labels of ``synth-pretrain``
UNION_AUS = tuple(sorted(set(BP4D_AUS) | set(DISFA_AUS) | set(GFT_AUS) | set(AFFWILD2_AUS)))

EXPRESSIONS = ("neutral", "happiness", "sadness", "surprise", "fear", "anger", "disgust", "contempt")
FER_EXPRESSIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise")


def au_name(au: int) -> str:
    """Column / meta name of an AU number (``12`` -> ``"AU12"``)."""
    return f"AU{au}"


#: Apex AU pattern of each expression, {AU: weight}; AU intensity = weight x episode peak x envelope.
#: Disgust uses 9+10+15 for FACS 9+15+16; contempt uses bilateral 12+14 at low weight for the unilateral form.
PROTOTYPES: dict[str, dict[int, float]] = {
    "neutral": {},
    "happiness": {6: 0.85, 12: 1.0},
    "sadness": {1: 0.9, 4: 0.75, 15: 1.0},
    "surprise": {1: 1.0, 2: 1.0, 5: 0.8, 26: 0.9},
    "fear": {1: 0.9, 2: 0.7, 4: 0.7, 5: 0.9, 20: 1.0, 26: 0.6},
    "anger": {4: 1.0, 5: 0.6, 7: 0.9, 23: 0.9},
    "disgust": {9: 1.0, 10: 0.85, 15: 0.6},
    "contempt": {12: 0.5, 14: 0.75},
}
#: AUs that join a prototype in some episodes, {AU: (probability, weight)}, as variants seen in spontaneous data.
PROTOTYPE_VARIANTS: dict[str, dict[int, tuple[float, float]]] = {
    "happiness": {25: (0.35, 0.7), 26: (0.15, 0.5)},
    "sadness": {17: (0.4, 0.7)},
    "surprise": {25: (0.7, 0.8)},
    "fear": {25: (0.6, 0.8)},
    "anger": {24: (0.3, 0.8), 17: (0.3, 0.6)},
    "disgust": {4: (0.3, 0.6), 17: (0.3, 0.6)},
}
#: Relative frequency of expression episodes in the video presets.
EXPRESSION_WEIGHTS = {"neutral": 0.06, "happiness": 0.26, "sadness": 0.11, "surprise": 0.11, "fear": 0.1,
                      "anger": 0.12, "disgust": 0.12, "contempt": 0.12}
#: AU combinations of spontaneous, expression-free events (talking, thinking, lip biting, ...). They give every
#: AU occurrences outside the prototypes so that co-occurrence is informative but not deterministic.
SPONTANEOUS_COMBOS = ((25,), (25, 26), (17,), (14,), (24,), (7,), (10,), (4,), (1, 2), (23,), (17, 24), (6, 7),
                      (12,), (2,), (15,), (20,), (9,), (5,), (1,), (12, 25))


@dataclass(frozen=True)
class HabitGroup:
    """Subject-specific expression habits on top of the universal prototypes.

    ``adds`` maps a trigger AU to AUs the subject co-activates at the trigger's (universal) intensity;
    ``suppresses`` lists AUs the subject never shows. ``family`` is the appearance family of the group.
    """

    name: str
    family: int
    adds: tuple[tuple[int, tuple[int, ...]], ...] = ()
    suppresses: tuple[int, ...] = ()
    contrarian: bool = False


#: Groups 0-2 occur in every fold; contrarian group 3 + k occurs only in fold k and contradicts group k
#: (same look, opposite habits), so subject-identity shortcuts learned in training fail on it.
HABIT_GROUPS = (
    HabitGroup("grinner", 0, adds=((12, (10, 25)), (4, (7,)))),
    HabitGroup("brow-flasher", 1, adds=((12, (2,)), (23, (24,)))),
    HabitGroup("worrier", 2, adds=((4, (1, 17)),)),
    HabitGroup("non-duchenne", 0, adds=((12, (14,)),), suppresses=(6, 10), contrarian=True),
    HabitGroup("deadpan-brow", 1, adds=((12, (17,)),), suppresses=(2,), contrarian=True),
    HabitGroup("stern", 2, adds=((4, (24,)),), suppresses=(1, 17), contrarian=True),
)
N_FOLDS = 3
#: Common groups cycled over a fold's subjects (rank within the fold -> group).
_COMMON_CYCLE = (0, 1, 2)


def habit_group_of(position: int, n_subjects: int, contrarians: int = 1) -> int:
    """Habit group of the subject at ``position`` in the name-sorted subject list.

    Fold ``k`` = positions with ``position % 3 == k``. The last ``contrarians`` subjects of each fold that has
    more subjects than that are the fold's contrarians (group ``3 + k``); the others cycle through the common
    groups.
    """
    if contrarians < 1:
        raise ValueError(f"contrarians per fold must be >= 1, got {contrarians}")
    fold, rank = position % N_FOLDS, position // N_FOLDS
    fold_size = len(range(fold, n_subjects, N_FOLDS))
    if fold_size > contrarians and rank >= fold_size - contrarians:
        return len(_COMMON_CYCLE) + fold
    return _COMMON_CYCLE[rank % len(_COMMON_CYCLE)]


def apply_habits(universal: np.ndarray, group: HabitGroup) -> np.ndarray:
    """Apply a habit group to universal intensities (..., len(ALL_AUS)); returns a new array."""
    out = universal.copy()
    for trigger, added in group.adds:
        for au in added:
            out[..., _AU[au]] = np.maximum(out[..., _AU[au]], universal[..., _AU[trigger]])
    for au in group.suppresses:
        out[..., _AU[au]] = 0.0
    return out


# --------------------------------------------------------------------------------------------------------------
# Face geometry: identity -> neutral 3D points, AU blend shapes
# --------------------------------------------------------------------------------------------------------------
# Face units: origin between the eyes, x to the image right, y down, z towards the camera; the jaw is about
# 2 units wide. Points 0-67 are the iBUG landmarks, followed by auxiliary points used only for drawing.

N_LANDMARKS = 68
CHEEK_L, CHEEK_R, CHIN, EAR_L, EAR_R = 68, 69, 70, 71, 72
N_ARC = 9  # points per head arc (forehead contour, hair outline, hairline)
HEAD_ARC = slice(73, 73 + N_ARC)
HAIR_ARC = slice(HEAD_ARC.stop, HEAD_ARC.stop + N_ARC)
HAIRLINE_ARC = slice(HAIR_ARC.stop, HAIR_ARC.stop + N_ARC)
N_POINTS = HAIRLINE_ARC.stop


def _mirror_permutation() -> np.ndarray:
    perm = np.arange(N_POINTS)
    perm[:N_LANDMARKS] = IBUG68_FLIP
    perm[[CHEEK_L, CHEEK_R, EAR_L, EAR_R]] = [CHEEK_R, CHEEK_L, EAR_R, EAR_L]
    for arc in (HEAD_ARC, HAIR_ARC, HAIRLINE_ARC):
        perm[arc] = np.arange(arc.start, arc.stop)[::-1]
    return perm


MIRROR = _mirror_permutation()

#: Identity geometry, name -> (mean, half-range) of a uniform draw, in face units unless noted.
SHAPE_PARAMS = {
    "face_w": (1.0, 0.07),  # width scale of jaw and head
    "face_h": (1.0, 0.06),  # height scale below the eye line
    "jaw_n": (2.4, 0.4),  # superellipse exponent of the jaw: 2 = round, larger = squarer
    "eye_x": (0.40, 0.03),  # eye centre distance from the midline
    "eye_w": (0.155, 0.015),  # eye half-width
    "eye_h": (0.058, 0.01),  # upper lid height above the eye line
    "brow_y": (-0.27, 0.035),  # brow height
    "brow_t": (0.032, 0.01),  # brow half-thickness
    "nose_l": (0.40, 0.04),  # nose tip below the eye line
    "nose_w": (0.15, 0.02),  # nostril half-width
    "mouth_y": (0.72, 0.035),  # mouth corner height
    "mouth_w": (0.32, 0.03),  # mouth half-width
    "lip_u": (0.062, 0.014),  # upper lip thickness
    "lip_l": (0.092, 0.014),  # lower lip thickness
    "chin_y": (1.12, 0.05),  # chin bottom
    "forehead": (1.0, 0.06),  # head top above the eye line
}
#: Shift of the SHAPE_PARAMS means per unit of a preset's ``identity_shift`` (the BP4D+ -> another population).
SHAPE_SHIFT = {"face_w": 0.05, "jaw_n": 0.35, "eye_h": -0.008, "eye_w": 0.01, "lip_u": 0.012, "nose_w": 0.02,
               "brow_y": 0.02}
FACE_DEPTH = 0.55  # z of the face surface at the midline, relative to the head's rotation pivot plane
NOSE_TIP_DEPTH = 0.3  # how far the nose tip stands out of the face surface
MIN_LIP = 0.012  # minimum visible lip-red thickness when AUs compress the lips


def _surface_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Depth of a rounded face surface: highest at the midline, falling off to the sides and to the chin."""
    return FACE_DEPTH * np.sqrt(np.clip(1.0 - (x / 1.15) ** 2, 0.0, 1.0)) - 0.12 * (y - 0.3) ** 2


def neutral_points(shape: dict[str, float]) -> np.ndarray:
    """Neutral 3D points (N_POINTS x 3) of a face with the given SHAPE_PARAMS values."""
    p = np.zeros((N_POINTS, 3))
    left: dict[int, tuple[float, float]] = {}  # image-left and midline points; the right side mirrors them
    fw, fh = shape["face_w"], shape["face_h"]
    # jaw 0-8: superellipse from the left ear (eye level) to the chin
    ang = np.linspace(np.pi, np.pi / 2, 9)
    e = 2.0 / shape["jaw_n"]
    jx = -0.95 * fw * np.abs(np.cos(ang)) ** e
    jy = 0.03 + (shape["chin_y"] * fh - 0.03) * np.abs(np.sin(ang)) ** e
    left.update({j: (jx[j], jy[j]) for j in range(9)})
    # brows 17-21 (outer -> inner)
    by, bx = shape["brow_y"], shape["eye_x"] / 0.40
    for k, (x, dy) in enumerate(zip((0.80, 0.66, 0.50, 0.34, 0.18), (0.10, 0.025, -0.015, -0.01, 0.03))):
        left[17 + k] = (-x * bx, by + dy)
    # nose bridge 27-30 and base 31-33
    nl, nw = shape["nose_l"], shape["nose_w"]
    left.update({27 + k: (0.0, nl * k / 3.0) for k in range(4)})
    left.update({31: (-nw, nl + 0.05), 32: (-0.5 * nw, nl + 0.08), 33: (0.0, nl + 0.095)})
    # eyes 36-41: outer corner, two upper-lid points, inner corner, two lower-lid points
    ex, ew, eh = shape["eye_x"], shape["eye_w"], shape["eye_h"]
    low = 0.75 * eh
    left.update({36: (-(ex + ew), -0.006), 37: (-(ex + 0.4 * ew), -eh), 38: (-(ex - 0.4 * ew), -eh),
                 39: (-(ex - ew), 0.006), 40: (-(ex - 0.4 * ew), low), 41: (-(ex + 0.4 * ew), low)})
    # lips: outer 48-51 + 57-59, inner 60-62 + 66-67
    my, mw, lu, ll = shape["mouth_y"], shape["mouth_w"], shape["lip_u"], shape["lip_l"]
    left.update({48: (-mw, my), 49: (-0.6 * mw, my - 0.85 * lu), 50: (-0.22 * mw, my - lu - 0.008),
                 51: (0.0, my - lu + 0.006), 59: (-0.62 * mw, my + 0.75 * ll), 58: (-0.28 * mw, my + 0.97 * ll),
                 57: (0.0, my + ll), 60: (-0.86 * mw, my), 61: (-0.35 * mw, my - 0.003), 62: (0.0, my - 0.002),
                 66: (0.0, my + 0.002), 67: (-0.35 * mw, my + 0.003)})
    left.update({CHEEK_L: (-0.52 * fw, 0.33), CHIN: (0.0, shape["chin_y"] * fh - 0.14), EAR_L: (-0.97 * fw, 0.17)})
    for i, (x, y) in left.items():
        p[i, :2] = x, y
        p[MIRROR[i], :2] = -x, y
    # head arcs (left temple -> top -> right temple)
    a = np.linspace(np.pi, 0.0, N_ARC + 2)[1:-1]
    top = -shape["forehead"]
    p[HEAD_ARC, 0], p[HEAD_ARC, 1] = 0.96 * fw * np.cos(a), 0.03 + (top - 0.03) * np.sin(a) ** 0.8
    p[HAIRLINE_ARC, 0] = 0.97 * fw * np.cos(a)
    p[HAIRLINE_ARC, 1] = -0.22 + (shape["hairline"] + 0.22) * np.sin(a) ** 0.5
    vol = shape["hair_volume"]
    p[HAIR_ARC, 0] = (0.98 * fw + vol) * np.cos(a)
    p[HAIR_ARC, 1] = 0.10 + (top - vol - 0.10) * np.sin(a) ** 0.9
    # depth
    p[:, 2] = _surface_z(p[:, 0], p[:, 1])
    p[27:31, 2] += NOSE_TIP_DEPTH * np.array([0.15, 0.4, 0.7, 1.0])
    p[31:36, 2] += NOSE_TIP_DEPTH * np.array([0.3, 0.55, 0.65, 0.55, 0.3])
    p[36:48, 2] -= 0.04
    p[48:68, 2] += 0.06
    p[[EAR_L, EAR_R], 2] = -0.3
    return p


#: Motion of each AU at intensity 5, in face units: (points, dx, dy) for image-left or midline points; the
#: image-right partner (MIRROR) moves by (-dx, dy). y points down, so dy < 0 raises.
AU_MOTION: dict[int, list[tuple[tuple[int, ...], float, float]]] = {
    1: [((21,), 0.01, -0.16), ((20,), 0.0, -0.12), ((19,), 0.0, -0.05), ((18,), 0.0, -0.02)],
    2: [((17, 18), 0.0, -0.17), ((19,), 0.0, -0.11), ((20,), 0.0, -0.04)],
    4: [((21,), 0.05, 0.10), ((20,), 0.03, 0.08), ((19,), 0.01, 0.06), ((18,), 0.0, 0.04), ((17,), 0.0, 0.02),
        ((37, 38), 0.0, 0.012)],
    5: [((37, 38), 0.0, -0.06)],
    6: [((40, 41), 0.0, -0.035), ((36,), 0.0, -0.012), ((CHEEK_L,), 0.0, -0.12), ((17,), 0.0, 0.025)],
    7: [((40, 41), 0.0, -0.042), ((37, 38), 0.0, 0.016), ((39,), 0.0, -0.006)],
    9: [((31,), -0.025, -0.06), ((32,), -0.012, -0.06), ((33,), 0.0, -0.055), ((30,), 0.0, -0.03),
        ((29,), 0.0, -0.02), ((21,), 0.02, 0.05), ((20,), 0.01, 0.03), ((49, 50, 51), 0.0, -0.03),
        ((61, 62), 0.0, -0.02), ((CHEEK_L,), 0.0, -0.03)],
    10: [((50, 51), 0.0, -0.085), ((49,), 0.0, -0.065), ((48,), 0.0, -0.015), ((61, 62), 0.0, -0.05),
         ((60,), 0.0, -0.01), ((31, 32, 33), 0.0, -0.015)],
    12: [((48,), -0.07, -0.10), ((60,), -0.06, -0.09), ((49,), -0.03, -0.05), ((59,), -0.03, -0.045),
         ((61,), -0.02, -0.03), ((67,), -0.02, -0.035), ((50, 58), -0.01, -0.015), ((CHEEK_L,), 0.0, -0.04)],
    14: [((48,), 0.035, -0.015), ((60,), 0.035, -0.012), ((49, 59), 0.012, -0.005)],
    15: [((48,), -0.01, 0.09), ((60,), -0.01, 0.08), ((59,), 0.0, 0.05), ((49,), 0.0, 0.035), ((67,), 0.0, 0.04),
         ((61,), 0.0, 0.03), ((58,), 0.0, 0.02)],
    17: [((57, 58), 0.0, -0.06), ((59,), 0.0, -0.04), ((66, 67), 0.0, -0.03), ((48, 60), 0.0, 0.015),
         ((7,), 0.0, -0.03), ((8,), 0.0, -0.04), ((CHIN,), 0.0, -0.06)],
    20: [((48,), -0.09, 0.02), ((60,), -0.085, 0.02), ((49, 59), -0.045, 0.005), ((61, 67), -0.03, 0.0),
         ((51,), 0.0, 0.015), ((57,), 0.0, -0.015)],
    23: [((49, 50, 51), 0.0, 0.03), ((57, 58, 59), 0.0, -0.035), ((48, 60), 0.035, 0.0), ((61, 67), 0.01, 0.0)],
    24: [((49, 50, 51), 0.0, 0.02), ((61, 62), 0.0, 0.012), ((57, 58, 59), 0.0, -0.025), ((66, 67), 0.0, -0.012),
         ((48, 60), -0.01, 0.005)],
    25: [((66, 67), 0.0, 0.055), ((61, 62), 0.0, -0.012), ((57, 58), 0.0, 0.045), ((59,), 0.0, 0.03)],
    26: [((8,), 0.0, 0.17), ((7,), 0.0, 0.16), ((6,), 0.0, 0.13), ((5,), 0.0, 0.09), ((4,), 0.0, 0.05),
         ((3,), 0.0, 0.02), ((57, 58, 66, 67), 0.0, 0.14), ((59,), 0.0, 0.11), ((48, 60), 0.0, 0.04),
         ((CHIN,), 0.0, 0.17)],
}


#: Exaggeration of AU_MOTION (FACS-plausible amplitudes) so that effects are learnable at 64 px. Calibrated for
#: the difficulty target (baseline, quick profile, held-out subjects: mean F1 0.45-0.80): with 1.25 (v2) the
#: baseline reached 0.407 over the 3 folds of `synth`, with 2.0 (v3) 0.548 (`make bench MODELS=baseline`).
AU_GAIN = 2.0


def _au_basis() -> np.ndarray:
    basis = np.zeros((len(ALL_AUS), N_POINTS, 3))
    for au, moves in AU_MOTION.items():
        for points, dx, dy in moves:
            for i in points:
                basis[_AU[au], i, :2] = dx, dy
                basis[_AU[au], MIRROR[i], :2] = -dx if MIRROR[i] != i else 0.0, dy
    return AU_GAIN * basis


AU_BASIS = _au_basis()  # len(ALL_AUS) x N_POINTS x 3, displacement at intensity MAX_INTENSITY
_UPPER_INNER, _LOWER_INNER = [61, 62, 63], [67, 66, 65]
_UPPER_OUTER, _LOWER_OUTER = [50, 51, 52], [58, 57, 56]
_UPPER_LID, _LOWER_LID = [37, 38, 43, 44], [41, 40, 47, 46]


def posed_points(neutral: np.ndarray, intensities: np.ndarray, blink: float = 0.0) -> np.ndarray:
    """Face-space points for AU intensities (len(ALL_AUS), 0-5) and an eye closure ``blink`` in [0, 1]."""
    p = neutral + np.tensordot(np.clip(intensities, 0, MAX_INTENSITY) / MAX_INTENSITY, AU_BASIS, axes=1)
    # lips never cross, and keep a minimum red margin
    p[_LOWER_INNER, 1] = np.maximum(p[_LOWER_INNER, 1], p[_UPPER_INNER, 1])
    p[_UPPER_OUTER, 1] = np.minimum(p[_UPPER_OUTER, 1], p[_UPPER_INNER, 1] - MIN_LIP)
    p[_LOWER_OUTER, 1] = np.maximum(p[_LOWER_OUTER, 1], p[_LOWER_INNER, 1] + MIN_LIP)
    p[_UPPER_LID, 1] += blink * (p[_LOWER_LID, 1] - p[_UPPER_LID, 1])
    return p


# --------------------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------------------

#: Appearance families: skin RGB range (two endpoints), hair colours, hair styles. Habit groups map onto them.
FAMILIES = (
    {"skin": ((240, 208, 184), (214, 172, 140)), "hair": ((110, 72, 40), (196, 156, 96), (70, 45, 28)),
     "styles": ("long", "short")},
    {"skin": ((208, 162, 122), (178, 132, 92)), "hair": ((28, 22, 22), (48, 36, 30)), "styles": ("short", "bob")},
    {"skin": ((142, 98, 68), (98, 64, 44)), "hair": ((18, 14, 14), (42, 30, 24)), "styles": ("volume", "short")},
)
IRIS_COLOURS = ((70, 45, 30), (105, 70, 40), (70, 110, 150), (80, 120, 80))
SCLERA = (238, 236, 230)
GLASSES_PROB = 0.12
BEARD_PROB = 0.15
BEARD_STRENGTH = (0.15, 0.35)  # mix of hair colour into the lower-face skin
HAIRLINE_Y = (-0.82, -0.62)  # face-space y of the hairline at the midline
HAIR_VOLUME = {"long": 0.08, "short": 0.05, "bob": 0.1, "volume": 0.3}  # hair thickness above the head, face units
SKIN_SPREAD = (-0.15, 1.15)  # position between a family's two skin endpoints (slightly beyond them)
DOMAIN_SKIN_SHIFT = (6.0, -4.0, -10.0)  # RGB shift per unit of identity_shift (warmer, more saturated)
LIP_GAIN, LIP_OFFSET = (0.86, 0.58, 0.58), (22.0, 0.0, 4.0)  # lip colour = skin x gain + offset


@dataclass
class Identity:
    """Everything about a subject's look; drawn once per subject."""

    family: int
    shape: dict[str, float]
    skin: np.ndarray
    hair: np.ndarray
    lips: np.ndarray
    iris: np.ndarray
    background: np.ndarray
    hair_style: str
    glasses: bool
    beard: float
    neutral: np.ndarray | None = field(repr=False, default=None)  # neutral_points(shape), set on creation


def sample_identity(rng: np.random.Generator, family: int, shift: float = 0.0) -> Identity:
    """Draw a subject of an appearance family; ``shift`` moves the population (a different 'dataset')."""
    fam = FAMILIES[family]
    shape = {k: m + SHAPE_SHIFT.get(k, 0.0) * shift + rng.uniform(-r, r) for k, (m, r) in SHAPE_PARAMS.items()}
    style = fam["styles"][int(rng.integers(len(fam["styles"])))]
    shape["hairline"] = rng.uniform(*HAIRLINE_Y)
    shape["hair_volume"] = HAIR_VOLUME[style] + rng.uniform(0, 0.06)
    lo, hi = (np.array(c, float) for c in fam["skin"])
    t = rng.uniform(*SKIN_SPREAD) + 0.5 * shift
    skin = lo + t * (hi - lo) + rng.normal(0, 4, 3) + shift * np.array(DOMAIN_SKIN_SHIFT)
    hair = np.array(fam["hair"][int(rng.integers(len(fam["hair"])))], float) * rng.uniform(0.8, 1.2)
    lips = skin * np.array(LIP_GAIN) + np.array(LIP_OFFSET)
    iris_choices = IRIS_COLOURS if family == 0 else IRIS_COLOURS[:2]
    iris = np.array(iris_choices[int(rng.integers(len(iris_choices)))], float)
    hue = rng.uniform(0, 180) if shift == 0 else rng.uniform(60, 140)  # OpenCV hue; shifted domain: green-blue
    bg = cv2.cvtColor(np.uint8([[[hue, rng.uniform(20, 110), rng.uniform(90, 220)]]]), cv2.COLOR_HSV2RGB)[0, 0]
    ident = Identity(family=family, shape=shape, skin=np.clip(skin, 30, 250), hair=np.clip(hair, 5, 250),
                     lips=np.clip(lips, 20, 250), iris=iris, background=bg.astype(float), hair_style=style,
                     glasses=bool(rng.random() < GLASSES_PROB),
                     beard=float(rng.uniform(*BEARD_STRENGTH)) if rng.random() < BEARD_PROB else 0.0)
    ident.neutral = neutral_points(shape)
    return ident


# --------------------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------------------

SUPERSAMPLE = 2  # drawing resolution / output resolution; area downsampling gives soft, anti-aliased detail
SHIFT = 4  # fractional bits of the fixed-point coordinates handed to cv2
_ONE = 1 << SHIFT
_FX_SCALE = SUPERSAMPLE * _ONE  # output pixels -> fixed-point canvas units
_FX_BIAS = (0.5 * SUPERSAMPLE - 0.5) * _ONE + 0.5  # pixel-centre convention, + 0.5 to round on truncation
FACE_SCALE = 0.46  # pixels per face unit / image size (a tight, aligned face crop)
FACE_CENTRE_Y = 0.38  # face-space y drawn at the image centre
PIVOT = np.array([0.0, 0.35, -0.6])  # head rotation centre in face space (behind the face, near the neck)
WRINKLE_ALPHA = 0.75  # darkening of a wrinkle line at intensity 5
WRINKLE_WIDTH = 0.024  # wrinkle line width in face units
BASE_FOLD_ALPHA = 0.08  # the nasolabial fold and lower-lid line are faintly visible at rest
LANDMARK_MARGIN = 1.0  # pixels between the outermost landmark and the image border
WRINKLE_DARKNESS = 0.45  # wrinkle colour at full strength = skin x this
MIN_VISIBLE = 0.02  # textures weaker than this are not drawn
MOUTH_OPEN = 0.01  # inner-lip gap (face units) above which the mouth cavity is drawn
TEETH_HEIGHT = 0.07  # visible upper teeth, face units
IRIS_RADIUS = 0.43  # iris radius / eye half-width
CHEEK_RED = (235, 120, 110)  # RGB colours of the face parts that do not depend on identity
MOUTH_CAVITY = (70, 22, 28)
TEETH = (236, 232, 220)
PUPIL = (20, 15, 15)
GLASSES = (40, 40, 45)


@dataclass
class FrameParams:
    """Per-frame rendering inputs besides identity and AUs (pose, light, nuisances)."""

    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the image size
    scale: float = 1.0
    gaze: tuple[float, float] = (0.0, 0.0)  # iris offset, fraction of the eye half-width / height
    blink: float = 0.0
    light: tuple[float, float, float] = (0.0, 0.0, 0.0)  # directional gradient (x, y) and strength
    gain: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: float = 0.0  # Gaussian sigma in output pixels
    noise: float = 0.0  # Gaussian noise std in grey levels
    greyscale: bool = False
    occluder: dict | None = None  # {"kind": "hand"|"bar", "centre": (x, y) face units, "size": s, "angle", "colour"}
    clutter: tuple = ()  # background shapes: (kind, cx, cy, sx, sy, r, g, b) in image fractions


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (degrees): yaw about the vertical axis, pitch about the horizontal, roll in-plane."""
    y, p, r = np.radians([yaw, pitch, roll])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rz = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    return rz @ rx @ ry


def project(points: np.ndarray, fp: FrameParams, size: int) -> np.ndarray:
    """Face-space points (..., 3) -> output-image pixel coordinates (..., 2) under the frame's head pose."""
    r = rotation(fp.yaw, fp.pitch, fp.roll)
    q = (points - PIVOT) @ r.T + PIVOT
    s = FACE_SCALE * size * fp.scale
    u = size / 2 + q[..., 0] * s + fp.shift[0] * size
    v = size / 2 + (q[..., 1] - FACE_CENTRE_Y) * s + fp.shift[1] * size
    return np.stack([u, v], axis=-1)


_CR_T = np.arange(4)[:, None] / 4.0
#: Catmull-Rom basis for 4 samples per segment (rows: samples, columns: the 4 control points).
_CR_BASIS = 0.5 * np.hstack([-_CR_T**3 + 2 * _CR_T**2 - _CR_T, 3 * _CR_T**3 - 5 * _CR_T**2 + 2,
                             -3 * _CR_T**3 + 4 * _CR_T**2 + _CR_T, _CR_T**3 - _CR_T**2])


@functools.lru_cache(maxsize=64)
def _cr_index(n: int, closed: bool) -> np.ndarray:
    """Control-point indices (segments x 4) of a Catmull-Rom spline through n points."""
    if closed:
        ext, nseg = np.r_[n - 1, np.arange(n), 0, 1], n
    else:
        ext, nseg = np.r_[0, np.arange(n), n - 1], n - 1
    return np.stack([ext[i:i + nseg] for i in range(4)], axis=1)


def _catmull_rom(pts: np.ndarray, closed: bool = False) -> np.ndarray:
    """Smooth curve through ``pts`` (n x 2), 4 samples per segment (vectorised Catmull-Rom spline)."""
    out = (_CR_BASIS @ pts[_cr_index(len(pts), closed)]).reshape(-1, 2)
    return out if closed else np.concatenate([out, pts[-1:]])


class _Canvas:
    """A uint8 RGB drawing surface in output-pixel coordinates, drawn at SUPERSAMPLE x with fixed-point AA."""

    def __init__(self, size: int, colour):
        self.size, self.n = size, size * SUPERSAMPLE
        self.img = np.empty((self.n, self.n, 3), np.uint8)
        cv2.rectangle(self.img, (0, 0), (self.n, self.n), _c(colour), -1)  # much faster than a numpy fill

    def fx(self, pts) -> np.ndarray:
        """Output-pixel coordinates -> fixed-point canvas coordinates (pixel centres at integers)."""
        return (np.asarray(pts) * _FX_SCALE + _FX_BIAS).astype(np.int32)

    def px(self, length: float) -> int:
        return max(1, int(round(length * SUPERSAMPLE)))

    def poly(self, pts, colour) -> None:
        cv2.fillPoly(self.img, [self.fx(pts)], _c(colour), cv2.LINE_AA, SHIFT)

    def line(self, pts, colour, width: float, closed: bool = False) -> None:
        """Polyline through ``pts`` (n x 2), or several polylines when given a list of arrays."""
        curves = [self.fx(c) for c in pts] if isinstance(pts, list) else [self.fx(pts)]
        cv2.polylines(self.img, curves, closed, _c(colour), self.px(width), cv2.LINE_AA, SHIFT)

    def ellipse(self, centre, axes, angle: float, colour, thickness: float = -1) -> None:
        c = self.fx(centre)
        ax = np.maximum(np.round(np.asarray(axes, float) * SUPERSAMPLE * _ONE), 1).astype(int)
        th = -1 if thickness < 0 else self.px(thickness)
        cv2.ellipse(self.img, (int(c[0]), int(c[1])), (int(ax[0]), int(ax[1])), float(angle), 0, 360, _c(colour), th,
                    cv2.LINE_AA, SHIFT)

    def masked(self, outline: np.ndarray, paint) -> None:
        """Draw with ``paint(layer, offset)`` clipped to the polygon ``outline`` (used for eyes and mouth).

        ``paint`` draws on a copy of the bounding region, in output-pixel coordinates minus ``offset``.
        """
        q = (outline + 0.5) * SUPERSAMPLE - 0.5
        x0, y0 = np.clip(np.floor(q.min(0)).astype(int) - 2, 0, self.n)
        x1, y1 = np.clip(np.ceil(q.max(0)).astype(int) + 3, 0, self.n)
        if x1 <= x0 or y1 <= y0:
            return
        roi = self.img[y0:y1, x0:x1]
        layer = _Canvas.__new__(_Canvas)
        layer.size, layer.n = self.size, self.n
        layer.img = roi.copy()
        offset = np.array([x0, y0], float) / SUPERSAMPLE  # shift output coords so the ROI origin maps to 0
        paint(layer, offset)
        mask = np.zeros(roi.shape[:2], np.uint8)
        cv2.fillPoly(mask, [self.fx(outline - offset)], 255, cv2.LINE_8, SHIFT)  # edge AA comes from downsampling
        cv2.copyTo(layer.img, mask, roi)


def _c(colour) -> tuple[float, float, float]:
    """cv2 colour tuple (cv2 saturates out-of-range values when drawing on uint8)."""
    if isinstance(colour, np.ndarray):
        colour = colour.tolist()
    return tuple(map(float, colour[:3]))


def _mix(a, b, t: float) -> np.ndarray:
    return (1 - t) * np.asarray(a, float) + t * np.asarray(b, float)


def _texture_points(p: np.ndarray) -> dict[str, np.ndarray]:
    """Face-space (x, y) anchor polylines of the AU textures, computed from the posed points ``p``."""
    out: dict[str, np.ndarray] = {}
    xy = p[:, :2]
    inner_brow = 0.5 * (xy[21, 1] + xy[22, 1])
    xs = np.linspace(-0.2, 0.2, 5)
    for k in range(3):  # AU1: horizontal forehead lines over the brow centre
        out[f"au1_{k}"] = np.stack([xs, inner_brow - 0.11 - 0.065 * k + 0.04 * (xs / 0.2) ** 2], 1)
    for side, (a, b) in (("l", (18, 19)), ("r", (25, 24))):  # AU2: lines over the lateral brows
        for k in range(2):
            out[f"au2_{side}{k}"] = xy[[a, b]] + np.array([0.0, -0.11 - 0.06 * k])
    for side, sx in (("l", -1), ("r", 1)):  # AU4: vertical glabellar furrows
        x = 0.5 * (xy[21, 0] + xy[22, 0]) + sx * 0.045
        out[f"au4_{side}"] = np.array([[x + sx * 0.01, inner_brow - 0.03], [x, inner_brow + 0.09]])
    for k in range(3):  # AU9: wrinkles across the nose bridge
        y = xy[27, 1] + 0.03 + 0.045 * k
        out[f"au9_{k}"] = np.array([[-0.07, y + 0.01], [0.0, y - 0.005], [0.07, y + 0.01]])
    for side, corner, eye, lid, wing, cheek in (("l", 48, 36, [36, 41, 40, 39], 31, CHEEK_L),
                                                ("r", 54, 45, [45, 46, 47, 42], 35, CHEEK_R)):
        sx = -1.0 if side == "l" else 1.0
        c, e, w = xy[corner], xy[eye], xy[wing]
        for k, dy in enumerate((-0.03, 0.0, 0.03)):  # AU6: crow's feet
            out[f"crow_{side}{k}"] = np.array([[e[0] + sx * 0.03, e[1] + dy], [e[0] + sx * 0.13, e[1] + 2.2 * dy]])
        out[f"lid_{side}"] = xy[lid] + np.array([0.0, 0.06])  # infraorbital furrow (AU6, AU7)
        out[f"nlf_{side}"] = np.array([[w[0] + sx * 0.05, w[1] - 0.02],  # nasolabial fold
                                       [0.55 * w[0] + 0.45 * c[0] + sx * 0.10, 0.5 * (w[1] + c[1])],
                                       [c[0] + sx * 0.05, c[1] + 0.05]])
        out[f"dimple_{side}"] = c + np.array([[sx * 0.05, -0.03], [sx * 0.065, 0.0], [sx * 0.05, 0.03]])
        out[f"au15_{side}"] = c + np.array([[sx * 0.01, 0.03], [sx * 0.04, 0.13]])
        out[f"au20_{side}"] = c + np.array([[sx * 0.03, 0.0], [sx * 0.12, 0.01]])
        out[f"cheek_{side}"] = xy[[cheek]]
    out["au24_up"] = xy[[49, 50, 51, 52, 53]] + np.array([0.0, -0.04])
    out["au24_low"] = xy[[55, 56, 57, 58, 59]] + np.array([0.0, 0.035])
    chin = xy[CHIN]
    out["chin"] = chin[None]
    y = 0.5 * (xy[57, 1] + chin[1])
    out["chin_crease"] = np.array([[-0.12, y], [0.0, y + 0.02], [0.12, y]])
    ang = np.linspace(0, 2 * np.pi, 7)[:-1]
    out["chin_dots"] = chin + 0.06 * np.stack([np.cos(ang), 0.6 * np.sin(ang)], 1)
    out["neck"] = np.array([[-0.42, 0.9], [0.42, 0.9], [0.55, 2.2], [-0.55, 2.2]])
    return out


def _texture_affine() -> tuple[dict[str, slice], np.ndarray, np.ndarray]:
    """:func:`_texture_points` is affine in the posed (x, y) points, so it is tabulated once as a matrix:
    anchors = (matrix @ xy.ravel() + offset).reshape(-1, 2). Returns (name -> row slice, matrix, offset)."""
    zero = np.zeros((N_POINTS, 3))
    base = _texture_points(zero)
    offset = np.concatenate(list(base.values())).ravel()
    columns = []
    for i in range(N_POINTS):
        for d in range(2):
            unit_point = zero.copy()
            unit_point[i, d] = 1.0
            columns.append(np.concatenate(list(_texture_points(unit_point).values())).ravel() - offset)
    ends = np.cumsum([len(v) for v in base.values()])
    rows = {k: slice(e - len(v), e) for (k, v), e in zip(base.items(), ends)}
    return rows, np.stack(columns, axis=1), offset


_TEX_ROWS, _TEX_MATRIX, _TEX_OFFSET = _texture_affine()
_TEXTURE_LIFT = 0.02  # textures sit just above the face surface


@dataclass
class _Ctx:
    """What the drawing steps of one frame share. Sizes passed to the canvas are ``k * unit`` with ``k`` in
    face units; the factors and colours in the drawing steps are artistic choices, not measurements."""

    cv: _Canvas
    ident: Identity
    fp: FrameParams
    a: dict[int, float]  # AU intensity / 5
    p: np.ndarray  # projected points (pixels)
    tex: dict[str, np.ndarray]  # projected texture anchors (pixels)
    unit: float  # pixels per face unit
    skin: np.ndarray
    dark: np.ndarray  # wrinkle colour at full strength

    def wrinkle(self, names, strength: float, width: float = WRINKLE_WIDTH, smooth: bool = False) -> None:
        """Darker skin lines through the named texture anchors, darkness ~ strength; skipped when invisible."""
        if strength > MIN_VISIBLE:
            curves = [_catmull_rom(self.tex[k]) if smooth else self.tex[k] for k in names]
            self.cv.line(curves, _mix(self.skin, self.dark, min(1.0, strength)), width * self.unit)


def render_face(ident: Identity, intensities: np.ndarray, fp: FrameParams, size: int,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one face. Returns (RGB uint8 size x size x 3, 68 x 2 float32 landmarks in pixel coordinates).

    ``intensities`` has one continuous 0-5 value per AU in :data:`ALL_AUS`; ``rng`` supplies pixel noise.
    """
    p3 = posed_points(ident.neutral, intensities, fp.blink)
    fp = _keep_in_frame(p3[:N_LANDMARKS], fp, size)
    t2 = (_TEX_MATRIX @ p3[:, :2].ravel() + _TEX_OFFSET).reshape(-1, 2)  # == _texture_points(p3), fast
    t3 = np.concatenate([t2, _surface_z(t2[:, 0], t2[:, 1])[:, None] + _TEXTURE_LIFT], axis=1)
    flat = project(np.concatenate([p3, t3]), fp, size)
    ctx = _Ctx(cv=_Canvas(size, ident.background), ident=ident, fp=fp,
               a=dict(zip(ALL_AUS, (np.clip(intensities, 0, MAX_INTENSITY) / MAX_INTENSITY).tolist())),
               p=flat[:N_POINTS], tex={k: flat[N_POINTS:][rows] for k, rows in _TEX_ROWS.items()},
               unit=FACE_SCALE * size * fp.scale, skin=ident.skin, dark=ident.skin * WRINKLE_DARKNESS)
    _draw_background(ctx.cv, fp)
    _draw_head(ctx, p3, size)
    _draw_wrinkles(ctx)
    _draw_brows_and_eyes(ctx)
    _draw_nose(ctx)
    _draw_mouth_and_chin(ctx, p3)
    if ident.glasses:
        _draw_glasses(ctx)
    if fp.occluder is not None:
        _draw_occluder(ctx.cv, fp, size, ident.skin)
    img = cv2.resize(ctx.cv.img, (size, size), interpolation=cv2.INTER_AREA)
    return _post_process(img, fp, rng), ctx.p[:N_LANDMARKS].astype(np.float32)


def _draw_head(ctx: _Ctx, p3: np.ndarray, size: int) -> None:
    """Back hair, neck, ears, face, jaw shading, beard, cheeks (AU6 raises and reddens them)."""
    cv, p, u, ident, skin = ctx.cv, ctx.p, ctx.unit, ctx.ident, ctx.skin
    if ident.hair_style in ("long", "bob"):
        drop = 1.35 if ident.hair_style == "long" else 0.75  # face-space y where the hair ends
        hair_pts = p3[HAIR_ARC]
        sides = np.array([[hair_pts[-1, 0] + 0.05, drop, 0.0], [hair_pts[0, 0] - 0.05, drop, 0.0]])
        back = project(np.concatenate([hair_pts, sides]), ctx.fp, size)
        cv.poly(_catmull_rom(back, closed=True), ident.hair * 0.85)
    cv.poly(ctx.tex["neck"], skin * 0.82)
    for ear in (EAR_L, EAR_R):
        cv.ellipse(p[ear], (0.10 * u, 0.19 * u), ctx.fp.roll, skin * 0.9)
    cv.poly(_catmull_rom(np.concatenate([p[0:17], p[HEAD_ARC][::-1]]), closed=True), skin)
    cv.line(_catmull_rom(p[2:15]), skin * 0.88, 0.03 * u)
    if ident.beard > 0:
        beard = np.concatenate([p[3:14], p[[54, 35, 33, 31, 48]] + np.array([0, 0.02 * u])])
        cv.poly(_catmull_rom(beard, closed=True), _mix(skin, ident.hair, ident.beard))
    a6 = ctx.a[6]
    for side in ("l", "r"):
        r = (0.15 + 0.05 * a6) * u
        cv.ellipse(ctx.tex[f"cheek_{side}"][0], (r, 0.75 * r), ctx.fp.roll,
                   _mix(skin, CHEEK_RED, 0.07 + 0.2 * a6 + 0.05 * ctx.a[12]))


def _draw_wrinkles(ctx: _Ctx) -> None:
    """AU textures of the upper and mid face, then the hair fringe that may hide forehead lines."""
    a, w, sides = ctx.a, ctx.wrinkle, ("l", "r")
    w(["au1_0", "au1_1", "au1_2"], WRINKLE_ALPHA * a[1], smooth=True)  # forehead, centre
    w([f"au2_{s}{k}" for s in sides for k in range(2)], WRINKLE_ALPHA * a[2])  # forehead, lateral
    w(["au4_l", "au4_r"], 1.2 * WRINKLE_ALPHA * a[4], 1.3 * WRINKLE_WIDTH)  # glabellar furrows
    w(["au9_0", "au9_1", "au9_2"], WRINKLE_ALPHA * a[9], smooth=True)  # nose bridge
    fold = max(a[12], a[10], a[9], 0.6 * a[6])
    w(["nlf_l", "nlf_r"], BASE_FOLD_ALPHA + WRINKLE_ALPHA * fold, 1.2 * WRINKLE_WIDTH, smooth=True)  # nasolabial
    w(["lid_l", "lid_r"], BASE_FOLD_ALPHA + WRINKLE_ALPHA * max(a[6], 0.6 * a[7]), smooth=True)  # infraorbital
    w([f"crow_{s}{k}" for s in sides for k in range(3)], WRINKLE_ALPHA * a[6])  # crow's feet
    w(["dimple_l", "dimple_r"], 1.3 * WRINKLE_ALPHA * a[14], 1.4 * WRINKLE_WIDTH, smooth=True)
    w(["au15_l", "au15_r"], WRINKLE_ALPHA * a[15])  # lines below depressed lip corners
    w(["au20_l", "au20_r"], WRINKLE_ALPHA * a[20])  # stretch folds beside the corners
    cap = np.concatenate([ctx.p[HAIR_ARC], ctx.p[HAIRLINE_ARC][::-1]])
    ctx.cv.poly(_catmull_rom(cap, closed=True), ctx.ident.hair)


def _draw_brows_and_eyes(ctx: _Ctx) -> None:
    """Tapered brow bands; eyes with sclera, iris and pupil clipped to the lid contour, lash line, lid crease."""
    cv, p, u, ident = ctx.cv, ctx.p, ctx.unit, ctx.ident
    taper = np.array([0.55, 0.85, 1.0, 1.05, 1.0])[:, None]  # brow thickness, outer -> inner end
    for idx in ([17, 18, 19, 20, 21], [26, 25, 24, 23, 22]):
        half = ident.shape["brow_t"] * u * taper * np.array([0.0, 1.0])
        cv.poly(np.concatenate([p[idx] - half, (p[idx] + half)[::-1]]), ident.hair * 0.9)
    for lm in (list(range(36, 42)), list(range(42, 48))):
        contour = _catmull_rom(p[lm], closed=True)
        eye_w = np.linalg.norm(p[lm[3]] - p[lm[0]]) / 2
        r_iris = IRIS_RADIUS * eye_w
        look = p[lm].mean(0) + np.array([ctx.fp.gaze[0] * 0.35 * eye_w, ctx.fp.gaze[1] * 0.15 * eye_w + 0.1 * r_iris])

        def paint(layer: _Canvas, off, look=look, r_iris=r_iris, contour=contour) -> None:
            layer.poly(contour - off, SCLERA)
            layer.ellipse(look - off, (r_iris, r_iris), 0, ident.iris)
            layer.ellipse(look - off, (0.45 * r_iris, 0.45 * r_iris), 0, PUPIL)

        cv.masked(contour, paint)
        upper = _catmull_rom(p[lm[:4]])
        cv.line(upper, ident.hair * 0.35, 0.028 * u)
        cv.line(upper[1:-1] + np.array([0.0, -0.045 * u]), _mix(ctx.skin, ctx.dark, 0.25), WRINKLE_WIDTH * u)


def _draw_nose(ctx: _Ctx) -> None:
    cv, p, u, skin, roll = ctx.cv, ctx.p, ctx.unit, ctx.skin, ctx.fp.roll
    cv.line(_catmull_rom(p[[27, 28, 29]] + np.array([0.05 * u, 0.0])), skin * 0.9, 0.025 * u)  # bridge shadow
    cv.line(_catmull_rom(p[31:36]), skin * 0.7, 0.02 * u)  # base
    for nostril in (32, 34):
        cv.ellipse(p[nostril] + np.array([0.0, -0.015 * u]), (0.035 * u, 0.018 * u), roll, skin * 0.38)
    for wing in (31, 35):
        cv.ellipse(p[wing] + np.array([0.0, -0.03 * u]), (0.03 * u, 0.05 * u), roll, skin * 0.85, 0.012 * u)


def _draw_mouth_and_chin(ctx: _Ctx, p3: np.ndarray) -> None:
    """Mouth cavity and upper teeth when the lips part, lips (paler and thinner under AU23/24), AU24 bulges,
    AU17 chin boss with dimpled skin."""
    cv, p, u, a, skin = ctx.cv, ctx.p, ctx.unit, ctx.a, ctx.skin
    if np.mean(p3[_LOWER_INNER, 1] - p3[_UPPER_INNER, 1]) > MOUTH_OPEN:
        inner = _catmull_rom(p[60:68], closed=True)
        upper_inner = _catmull_rom(p[[60, 61, 62, 63, 64]])

        def paint(layer: _Canvas, off) -> None:
            layer.poly(inner - off, MOUTH_CAVITY)
            layer.poly(np.concatenate([upper_inner, upper_inner[::-1] + np.array([0.0, TEETH_HEIGHT * u])]) - off,
                       TEETH)

        cv.masked(inner, paint)
    lips = _mix(ctx.ident.lips, skin, 0.1 + 0.5 * max(a[23], a[24]))
    cv.poly(np.concatenate([_catmull_rom(p[[54, 55, 56, 57, 58, 59, 48]]), _catmull_rom(p[[60, 67, 66, 65, 64]])]),
            lips * 1.04)
    cv.poly(np.concatenate([_catmull_rom(p[48:55]), _catmull_rom(p[[64, 63, 62, 61, 60]])]), lips * 0.92)
    cv.line(_catmull_rom(p[[48, 60, 61, 62, 63, 64, 54]]), ctx.ident.lips * 0.5, (0.014 + 0.02 * a[24]) * u)
    ctx.wrinkle(["au24_up", "au24_low"], WRINKLE_ALPHA * 0.8 * a[24], smooth=True)
    if a[17] > MIN_VISIBLE:
        cv.ellipse(ctx.tex["chin"][0], (0.13 * u, 0.08 * u), ctx.fp.roll, _mix(skin, (255, 255, 255), 0.12 * a[17]))
        for dot in ctx.tex["chin_dots"]:
            cv.ellipse(dot, (0.012 * u, 0.012 * u), 0, _mix(skin, ctx.dark, WRINKLE_ALPHA * a[17]))
    ctx.wrinkle(["chin_crease"], 0.1 + WRINKLE_ALPHA * a[17], smooth=True)


def _draw_glasses(ctx: _Ctx) -> None:
    cv, p, u = ctx.cv, ctx.p, ctx.unit
    for eye in ((36, 39), (42, 45)):
        cv.ellipse(p[list(eye)].mean(0), (0.2 * u, 0.14 * u), ctx.fp.roll, GLASSES, 0.02 * u)
    cv.line(np.stack([p[39] + [0.06 * u, -0.02 * u], p[42] - [0.06 * u, 0.02 * u]]), GLASSES, 0.02 * u)


def _keep_in_frame(landmarks3: np.ndarray, fp: FrameParams, size: int) -> FrameParams:
    """Shrink and shift the head (if needed) so that all landmarks lie LANDMARK_MARGIN px inside the image,
    as a face crop of a real dataset would; pose angles are kept."""
    lm = project(landmarks3, fp, size)
    lo, hi = lm.min(0), lm.max(0)
    room = size - 1 - 2 * LANDMARK_MARGIN
    if (hi - lo).max() > room:
        shrink = room / (hi - lo).max()
        fp = dataclasses.replace(fp, scale=fp.scale * shrink)
        lm = project(landmarks3, fp, size)
        lo, hi = lm.min(0), lm.max(0)
    move = np.maximum(LANDMARK_MARGIN - lo, 0) - np.maximum(hi - (size - 1 - LANDMARK_MARGIN), 0)
    if move.any():
        fp = dataclasses.replace(fp, shift=(fp.shift[0] + move[0] / size, fp.shift[1] + move[1] / size))
    return fp


def _draw_background(cv: _Canvas, fp: FrameParams) -> None:
    """Clutter shapes of in-the-wild presets (the plain backdrop colour is the canvas fill)."""
    for kind, cx, cy, sx, sy, *rgb in fp.clutter:
        centre = np.array([cx, cy]) * cv.size
        if kind == "rect":
            half = np.array([sx, sy]) * cv.size
            cv.poly(np.array([centre - half, centre + [half[0], -half[1]], centre + half,
                              centre + [-half[0], half[1]]]), rgb)
        else:
            cv.ellipse(centre, (sx * cv.size, sy * cv.size), 0, rgb)


def _draw_occluder(cv: _Canvas, fp: FrameParams, size: int, skin: np.ndarray) -> None:
    """A hand or a bar (microphone, cup, ...) in front of part of the face."""
    occ = fp.occluder
    centre = project(np.array([*occ["centre"], 1.0]), fp, size)
    s = occ["size"] * FACE_SCALE * size
    ang = math.radians(occ["angle"])
    along, across = np.array([math.cos(ang), math.sin(ang)]), np.array([-math.sin(ang), math.cos(ang)])
    if occ["kind"] == "bar":
        half_l, half_w = s, 0.28 * s
        signs = ((-1, -1), (1, -1), (1, 1), (-1, 1))
        corners = [centre + sa * half_l * along + sb * half_w * across for sa, sb in signs]
        cv.poly(np.array(corners), occ["colour"])
        return
    hand = skin * np.array(occ["colour"])  # a hand: the subject's skin, slightly tinted
    cv.ellipse(centre, (0.55 * s, 0.45 * s), occ["angle"], hand)
    for k in range(4):  # fingers
        base = centre + (k - 1.5) * 0.26 * s * across + 0.3 * s * along
        tip = base + (0.75 + 0.1 * (k in (1, 2))) * s * along
        cv.line(np.stack([base, tip]), hand, 0.22 * s)


@functools.lru_cache(maxsize=8)
def _unit_grid(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1]."""
    return (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1


def _post_process(img: np.ndarray, fp: FrameParams, rng: np.random.Generator | None) -> np.ndarray:
    """Illumination gradient, gain and tint, blur, sensor noise, optional greyscale."""
    f = img.astype(np.float32)
    grid = _unit_grid(img.shape[0])
    lx, ly, strength = fp.light
    field_ = 1.0 + strength * (lx * grid[None, :] + ly * grid[:, None])
    f *= (fp.gain * field_)[..., None] * np.asarray(fp.tint, np.float32)
    if fp.blur > 0.25:
        f = cv2.GaussianBlur(f, (0, 0), fp.blur)
    if fp.noise > 0 and rng is not None:
        f += rng.standard_normal(f.shape, dtype=np.float32) * fp.noise
    if fp.greyscale:
        f = np.repeat(f @ np.array([0.299, 0.587, 0.114], np.float32), 3).reshape(f.shape)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FerSource:
    """One source 'dataset' of ``synth-fermix`` with the capture biases IERN describes."""

    name: str
    prefix: str  # subject-name prefix, unique across sources
    share: float  # subjects relative to the preset's n_subjects
    greyscale: bool = False
    background: tuple[int, int, int] | None = None  # fixed backdrop colour
    blur: float = 0.0  # extra Gaussian blur (output pixels)
    extra: tuple[tuple[str, tuple[tuple[int, float], ...]], ...] = ()  # expression -> extra (AU, weight)
    apex: str = "last"  # "last": neutral -> apex clips (CK+, Oulu); "middle": onset-apex-offset clips (MMI)


@dataclass(frozen=True)
class Preset:
    """A SynthAU configuration mirroring one real dataset's AU set, label type and protocol."""

    name: str
    description: str
    aus: tuple[int, ...] = BP4D_AUS
    intensity_aus: tuple[int, ...] = ()
    label_type: str = "occurrence"
    positive_threshold: int = 1  # occurrence = intensity >= this
    n_subjects: int = 18
    sessions_per_subject: int = 3
    frames_per_session: tuple[int, int] = (48, 62)
    image_size: int = 64
    subject_prefix: str = "S"
    unknown_rate: float = 0.0  # fraction of (frame, AU) entries set to UNKNOWN, in runs
    unknown_whole_frame: float = 0.3  # fraction of unknown runs that blank every AU of their frames
    identity_shift: float = 0.0  # moves the identity population (a different dataset's subjects)
    max_yaw: float = 8.0  # degrees
    max_pitch: float = 6.0
    max_roll: float = 5.0
    max_shift: float = 0.025  # fraction of the image size
    max_scale: float = 0.04  # relative
    illumination: float = 0.25  # strength of light gradients, gain and tint changes
    blur_max: float = 0.6  # Gaussian sigma, output pixels
    noise_std: float = 3.0  # grey levels
    occlusion_prob: float = 0.0  # per session
    clutter: bool = False  # cluttered, varied backgrounds
    official_split: bool = False  # add a ``split`` column (train/validation by subject)
    fer_sources: tuple[FerSource, ...] = ()  # non-empty: a posed expression-recognition mix (synth-fermix)
    habits: bool = True  # False: every subject shows the universal AUs (no habit group's adds/suppresses)
    contrarians_per_fold: int = 1  # contrarian test subjects per fold (habit_group_of)

    @property
    def label_aus(self) -> tuple[int, ...]:
        """Every AU that has a stored label (occurrence or intensity)."""
        return tuple(au for au in ALL_AUS if au in self.aus or au in self.intensity_aus)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # synth: 12 common + 3 contrarian subjects per fold, so the common-contrarian gap has between-subject spread
    # in both strata (benchmarks/study_power.py: half-width of the gap reduction from the measured per-subject
    # sd); 2 shorter sessions each keep the frame count (and the cell's cost) of the v3 preset (18 x 3 x 48-62)
    Preset("synth", "default CPU-benchmark preset: 45 subjects x 2 sessions (3 contrarians per fold), 64 px, the "
           "12 BP4D AUs", n_subjects=45, sessions_per_subject=2, frames_per_session=(30, 40),
           contrarians_per_fold=3),
    Preset("synth-bp4d", "BP4D-like: 12 AUs, occurrence with ~2% unknown runs, intensity of AUs 6/10/12/14/17",
           intensity_aus=BP4D_INTENSITY_AUS, n_subjects=24, frames_per_session=(42, 58), subject_prefix="B",
           unknown_rate=0.02),
    Preset("synth-disfa", "DISFA-like: one long video per subject, 12 intensity AUs, 8 evaluated with >= 2",
           aus=DISFA_AUS, intensity_aus=DISFA_INTENSITY_AUS, label_type="intensity", positive_threshold=2,
           sessions_per_subject=1, frames_per_session=(150, 190), subject_prefix="SN"),
    Preset("synth-gft", "GFT-like: 10 AUs, larger head pose (unposed group conversation)", aus=GFT_AUS,
           n_subjects=24, sessions_per_subject=2, frames_per_session=(55, 70), subject_prefix="G", max_yaw=25.0,
           max_pitch=15.0, max_roll=10.0, max_shift=0.04),
    Preset("synth-bp4dplus", "BP4D+-like: the BP4D labels on a shifted identity population (cross-dataset)",
           intensity_aus=BP4D_INTENSITY_AUS, n_subjects=30, sessions_per_subject=2, frames_per_session=(45, 55),
           subject_prefix="P", unknown_rate=0.02, identity_shift=1.0, illumination=0.35),
    Preset("synth-affwild2", "Aff-Wild2-like: 12 AUs in the wild (pose, light, blur, occlusion, clutter), "
           "more unknown labels, official train/validation split by subject", aus=AFFWILD2_AUS, n_subjects=30,
           sessions_per_subject=1, frames_per_session=(90, 110), subject_prefix="V", unknown_rate=0.08,
           unknown_whole_frame=0.7, max_yaw=35.0, max_pitch=20.0, max_roll=20.0, max_shift=0.06, max_scale=0.1,
           illumination=0.6, blur_max=1.5, noise_std=7.0, occlusion_prob=0.5, clutter=True, official_split=True),
    Preset("synth-fermix", "CK+/MMI/Oulu-like posed expression mix with dataset biases (IERN): greyscale CK+, "
           "blue-backdrop MMI with open-mouth anger, blurred Oulu; 6 emotions, apex frames, 12 BP4D AUs",
           label_type="expression", n_subjects=24, image_size=96, max_yaw=4.0, max_pitch=4.0, max_roll=3.0,
           max_shift=0.015, max_scale=0.03, fer_sources=(
               FerSource("ckplus", "ck_S", 1.0, greyscale=True),
               FerSource("mmi", "mmi_S", 0.7, background=(40, 70, 170), extra=(("anger", ((25, 0.9), (26, 0.7))),),
                         apex="middle"),
               FerSource("oulu", "oulu_P", 1.2, blur=1.7),
           )),
    # Trunk pretraining (aurecog/pretrain.py; the role ImageNet plays in the papers), never a benchmark. Its
    # subjects are disjoint from every preset's: all random draws are keyed by the preset name (_rng), so no
    # identity, session or frame parameter is shared (tests/test_pretrain.py checks it against every preset).
    # No habits: the trunk learns what each AU looks like, not the subject -> habit shortcuts (and contrarian
    # habits) that the benchmarks' deconfounding question is about. Labels: the union of the AU presets' AUs.
    Preset("synth-pretrain", "trunk pretraining: 90 habit-free subjects x 3 sessions, 64 px, the 15 AUs of the AU "
           "presets (disjoint identities)", aus=UNION_AUS, n_subjects=90, subject_prefix="X", habits=False),
)}


def get_preset(name: str, overrides: dict[str, Any] | None = None) -> Preset:
    """Look up a preset (ValueError listing the valid names) and apply field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown SynthAU preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **(overrides or {}))


# --------------------------------------------------------------------------------------------------------------
# Sequences: episodes, habits, nuisances
# --------------------------------------------------------------------------------------------------------------

ONSET_FRAMES = (3.0, 8.0)  # ranges of episode phase durations, frames
APEX_FRAMES = (4.0, 14.0)
OFFSET_FRAMES = (3.0, 8.0)
GAP_FRAMES = (1.0, 10.0)  # between expression episodes
EXPRESSION_PEAK = (2.0, 5.0)  # apex intensity of an expression episode
EPISODE_JITTER = (0.85, 1.1)  # per-AU multiplier of an episode's prototype weights
SPONTANEOUS_RATE = 0.045  # spontaneous AU events per frame
SPONTANEOUS_PEAK = (1.0, 4.0)
POSED_PEAK = (2.8, 5.0)  # fermix: posed expressions are strong
NEUTRAL_LABEL_LEVEL = 0.99  # neutral-episode envelope above which a frame is labelled "neutral"
BLINK_RATE = 0.03  # blinks per frame
BLINK_PROFILE = (0.45, 1.0, 0.45)  # eye closure over a blink's frames
UNKNOWN_RUN = (4, 20)  # frames per unknown-label run
UNKNOWN_RUN_AUS = (1, 3)  # AUs per partial unknown run
OCCLUSION_FRACTION = (0.25, 0.6)  # share of an occluded session's frames
HAND_TINT = (1.0, 0.95, 0.92)  # occluding hands: skin colour times this (times a brightness draw)


def _rng(preset: str, seed: int, *keys: int) -> np.random.Generator:
    """Independent, reproducible stream for (preset, seed, keys); never the global RNG."""
    return np.random.default_rng(np.random.SeedSequence([zlib.crc32(preset.encode()), seed, *keys]))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def envelope(t: np.ndarray, start: float, onset: float, apex: float, offset: float) -> np.ndarray:
    """Onset/apex/offset trajectory in [0, 1] of an episode starting at ``start`` (frames)."""
    rise = _smoothstep((t - start) / onset)
    fall = 1.0 - _smoothstep((t - start - onset - apex) / offset)
    return np.minimum(rise, fall)


def _episode_aus(name: str, rng: np.random.Generator, extra: dict[int, float] | None = None) -> dict[int, float]:
    aus = dict(PROTOTYPES[name])
    for au, (prob, weight) in PROTOTYPE_VARIANTS.get(name, {}).items():
        if rng.random() < prob:
            aus[au] = weight
    aus.update(extra or {})
    return {au: w * rng.uniform(*EPISODE_JITTER) for au, w in aus.items()}


def _video_labels(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Universal AU intensities (n x len(ALL_AUS)) and expression index (n,) of one video session."""
    t = np.arange(n, dtype=float)
    u = np.zeros((n, len(ALL_AUS)))
    expr = np.full(n, UNKNOWN, np.int8)
    calm = np.zeros(n)  # envelope of neutral episodes
    names = list(EXPRESSION_WEIGHTS)
    probs = np.array(list(EXPRESSION_WEIGHTS.values()))
    cursor = rng.uniform(*GAP_FRAMES) - 4.0
    while cursor < n - 3:
        name = names[rng.choice(len(names), p=probs / probs.sum())]
        dur = rng.uniform(*ONSET_FRAMES), rng.uniform(*APEX_FRAMES), rng.uniform(*OFFSET_FRAMES)
        env = envelope(t, cursor, *dur)
        peak = rng.uniform(*EXPRESSION_PEAK)
        for au, w in _episode_aus(name, rng).items():
            u[:, _AU[au]] = np.maximum(u[:, _AU[au]], w * peak * env)
        if name == "neutral":  # a deliberately neutral face: damps every AU, labelled where fully neutral
            calm = np.maximum(calm, env)
            expr[env >= NEUTRAL_LABEL_LEVEL] = EXPRESSIONS.index(name)
        else:
            expr[env > 0] = EXPRESSIONS.index(name)
        cursor += sum(dur) + rng.uniform(*GAP_FRAMES)
    for _ in range(rng.poisson(SPONTANEOUS_RATE * n)):
        combo = SPONTANEOUS_COMBOS[rng.integers(len(SPONTANEOUS_COMBOS))]
        env = envelope(t, rng.uniform(-5, n), rng.uniform(*ONSET_FRAMES), rng.uniform(*APEX_FRAMES),
                       rng.uniform(*OFFSET_FRAMES))
        peak = rng.uniform(*SPONTANEOUS_PEAK)
        for au in combo:
            u[:, _AU[au]] = np.maximum(u[:, _AU[au]], peak * rng.uniform(*EPISODE_JITTER) * env)
    return np.clip(u * (1.0 - calm)[:, None], 0, MAX_INTENSITY), expr


def _wander(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """Smooth random trajectory in [-amplitude, amplitude]: an offset plus two slow sinusoids."""
    t = np.arange(n)
    freq, phase = rng.uniform(0.01, 0.08, 2), rng.uniform(0, 2 * np.pi, 2)
    wave = np.sin(2 * np.pi * freq[:, None] * t + phase[:, None]).sum(0) / 2
    return amplitude * np.clip(rng.uniform(-0.5, 0.5) + 0.5 * wave, -1, 1)


def _frame_params(rng: np.random.Generator, n: int, pre: Preset, src: FerSource | None) -> list[FrameParams]:
    """Per-frame nuisances of one session: head pose, gaze, blinks, light, blur, noise, occlusion, clutter."""
    pose = {k: _wander(rng, n, amp) for k, amp in (("yaw", pre.max_yaw), ("pitch", pre.max_pitch),
                                                   ("roll", pre.max_roll), ("sx", pre.max_shift),
                                                   ("sy", pre.max_shift), ("scale", pre.max_scale))}
    gaze_x, gaze_y = _wander(rng, n, 1.0), _wander(rng, n, 1.0)
    blink = np.zeros(n + len(BLINK_PROFILE))
    for b in rng.choice(n, size=min(n, rng.poisson(BLINK_RATE * n)), replace=False):
        blink[b:b + len(BLINK_PROFILE)] = np.maximum(blink[b:b + len(BLINK_PROFILE)], BLINK_PROFILE)
    ill = pre.illumination
    ang = rng.uniform(0, 2 * np.pi)
    light = (math.cos(ang), math.sin(ang), rng.uniform(0, ill))
    gain = rng.uniform(1 - 0.6 * ill, 1 + 0.3 * ill) * (1 + 0.1 * ill * _wander(rng, n, 1.0))
    tint = tuple(rng.uniform(1 - 0.15 * ill, 1 + 0.15 * ill, 3))
    blur = pre.blur_max * rng.random(n) ** 2 + (src.blur if src else 0.0)
    noise = pre.noise_std * rng.uniform(0.3, 1.0)
    occluded = np.zeros(n, bool)
    occluder = None
    if rng.random() < pre.occlusion_prob:
        length = max(1, int(n * rng.uniform(*OCCLUSION_FRACTION)))
        start = int(rng.integers(0, n - length + 1))
        occluded[start:start + length] = True
        kind = "hand" if rng.random() < 0.6 else "bar"
        spots = ((0.0, 0.85), (-0.45, 0.0), (0.45, 0.0), (-0.5, 0.5), (0.5, 0.5), (0.0, 1.05))
        cx, cy = spots[rng.integers(len(spots))]
        occluder = {"kind": kind, "centre": (cx + rng.uniform(-0.1, 0.1), cy + rng.uniform(-0.1, 0.1)),
                    "size": rng.uniform(0.35, 0.6), "angle": rng.uniform(-120, -60) if kind == "hand"
                    else rng.uniform(-40, 40), "colour": tuple(rng.uniform(0.8, 1.1) * np.array(HAND_TINT))
                    if kind == "hand" else tuple(rng.uniform(10, 240, 3))}
    clutter = ()
    if pre.clutter:
        clutter = tuple(("rect" if rng.random() < 0.5 else "ellipse", *rng.uniform(0, 1, 2),
                         *rng.uniform(0.05, 0.35, 2), *rng.uniform(0, 255, 3)) for _ in range(rng.integers(3, 8)))
    return [FrameParams(yaw=pose["yaw"][i], pitch=pose["pitch"][i], roll=pose["roll"][i],
                        shift=(pose["sx"][i], pose["sy"][i]), scale=1.0 + pose["scale"][i],
                        gaze=(gaze_x[i], gaze_y[i]), blink=blink[i], light=light, gain=gain[i], tint=tint,
                        blur=blur[i], noise=noise, greyscale=bool(src and src.greyscale),
                        occluder=occluder if occluded[i] else None, clutter=clutter) for i in range(n)]


def _unknown_mask(rng: np.random.Generator, n: int, n_labels: int, rate: float, whole: float) -> np.ndarray:
    """Boolean (n x n_labels) mask of UNKNOWN entries in runs (coder gaps), about ``rate`` of all entries."""
    mask = np.zeros((n, n_labels), bool)
    if rate <= 0:
        return mask
    mean_len = np.mean(UNKNOWN_RUN) * max(0.5, 1 - np.mean(UNKNOWN_RUN) / (2 * n))  # runs cut at the end
    per_run = mean_len * (whole * n_labels + (1 - whole) * np.mean(UNKNOWN_RUN_AUS))
    for _ in range(rng.poisson(rate * n * n_labels / per_run)):
        length = int(rng.integers(UNKNOWN_RUN[0], UNKNOWN_RUN[1] + 1))
        start = int(rng.integers(0, n))
        cols = slice(None) if rng.random() < whole else rng.choice(
            n_labels, size=min(n_labels, int(rng.integers(UNKNOWN_RUN_AUS[0], UNKNOWN_RUN_AUS[1] + 1))), replace=False)
        mask[max(0, start):start + length, cols] = True
    return mask


@dataclass
class _Session:
    """Everything needed to label and render one session (a run of consecutive frames of one subject)."""

    dataset: str
    subject: str
    session: str
    position: int  # subject position in its dataset's name-sorted list
    group: int
    ident: Identity
    frames: np.ndarray
    universal: np.ndarray  # frames x len(ALL_AUS), before habits
    intensity: np.ndarray  # frames x len(ALL_AUS), rendered and labelled
    expression: np.ndarray
    params: list[FrameParams]
    noise_key: tuple[int, ...]


def _plan(pre: Preset, seed: int) -> list[_Session]:
    """Draw subjects, sessions, labels and nuisances (no rendering)."""
    sessions: list[_Session] = []
    sources = pre.fer_sources or (None,)
    for s_idx, src in enumerate(sources):
        n_sub = max(1, round(pre.n_subjects * src.share)) if src else pre.n_subjects
        for i in range(n_sub):
            key = (s_idx, i)
            group = habit_group_of(i, n_sub, pre.contrarians_per_fold)
            ident = sample_identity(_rng(pre.name, seed, *key, 0), HABIT_GROUPS[group].family, pre.identity_shift)
            if src and src.background is not None:
                ident.background = np.array(src.background, float) + _rng(pre.name, seed, *key, 5).normal(0, 8, 3)
            prefix = src.prefix if src else pre.subject_prefix
            subject = f"{prefix}{i + 1:03d}"
            if src:
                sessions += _fer_sessions(pre, seed, src, key, subject, i, group, ident)
                continue
            for k in range(pre.sessions_per_subject):
                rng = _rng(pre.name, seed, *key, 1, k)
                n = int(rng.integers(pre.frames_per_session[0], pre.frames_per_session[1] + 1))
                universal, expr = _video_labels(rng, n)
                params = _frame_params(_rng(pre.name, seed, *key, 2, k), n, pre, None)
                shown = apply_habits(universal, HABIT_GROUPS[group]) if pre.habits else universal.copy()
                sessions.append(_Session(pre.name, subject, f"T{k + 1}", i, group, ident, np.arange(n), universal,
                                         shown, expr, params, (*key, 3, k)))
    return sessions


def _fer_sessions(pre: Preset, seed: int, src: FerSource, key: tuple[int, int], subject: str, position: int,
                  group: int, ident: Identity) -> list[_Session]:
    """One posed clip per emotion, keeping three apex-ish frames (the last three, or the middle three for MMI)."""
    out = []
    extra = dict(src.extra)
    for e_idx, name in enumerate(FER_EXPRESSIONS):
        rng = _rng(pre.name, seed, *key, 1, e_idx)
        length = int(rng.integers(10, 19))
        t = np.arange(length, dtype=float)
        if src.apex == "middle":
            env = envelope(t, 0.0, length / 2 - 1.5, 2.0, length / 2 - 0.5)
            keep = np.arange(length // 2 - 1, length // 2 + 2)
        else:
            env = envelope(t, 0.0, length - 1.0, 10.0, 1.0)
            keep = np.arange(length - 3, length)
        peak = rng.uniform(*POSED_PEAK)
        universal = np.zeros((len(keep), len(ALL_AUS)))
        for au, w in _episode_aus(name, rng, dict(extra.get(name, ()))).items():
            universal[:, _AU[au]] = w * peak * env[keep]
        universal = np.clip(universal, 0, MAX_INTENSITY)
        params = _frame_params(_rng(pre.name, seed, *key, 2, e_idx), len(keep), pre, src)
        out.append(_Session(src.name, subject, f"{name}_{e_idx + 1}", position, group, ident, keep, universal,
                            apply_habits(universal, HABIT_GROUPS[group]),
                            np.full(len(keep), e_idx, np.int8), params, (*key, 3, e_idx)))
    return out


def _quantise(intensity: np.ndarray) -> np.ndarray:
    """Continuous 0-5 intensity -> FACS-like integer intensity (0 absent, 1 = A trace ... 5 = E maximum)."""
    return np.clip(np.rint(intensity), 0, MAX_INTENSITY).astype(np.int8)


def _index(pre: Preset, seed: int, sessions: list[_Session]) -> pd.DataFrame:
    """Label table of all sessions in order (one row per frame)."""
    parts = []
    label_aus = pre.label_aus
    cols = [_AU[au] for au in label_aus]
    for s in sessions:
        n = len(s.frames)
        lab = _quantise(s.intensity[:, cols])
        uni = _quantise(s.universal[:, cols])
        occ, uocc = lab >= pre.positive_threshold, uni >= pre.positive_threshold
        stored = np.array([au in pre.aus for au in label_aus])
        as_int = np.array([au in pre.intensity_aus for au in label_aus])
        changed = ((occ != uocc) & stored) | ((lab != uni) & as_int)
        unknown = _unknown_mask(_rng(pre.name, seed, *s.noise_key, 4), n, len(label_aus), pre.unknown_rate,
                                pre.unknown_whole_frame)
        df = {"dataset": s.dataset, "subject": s.subject, "session": s.session, "frame": s.frames.astype(np.int64)}
        for c, au in enumerate(label_aus):  # occurrence columns first, then intensities
            if au in pre.aus:
                df[au_name(au)] = np.where(unknown[:, c], UNKNOWN, occ[:, c]).astype(np.int8)
        for c, au in enumerate(label_aus):
            if au in pre.intensity_aus:
                df[f"{au_name(au)}_int"] = np.where(unknown[:, c], UNKNOWN, lab[:, c]).astype(np.int8)
        df["expression"] = s.expression.astype(np.int8)
        df["habit_active"] = changed.any(axis=1)
        df["habit_group"] = np.int8(s.group)
        df["yaw"] = np.array([p.yaw for p in s.params], np.float32)
        df["pitch"] = np.array([p.pitch for p in s.params], np.float32)
        df["roll"] = np.array([p.roll for p in s.params], np.float32)
        df["occluded"] = np.array([p.occluder is not None for p in s.params])
        if pre.official_split:
            df["split"] = "validation" if s.position % N_FOLDS == N_FOLDS - 1 else "train"
        parts.append(pd.DataFrame(df))
    return pd.concat(parts, ignore_index=True)


def _meta(pre: Preset, seed: int, sessions: list[_Session], overrides: dict[str, Any] | None) -> dict[str, Any]:
    habits = {}
    for s in sessions:
        g = HABIT_GROUPS[s.group]
        if not pre.habits:  # the group only picked the look
            g = HabitGroup("none", g.family)
        habits[s.subject] = {"adds": {au_name(t): [au_name(a) for a in added] for t, added in g.adds},
                             "suppresses": [au_name(a) for a in g.suppresses], "group": s.group,
                             "group_name": g.name, "contrarian": g.contrarian, "appearance_family": g.family}
    fer = bool(pre.fer_sources)
    return {
        "name": pre.name, "preset": pre.name, "seed": seed, "generator_version": GENERATOR_VERSION,
        "description": pre.description, "overrides": dict(overrides or {}),
        "aus": [au_name(a) for a in pre.aus], "intensity_aus": [au_name(a) for a in pre.intensity_aus],
        "expressions": list(FER_EXPRESSIONS if fer else EXPRESSIONS), "label_type": pre.label_type,
        "positive_threshold": pre.positive_threshold,
        "datasets": [s.name for s in pre.fer_sources] if fer else [pre.name],
        "habits": habits,
        "habit_groups": [{"group": i, "name": g.name, "appearance_family": g.family, "contrarian": g.contrarian,
                          "adds": {au_name(t): [au_name(a) for a in added] for t, added in g.adds},
                          "suppresses": [au_name(a) for a in g.suppresses]} for i, g in enumerate(HABIT_GROUPS)],
        "folds": {"n_folds": N_FOLDS, "rule": "subjects sorted by name; fold k tests positions i with i % 3 == k; "
                  f"the last {pre.contrarians_per_fold} subject(s) of each fold are contrarians (habits absent "
                  "from its training folds)", "contrarians_per_fold": pre.contrarians_per_fold},
        "image_size": pre.image_size, "landmark_layout": "ibug68",
    }


def _render_into(pre: Preset, seed: int, sessions: list[_Session], images: np.ndarray, landmarks: np.ndarray,
                 progress: bool) -> None:
    total = sum(len(s.frames) for s in sessions)
    row = 0
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # frames are tiny: cv2's thread pool costs more than it saves
    try:
        with tqdm(total=total, disable=not progress, desc=f"SynthAU {pre.name}", unit="frame") as bar:
            for s in sessions:
                noise_rng = _rng(pre.name, seed, *s.noise_key)
                for i in range(len(s.frames)):
                    images[row], landmarks[row] = render_face(s.ident, s.intensity[i], s.params[i], pre.image_size,
                                                              noise_rng)
                    row += 1
                bar.update(len(s.frames))
    finally:
        cv2.setNumThreads(threads)


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$AURECOG_CACHE/synth`` if set, else ``<repo root>/cache/synth``."""
    env = os.environ.get("AURECOG_CACHE")
    return Path(env) / "synth" if env else Path(__file__).resolve().parents[2] / "cache" / "synth"


def dataset_dirname(preset: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> str:
    """Folder name of a generated dataset: ``<preset>-seed<seed>-v<version>`` (+ a hash of any overrides)."""
    name = f"{preset}-seed{seed}-v{GENERATOR_VERSION}"
    if overrides:
        digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name += f"-o{digest}"
    return name


def synthesize(preset: str = "synth", seed: int = 0, overrides: dict[str, Any] | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Render a preset in memory: (images N x H x W x 3 uint8, landmarks N x 68 x 2, index, meta).

    Same content as :func:`generate` writes; meant for tests and small ``overrides`` (e.g. ``n_subjects``).
    """
    pre = get_preset(preset, overrides)
    sessions = _plan(pre, seed)
    n = sum(len(s.frames) for s in sessions)
    images = np.empty((n, pre.image_size, pre.image_size, 3), np.uint8)
    landmarks = np.empty((n, N_LANDMARKS, 2), np.float32)
    _render_into(pre, seed, sessions, images, landmarks, progress)
    return images, landmarks, _index(pre, seed, sessions), _meta(pre, seed, sessions, overrides)


def label_table(preset: str = "synth", seed: int = 0,
                overrides: dict[str, Any] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The (index, meta) that :func:`generate` would write, without rendering any image (fast)."""
    pre = get_preset(preset, overrides)
    sessions = _plan(pre, seed)
    return _index(pre, seed, sessions), _meta(pre, seed, sessions, overrides)


def generate(preset: str = "synth", seed: int = 0, cache_dir: str | os.PathLike | None = None, progress: bool = True,
             overrides: dict[str, Any] | None = None) -> Path:
    """Generate a preset into ``<cache_dir>/<preset>-seed<seed>-v<version>`` once; return the prepared folder.

    An existing folder is reused only if it passes :func:`aurecog.data.prepared.verify` (``COMPLETE``, the
    manifest's sizes and hashes); a bad one (truncated, overwritten, interrupted, written before manifests) is
    regenerated with a one-line warning. An intact folder is returned without locking; otherwise the check and
    the generation run under ``<cache_dir>/<folder>.lock`` (a file lock), so processes asking for the same
    preset at once generate it once and the others wait and reuse it.
    ``overrides`` replaces Preset fields (e.g. ``{"n_subjects": 6}``) and gives the folder a distinct suffix.
    """
    pre = get_preset(preset, overrides)
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / dataset_dirname(preset, seed, overrides)
    if _cache_problem(out) is None:  # intact: no lock needed (the usual case, and what parallel cells hit)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("SynthAU %s: another process is generating %s; waiting for it", preset, out)
        lock.acquire()
    try:
        problem = _cache_problem(out)  # again under the lock: another process may have just written it
        if problem is None:
            return out
        if out.exists():
            log.warning("SynthAU cache %s is unusable (%s); regenerating it", out, problem)
        return _write(pre, seed, out, progress, overrides)
    finally:
        lock.release()


def _cache_problem(out: Path) -> str | None:
    """Why a cached folder cannot be reused (None: it is intact)."""
    if not out.exists():
        return "absent"
    if not (out / "COMPLETE").exists():
        return "no COMPLETE marker"
    try:
        verify(out)
    except PreparedFormatError as e:
        return str(e).split(";")[0]
    return None


def _write(pre: Preset, seed: int, out: Path, progress: bool, overrides: dict[str, Any] | None) -> Path:
    sessions = _plan(pre, seed)
    writer = PreparedWriter(out, sum(len(s.frames) for s in sessions), pre.image_size, "ibug68")
    _render_into(pre, seed, sessions, writer.images, writer.landmarks, progress)
    return writer.finalize(_index(pre, seed, sessions), _meta(pre, seed, sessions, overrides))


CONTACT_COLUMNS = 6
CONTACT_TILE_INCHES = 2.0


def contact_sheet(preset: str, out_png: str | os.PathLike, seed: int = 0, n: int = 24,
                  cache_dir: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Grid of ``n`` generated faces with their landmarks (dots) and active labels (text), saved as a PNG.

    Frames are spread evenly over the frames that show at least one AU, in subject order; for expression
    presets they cycle through the (dataset, expression) cells.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ds = PreparedDataset.open(generate(preset, seed, cache_dir, progress=False, overrides=overrides))
    idx = ds.index
    aus = ds.aus
    int_aus = set(ds.intensity_aus)
    if ds.meta.get("label_type") == "expression":  # one frame per (dataset, expression) cell in turn
        cells = [g.index.to_numpy() for _, g in idx.groupby(["expression", "dataset"], sort=True)]
        rows = np.array([c[(len(c) * (k // len(cells) + 1)) // 3 % len(c)] for k, c in
                         zip(range(n), itertools.cycle(cells))])
    else:  # spread over the frames that show some AU, in subject order
        rows = np.flatnonzero((idx[aus].to_numpy() == 1).any(axis=1))
        rows = rows[np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)]
    n_rows = math.ceil(len(rows) / CONTACT_COLUMNS)
    fig = Figure(figsize=(CONTACT_COLUMNS * CONTACT_TILE_INCHES, n_rows * CONTACT_TILE_INCHES * 1.25))
    FigureCanvasAgg(fig)
    expressions = ds.expressions
    for k, r in enumerate(rows):
        ax = fig.add_subplot(n_rows, CONTACT_COLUMNS, k + 1)
        rec = idx.iloc[r]
        ax.imshow(ds.images[r], interpolation="bilinear")
        lm = ds.landmarks[r]
        ax.scatter(lm[:, 0], lm[:, 1], s=1.5, c="lime", linewidths=0)
        labels = []
        for au in aus:
            if rec[au] == 1:
                labels.append(f"{au[2:]}({rec[au + '_int']})" if au + "_int" in idx.columns and au in int_aus
                              else au[2:])
        expr = expressions[rec["expression"]] if rec["expression"] >= 0 else "-"
        title = f"{rec['dataset']}/{rec['subject']}/{rec['session']}#{rec['frame']}\n{expr}"
        title += " [habit]" if rec.get("habit_active", False) else ""
        ax.set_title(title, fontsize=6)
        ax.set_xlabel("AU " + " ".join(labels) if labels else "no AU", fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"SynthAU {preset} (seed {seed}, v{GENERATOR_VERSION})", fontsize=9)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
