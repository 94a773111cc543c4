"""The phantom's stages, their mix, and how hard the full-image problem is (:class:`Difficulty`,
its named :data:`PRESETS`, the strength of the global maturity cues)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from kdtoolkit.errors import KdError

STAGES = ("stage_1", "stage_2", "stage_3", "stage_4", "stage_5")
PAPER_COUNTS = (158, 88, 92, 124, 252)
"""Scans per stage in the paper (Halimi Milani et al. 2025); they sum to 714 (of 723 scans)."""


@dataclass(frozen=True)
class Difficulty:
    """How hard the full-image problem is; the crop stays stageable at every setting.

    ``band_width``: ROI width / image width at the mean pose (the ROI covers ``band_width`` ×
    ``band_width / 2`` of the image; the pose scale varies it by ±``scale_jitter``); the clivus
    thickness is 0.4 ROI widths. Allowed range 0.05–0.2.
    ``min_decoys``/``max_decoys``: decoy bands per image (uniform in the range).
    ``noise``: σ of the additive Gaussian noise, in units of the full intensity range.
    ``pattern_contrast``: multiplies the cleft darkness and scar brightness (1 = default).
    ``max_rotation`` (degrees), ``scale_jitter``, ``max_shift`` (fraction of the image): pose.
    ``age_cues``: strength of the global maturity cues (skull size, sphenoid sinus, dentition,
    face height, vault thickness, vertebrae); 0 draws none. ``age_spread``: σ, in stages, of the
    maturity around the stage (the overlap between stages seen through the cues).

    The defaults are the ``"paper"`` regime; :func:`preset` names the others.
    """

    band_width: float = 0.125
    min_decoys: int = 2
    max_decoys: int = 4
    noise: float = 0.04
    pattern_contrast: float = 1.0
    max_rotation: float = 15.0
    scale_jitter: float = 0.05
    max_shift: float = 0.05
    age_cues: float = 1.0
    age_spread: float = 0.2

    def check(self) -> None:
        """Raise ``KdError`` for values the generator cannot draw."""
        problems = []
        if not 0.05 <= self.band_width <= 0.2:
            problems.append(f"band_width must be in [0.05, 0.2], got {self.band_width}")
        if not 0 <= self.min_decoys <= self.max_decoys <= 8:
            problems.append(
                f"decoys need 0 <= min_decoys <= max_decoys <= 8, got "
                f"{self.min_decoys}..{self.max_decoys}"
            )
        if not 0 <= self.noise <= 0.5:
            problems.append(f"noise must be in [0, 0.5], got {self.noise}")
        if not 0 < self.pattern_contrast <= 3:
            problems.append(f"pattern_contrast must be in (0, 3], got {self.pattern_contrast}")
        if not 0 <= self.max_rotation <= 45:
            problems.append(f"max_rotation must be in [0, 45], got {self.max_rotation}")
        if not 0 <= self.scale_jitter <= 0.25:
            problems.append(f"scale_jitter must be in [0, 0.25], got {self.scale_jitter}")
        if not 0 <= self.max_shift <= 0.15:
            problems.append(f"max_shift must be in [0, 0.15], got {self.max_shift}")
        if not 0 <= self.age_cues <= 2:
            problems.append(f"age_cues must be in [0, 2], got {self.age_cues}")
        if not 0 < self.age_spread <= 3:
            problems.append(f"age_spread must be in (0, 3], got {self.age_spread}")
        if problems:
            raise KdError("phantom: " + "; ".join(problems))


PRESETS = {
    "paper": Difficulty(),
    "hard": Difficulty(scale_jitter=0.1, age_cues=0.0),
}
"""Named regimes. ``paper``: global maturity cues let a full-image model stage most slices, as
on real scans. ``hard``: no such cues; only the synchondrosis tells the stage."""


def preset(name: str, **overrides) -> Difficulty:
    """The named :data:`PRESETS` regime with ``overrides`` (``None`` values are ignored)."""
    if name not in PRESETS:
        raise KdError(f"phantom: unknown difficulty {name!r} (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------------
# stage mix


def stage_counts(n: int, proportions: tuple[int, ...] = PAPER_COUNTS) -> list[int]:
    """Images per stage: ``proportions`` scaled to ``n`` by the largest-remainder method
    (ties go to the earlier stage)."""
    if n < 0:
        raise KdError(f"phantom: n must be >= 0, got {n}")
    total = sum(proportions)
    quotas = [n * p / total for p in proportions]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stage_order(n: int, seed: int) -> np.ndarray:
    """The 0-based stage of each of the ``n`` images: the stage mix, shuffled by ``seed``."""
    stages = np.repeat(np.arange(len(STAGES)), stage_counts(n))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,))).permutation(
        stages
    )


# --------------------------------------------------------------------------------------------
# global maturity cues


CUE_AMOUNT = {
    "skull": 0.35,  # head size in the fixed field of view
    "sinus": 1.5,  # pneumatisation of the sphenoid sinus
    "teeth": 3.5,  # unerupted tooth buds (mixed dentition)
    "face": 0.6,  # chin lower and larger (facial growth)
    "vault": 1.6,  # thickness of the skull vault
    "spine": 0.6,  # depth of the vertebral bodies (cervical maturation)
    "density": 0.6,  # grey level of the diploe, jaw and vertebrae (mineralisation)
}
"""How far each cue moves from the least to the most mature slice at ``age_cues = 1``."""
CUES = tuple(CUE_AMOUNT)
"""The global maturity cues (all absent at ``age_cues = 0``)."""
CUE_NOISE = 0.08
"""σ of each cue's own variation around the slice's maturity (0..1 scale)."""
