"""A synthetic SOS phantom: midsagittal-slice-like grey images with a staged synchondrosis.

Every image is drawn in a *canonical* head frame (x to the face, y down; at the identity pose
the image spans [-1, 1] in both axes) and mapped to pixels by a random pose (rotation, scale,
shift of the whole anatomy). The spheno-occipital synchondrosis sits on the clivus between the
sphenoid body and the basi-occiput; its 2:1 ROI (long side along the clivus, top edge on the
endocranial surface) holds the stage pattern (Bassed et al.):

1. an open dark cleft across the whole bone;
2. fused at the endocranial (top) end, cleft open below;
3. about half fused (top half bone, bottom half cleft);
4. fully fused, a bright scar line across the bone;
5. even trabecular bone.

Decoy bars of the same size and texture (on the vault, in the cervical spine, on the occipital
squama, on the palate) carry random stage patterns unrelated to the label, so a full-image model
has to find the clivus. Geometry follows :mod:`kdtoolkit.data.geometry`: pixel ``(row i, col j)``
covers ``x ∈ [j, j+1), y ∈ [i, i+1)`` and ``roi_corners(box, angle)`` are the band's corners.
"""

from kd_sos.phantom.difficulty import (
    CUE_AMOUNT,
    CUE_NOISE,
    CUES,
    PAPER_COUNTS,
    PRESETS,
    STAGES,
    Difficulty,
    preset,
    stage_counts,
    stage_order,
)
from kd_sos.phantom.draw import crop
from kd_sos.phantom.files import (
    MANIFEST_COLUMNS,
    PARAMS_FILE,
    ensure_phantom,
    phantom_params,
    sample_rng,
    write_phantom,
)
from kd_sos.phantom.render import BASE_ZOOM, GENERATOR_VERSION, PhantomSample, render

__all__ = [
    "BASE_ZOOM",
    "CUES",
    "CUE_AMOUNT",
    "CUE_NOISE",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "PAPER_COUNTS",
    "PARAMS_FILE",
    "PRESETS",
    "STAGES",
    "Difficulty",
    "PhantomSample",
    "crop",
    "ensure_phantom",
    "phantom_params",
    "preset",
    "render",
    "sample_rng",
    "stage_counts",
    "stage_order",
    "write_phantom",
]
