"""BP4D+ (MMSE) reader: the BP4D reader (:mod:`aurecog.data.bp4d`) on the BP4D+ distribution.

Same layout as BP4D (``AUCoding/AU_OCC/<Subj>_<Task>.csv``, ``AUCoding/AU_INT/AUxx/<Subj>_<Task>_AUxx.csv``,
``2DFeatures/<Subj>_<Task>.mat``, ``2D+3D/<Subj>.zip`` or unzipped ``2D+3D/<Subj>/<Task>/``). Only tasks T1, T6,
T7 and T8 are AU-coded; the occurrence CSV's first column is the (1-based) frame number and the other columns
are named by AU number (34 AUs); the 12 BP4D AUs are read by name. 9 = unknown -> -1, as in BP4D. Intensities of
AUs 6, 10, 12, 14, 17. Landmarks: the 49-point IntraFace ``2DFeatures`` files, read as for BP4D (if your copy ships
another landmark set, convert it to the documented text alternative or use the generic CSV layout).
Subjects keep BP4D+'s ids (F001...; different people from BP4D's F001).
"""

from __future__ import annotations

from aurecog.data import bp4d
from aurecog.data import prepare as P

BP4DPLUS_TASKS = ("T1", "T6", "T7", "T8")


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, tasks=BP4DPLUS_TASKS):
    """Prepare BP4D+ (12 AUs as BP4D; tasks T1, T6, T7, T8)."""
    return bp4d.prepare(src, out, workers=workers, image_size=image_size, progress=progress, dataset="bp4dplus",
                        tasks=tasks)
