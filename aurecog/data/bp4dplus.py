"""BP4D+ (MMSE) reader: the BP4D reader (:mod:`aurecog.data.bp4d`) on the BP4D+ distribution.

Same layout as BP4D (``AUCoding/AU_OCC/<Subj>_<Task>.csv``, ``AUCoding/AU_INT/AUxx/<Subj>_<Task>_AUxx.csv``,
``2DFeatures/<Subj>_<Task>.mat``, ``2D+3D/<Subj>.zip`` or unzipped ``2D+3D/<Subj>/<Task>/``). Only tasks T1, T6,
T7 and T8 are AU-coded; images of the other tasks are reported as images without labels. The occurrence CSV's
first column is the (1-based) frame number and the other columns are the 34 coded AUs :data:`BP4DPLUS_CODED_AUS`
(rPPG-Toolbox ``AU_num``; FMAE-IAT reads the 12 BP4D AUs at the matching positions). The header must name exactly
these AUs in this order; a header numbered by position (1..34) stops preparation unless ``header=position`` says
so (which header the distribution ships is not pinned down by a public document). The 12 BP4D AUs are read.
9 = unknown -> -1, as in BP4D. Intensities of AUs 6, 10, 12, 14, 17. Landmarks: the 49-point IntraFace
``2DFeatures`` files, read as for BP4D (if your copy ships another landmark set, convert it to the documented text
alternative or use the generic CSV layout).

Subjects are written as ``bp4dplus_<id>`` (``bp4dplus_F001``): BP4D+'s F001 is another person than BP4D's F001,
and BP4D's ``to_bp4dplus`` protocol tests BP4D+ next to BP4D's training subjects.
"""

from __future__ import annotations

from aurecog.data import bp4d
from aurecog.data import prepare as P

BP4DPLUS_TASKS = ("T1", "T6", "T7", "T8")
#: the occurrence AUs of a BP4D+ AU_OCC csv, in column order after the frame column (notes A.5)
BP4DPLUS_CODED_AUS = [1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 22, 23, 24, 27, 28, 29, 30,
                      31, 32, 33, 34, 35, 36, 37, 38, 39]
SUBJECT_PREFIX = "bp4dplus_"
OPTION_HELP = {
    "tasks": "AU-coded tasks to prepare",
    "header": "names: the AU_OCC header names the 34 coded AUs; position: columns numbered 1..34 by position",
}


def prepare(src, out, workers=None, image_size=P.DEFAULT_IMAGE_SIZE, progress=True, *, tasks=BP4DPLUS_TASKS,
            header="names"):
    """Prepare BP4D+ (12 AUs as BP4D; tasks T1, T6, T7, T8; subjects bp4dplus_<id>)."""
    return bp4d.prepare_layout(src, out, workers=workers, image_size=image_size, progress=progress,
                               dataset="bp4dplus", aus=bp4d.BP4D_AUS, intensity_aus=bp4d.BP4D_INTENSITY_AUS,
                               tasks=tasks, header=header, coded=BP4DPLUS_CODED_AUS, subject_prefix=SUBJECT_PREFIX)
