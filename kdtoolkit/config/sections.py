"""The sections of a recipe (``[experiment]``, ``[augment]``, ``[cv]``, ``[teacher]``/``[student]``,
``[roi]``, ``[[loss]]``, ``[evaluate]``, ``[task]``) as typed dataclasses; ``[data]`` and
``[launch]`` have modules of their own. ``kdtoolkit.config.recipe`` puts them together."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from kdtoolkit.config.option import Range
from kdtoolkit.config.override import parse_override
from kdtoolkit.errors import KdError


@dataclass
class ExperimentConfig:
    name: str = "kd"
    output: str = ""
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile the feature trunk (models.device.compile_trunk)
    paired: bool = True  # full-image rows share initial weights and batch order (stage_seed)
    # run loggers (names, or tables with name and options); not part of the digest
    loggers: list[str | dict[str, Any]] = field(default_factory=lambda: ["csv"])


#: ``[augment]`` keys of the crop-box jitter: off (0) they stay out of the digest.
ROI_JITTER = ("roi_shift", "roi_scale", "roi_degrees")
Fraction = Annotated[float, Range(ge=0, le=1)]


@dataclass
class AugmentConfig:
    """Training augmentation (``[augment]``): random flip, rotation (``degrees``), zoom
    (``scale``: ±), shift (``translate``: fraction of the size); the crop classifier's ROI
    box moved as a detector's may be (``roi_shift``: ± fraction of its width along it and
    of its height across it, one value or ``[along, across]``, ``roi_scale``:
    ± size, ``roi_degrees``: ± angle; only the two-stage classifier's crops, never the
    teacher's, see ``crop_jitter``); intensity
    jitter (``brightness`` ±, ``contrast`` ± gain, ``gamma``: exponent exp(±gamma),
    ``noise``: Gaussian std) on [0, 1] pixels; 0 turns a term off."""

    flip_p: Annotated[float, Range(ge=0, le=1)] = 0.5
    degrees: Annotated[float, Range(ge=0, le=180)] = 10.0
    scale: Annotated[float, Range(ge=0, lt=1)] = 0.1
    translate: Annotated[float, Range(ge=0, lt=1)] = 0.05
    roi_shift: Fraction | list[Fraction] = 0.0
    roi_scale: Annotated[float, Range(ge=0, lt=1)] = 0.0
    roi_degrees: Annotated[float, Range(ge=0, le=180)] = 0.0
    brightness: Annotated[float, Range(ge=0, le=1)] = 0.1
    contrast: Annotated[float, Range(ge=0, le=1)] = 0.1
    gamma: Annotated[float, Range(ge=0, le=1)] = 0.1
    noise: Annotated[float, Range(ge=0, le=1)] = 0.01

    @property
    def crop_jitter(self) -> bool:
        """Whether the crop-box jitter is on (any of ``ROI_JITTER`` above 0): the two-stage
        classifier of a learned ROI provider trains on jittered crops."""
        shift = self.roi_shift if isinstance(self.roi_shift, list) else [self.roi_shift]
        return bool(any(shift) or self.roi_scale or self.roi_degrees)


@dataclass
class CvConfig:
    folds: Annotated[int, Range(ge=2)] = 5
    val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.15
    only: list[int] = field(default_factory=list)
    repeats: Annotated[int, Range(ge=1, le=1000)] = 1  # repeat r's fold k: id r·folds + k


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    backbone_options: dict[str, Any] = field(default_factory=dict)
    pretrained: bool | str = False  # false, a weights file or "timm": config/pretrained.py
    epochs: Annotated[int, Range(ge=1, le=100_000)] = 30
    batch_size: Annotated[int, Range(ge=1, le=1_000_000)] = 32
    lr: Annotated[float, Range(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Range(ge=0, le=10)] = 0.05
    warmup_epochs: Annotated[int, Range(ge=0, le=100_000)] = 1
    schedule: Literal["cosine", "constant"] = "cosine"
    class_weights: bool = False
    select_by: Literal["last", "accuracy", "f1", "loss"] = "last"
    ema: Annotated[float, Range(ge=0, lt=1)] = 0.0  # decay of a weight average; 0: off
    init_from_teacher: bool = False


@dataclass
class RoiConfig:
    provider: str = "manual"
    mask: Literal["box", "gaussian"] = "box"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str
    weight: Annotated[float, Range(ge=0)] = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateConfig:
    baseline: bool = True
    two_stage: bool = True
    cam_examples: Annotated[int, Range(ge=0)] = 6


@dataclass
class TaskConfig:
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


#: A student variant's name: lower snake_case (its stage is ``student_<name>``).
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


@dataclass
class CompareConfig:
    """``[compare]``: the student variants ``kd compare`` trains when the command line names
    none, ``variants = {name = ["key=value", ...]}`` (an empty list: the recipe as it is). Not
    part of the digest: it says what to compare, not how a run computes."""

    variants: dict[str, list[str]] = field(default_factory=dict)


def compare_problems(compare: CompareConfig) -> list[str]:
    """Variant names and their ``--set`` style overrides, with dotted key paths."""
    problems = []
    for name, overrides in compare.variants.items():
        key = f"compare.variants.{name}"
        if not VARIANT_NAME.fullmatch(name) or name in ("teacher_crop", "baseline_full"):
            problems.append(f"{key}: a variant name is lower snake_case, not a reference row")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            problems.append(f'{key}: expected a list of "key=value" strings, got {overrides!r}')
            continue
        for text in overrides:
            try:
                parse_override(text)
            except KdError as e:
                problems.append(f"{key}: {e}")
    return problems
