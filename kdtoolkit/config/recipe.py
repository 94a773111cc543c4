"""Recipes: TOML files validated into typed objects before anything runs.

A recipe is data: it never executes code. Every problem is collected with its dotted key path
and reported together (``RecipeError``). ``--set a.b=value`` overrides are applied before
validation, the value read as a TOML value (a bare word is a string).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdtoolkit.config.data import SCAN_KEYS, DataConfig, data_problems
from kdtoolkit.config.launch import LaunchConfig, launch_problems
from kdtoolkit.config.option import check_options, check_value
from kdtoolkit.config.override import (
    OPTION_SECTIONS,
    apply_overrides,
    deep_merge,
    flatten_values,
    parse_override,
)
from kdtoolkit.config.pretrained import check_model_pretrained
from kdtoolkit.config.sections import (
    ROI_JITTER,
    AugmentConfig,
    CompareConfig,
    CvConfig,
    EvaluateConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    RoiConfig,
    TaskConfig,
    compare_problems,
)
from kdtoolkit.config.tune import TuneConfig, build_tune, folds_problems, tune_problems
from kdtoolkit.errors import KdError, suggestion
from kdtoolkit.plugins.logger import logger_problems
from kdtoolkit.plugins.task import Task, crop_problems


class RecipeError(KdError):
    """All problems of a recipe; ``problems`` holds one line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            f"{source}: {len(problems)} problem(s) in the recipe:\n"
            + "\n".join(f"  {p}" for p in problems)
        )


@dataclass
class Recipe:
    """A validated recipe. ``source`` is the file it came from (or ``<python>``)."""

    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cv: CvConfig = field(default_factory=CvConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    roi: RoiConfig = field(default_factory=RoiConfig)
    loss: list[LossConfig] = field(default_factory=list)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    source: str = "<python>"

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (JSON-serialisable), options inlined as in TOML."""
        raw = dataclasses.asdict(self)
        raw.pop("source")
        raw["task"] = {"name": self.task.name, **self.task.options} if self.task.name else {}
        raw["roi"] = {"provider": self.roi.provider, "mask": self.roi.mask, **self.roi.options}
        raw["loss"] = [{"name": lc.name, "weight": lc.weight, **lc.options} for lc in self.loss]
        raw["tune"] = self.tune.to_dict()
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def digest(self) -> str:
        """A short hash of what the run computes (output folder, device, data loading and
        ``cv.only`` and ``[launch]`` excluded, so a run can be done fold by fold into one
        folder, on any machine)."""
        raw = self.to_dict()
        raw.pop("launch")
        raw.pop("compare")
        raw.pop("tune")
        experiment = raw["experiment"]
        raw["experiment"] = {k: v for k, v in experiment.items() if k == "seed"}
        if experiment["paired"]:  # unpaired is how every run was made before the key existed
            raw["experiment"]["paired"] = True
        defaults = dataclasses.asdict(DataConfig())
        raw["data"] = {
            k: v
            for k, v in raw["data"].items()
            if k not in ("workers", "loader") and not (k in SCAN_KEYS and v == defaults[k])
        }
        cv = raw["cv"]  # only: runs in parts; one repeat: unset, as before the key existed
        raw["cv"] = {k: v for k, v in cv.items() if k != "only" and (k, v) != ("repeats", 1)}
        for role in ("teacher", "student"):  # unset, as before the key existed
            unset = (("pretrained", False), ("ema", 0.0))
            raw[role] = {k: v for k, v in raw[role].items() if (k, v) not in unset}
        augment = raw["augment"]
        if isinstance(augment["roi_shift"], list) and len(set(augment["roi_shift"])) == 1:
            augment["roi_shift"] = augment["roi_shift"][0]  # [s, s] is s
        raw["augment"] = {k: v for k, v in augment.items() if k not in ROI_JITTER or v != 0}
        if self.augment.crop_jitter:  # the teacher trains on exact crops whatever the jitter
            raw["augment"]["teacher_crops"] = "exact"
        text = json.dumps(raw, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def size(self, which: Literal["image", "crop"]) -> tuple[int, int]:
        """(height, width) of the student input or the teacher crop."""
        value = self.data.image_size if which == "image" else self.data.crop_size
        return (value, value) if isinstance(value, int) else (value[0], value[1])

    @property
    def output_dir(self) -> Path:
        return Path(self.experiment.output or f"runs/{self.experiment.name}")


def _build_section(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, recording problems; returns an instance
    (defaults where values were bad) so validation can go on."""
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a table, got {type(raw).__name__} {raw!r}")
        raw = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    section = path.split(".")[-1].split("[")[0]
    option_key = OPTION_SECTIONS.get(section)
    values: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in raw.items():
        key_path = f"{path}.{key}"
        if option_key is not None and key not in fields:
            options[key] = value
            continue
        if key not in fields or key == "options":
            problems.append(f"{key_path}: unknown key{suggestion(key, fields)}")
            continue
        if dataclasses.is_dataclass(hints[key]):
            values[key] = _build_section(hints[key], value, key_path, problems)
            continue
        problem = check_value(value, hints[key])
        if problem:
            problems.append(f"{key_path}: {problem}")
            continue
        values[key] = value
    missing = [
        f.name
        for f in fields.values()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    for name in missing:
        problems.append(f"{path}.{name}: required key is missing")
        values[name] = ""
    if option_key is not None:
        values["options"] = options
    return cls(**values)


def _build_losses(raw: Any, problems: list[str]) -> list[LossConfig]:
    if not isinstance(raw, list):
        problems.append("loss: expected an array of tables ([[loss]])")
        return []
    out = []
    for i, item in enumerate(raw):
        path = f"loss[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{path}: expected a table with name and weight")
            continue
        known = {k: v for k, v in item.items() if k in ("name", "weight")}
        config = _build_section(LossConfig, known, path, problems)
        config.options = {k: v for k, v in item.items() if k not in ("name", "weight")}
        out.append(config)
    return out


def validate(raw: dict[str, Any], source: str = "<python>") -> Recipe:
    """Validate a recipe dict (task defaults already merged) into a ``Recipe``; raise
    ``RecipeError`` listing every problem."""
    problems: list[str] = []
    sections = {f.name: f for f in dataclasses.fields(Recipe) if f.name != "source"}
    hints = typing.get_type_hints(Recipe, include_extras=True)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in sections:
            problems.append(f"{key}: unknown section{suggestion(key, sections)}")
        elif key == "loss":
            values["loss"] = _build_losses(value, problems)
        elif key == "tune":
            values["tune"] = build_tune(value, problems)
        else:
            values[key] = _build_section(hints[key], value, key, problems)
    recipe = Recipe(**values, source=source)
    if not recipe.loss:
        problems.append('loss: at least one [[loss]] table is needed, e.g. name = "ce"')
    problems += _check_components(recipe)
    problems += data_problems(recipe.data) + launch_problems(recipe.launch)
    problems += compare_problems(recipe.compare)
    shift = recipe.augment.roi_shift
    if isinstance(shift, list) and len(shift) != 2:
        problems.append(f"augment.roi_shift: expected one fraction or [along, across], got {shift}")
    n = recipe.cv.folds * recipe.cv.repeats  # every repeat's folds
    if bad := [k for k in recipe.cv.only if not 0 <= k < n]:
        problems.append(f"cv.only: folds {bad} do not exist (0..{n - 1})")
    if (task := _task_of(recipe)) is not None:  # derives or checks data.crop_size
        problems += crop_problems(task, recipe.data, raw.get("data"))
    problems += folds_problems(recipe.tune, n)
    if not problems and recipe.tune.space:  # each bound of the search space, as a recipe
        problems += tune_problems(recipe.tune, lambda o: _problems_with(raw, o))
    if problems:
        raise RecipeError(source, problems)
    return recipe


def _problems_with(raw: dict[str, Any], overrides: list[Any]) -> list[str]:
    """The problems of recipe ``raw`` (without ``[tune]``) with ``overrides`` applied."""
    base = {k: v for k, v in raw.items() if k != "tune"}
    try:
        validate(apply_overrides(base, overrides))
    except RecipeError as e:
        return e.problems
    except KdError as e:
        return [str(e)]
    return []


def _check_components(recipe: Recipe) -> list[str]:
    """Registry names and component options, with close matches; an unknown name also
    names the installed plugins that are switched off (it may be one of theirs)."""
    from kdtoolkit.plugins.manager import broken_message, broken_plugins

    problems = _component_problems(recipe)
    if any(": unknown " in p for p in problems):
        problems += [broken_message(n, why) for n, why in broken_plugins().items()]
    return problems


def _component_problems(recipe: Recipe) -> list[str]:
    from kdtoolkit.plugins.manager import registries

    regs = registries()
    problems: list[str] = []
    for role in ("teacher", "student"):
        config: ModelConfig = getattr(recipe, role)
        if config.backbone not in regs.backbones:
            problems.append(f"{role}.backbone: {regs.backbones.unknown_message(config.backbone)}")
        else:
            factory = regs.backbones.get(config.backbone)
            options, path = config.backbone_options, f"{role}.backbone_options"
            found = check_options(factory, options, path, reserved=("num_classes", "in_chans"))
            problems += found or check_model_pretrained(role, config, factory)
    if recipe.roi.provider not in regs.roi_providers:
        problems.append(f"roi.provider: {regs.roi_providers.unknown_message(recipe.roi.provider)}")
    else:
        provider = regs.roi_providers.get(recipe.roi.provider)
        roi_problems = check_options(provider, recipe.roi.options, "roi")
        problems += roi_problems or _construction_problems(provider, recipe.roi.options, "roi")
    for i, lc in enumerate(recipe.loss):
        if lc.name not in regs.losses:
            problems.append(f"loss[{i}].name: {regs.losses.unknown_message(lc.name)}")
        else:
            problems += check_options(regs.losses.get(lc.name), lc.options, f"loss[{i}]")
    if recipe.task.name:
        if recipe.task.name not in regs.tasks:
            problems.append(f"task.name: {regs.tasks.unknown_message(recipe.task.name)}")
        else:
            task = regs.tasks.get(recipe.task.name)
            if task.make_data is not None:
                problems += check_options(
                    task.make_data, recipe.task.options, "task", reserved=("out_dir",)
                )
            elif recipe.task.options:
                problems.append(f"task: task {task.name!r} takes no options")
    problems += logger_problems(recipe.experiment.loggers, regs.loggers)
    if not recipe.data.manifest and getattr(_task_of(recipe), "make_data", None) is None:
        problems.append(
            "data.manifest: no data: set data.manifest to a manifest.csv, or name a task with "
            "a built-in data source (task.name)"
        )
    return problems


def _construction_problems(factory: Any, options: dict[str, Any], path: str) -> list[str]:
    """Build a component with valid-typed ``options`` to surface what only its constructor
    checks (a missing file, an unknown model name): its ``KdError`` as a problem at ``path``."""
    try:
        factory(**options)
    except KdError as exc:
        return [f"{path}: {line}" for line in str(exc).splitlines() if line.strip()]
    return []


def _task_of(recipe: Recipe) -> Task | None:
    from kdtoolkit.plugins.manager import registries

    return registries().tasks.get(recipe.task.name, None) if recipe.task.name else None


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML recipe file with a one-line error on failure."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise KdError(f"{path}: recipe not found") from None
    except tomllib.TOMLDecodeError as e:
        raise KdError(f"{path}: not valid TOML: {e}") from None


def task_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe defaults of the task the raw recipe names (empty when none)."""
    from kdtoolkit.plugins.manager import registries

    task = raw.get("task", {})
    name = task.get("name") if isinstance(task, dict) else None
    regs = registries()
    if isinstance(name, str) and name in regs.tasks:
        return regs.tasks.get(name).defaults
    return {}


def with_default_losses(raw: dict[str, Any], overrides: Sequence[Any]) -> dict[str, Any]:
    """``raw`` with its task's default ``[[loss]]`` list written out when an override edits
    or appends a loss term and ``raw`` has none (the override then applies to those terms)."""
    parsed = [parse_override(o)[0] if isinstance(o, str) else list(o[0]) for o in overrides]
    if "loss" in raw or not any(path[0] == "loss" and len(path) > 1 for path in parsed):
        return raw
    losses = task_defaults(raw).get("loss")
    return {**raw, "loss": copy.deepcopy(losses)} if isinstance(losses, list) else raw


def load_recipe(
    source: str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    **values: Any,
) -> Recipe:
    """Read (a path) or take (a dict) a recipe, apply overrides and the named task's defaults,
    and validate it.

    ``overrides`` are ``--set`` strings (``"cv.folds=2"``, values read as TOML); ``values``
    are the same with Python values, by section (``teacher={"epochs": 2}``) or as a dotted
    key in a dict (``**{"cv.folds": 2}``). Relative data paths are taken relative to the
    recipe file's folder."""
    if isinstance(overrides, str):
        raise KdError(f"load_recipe: overrides must be a list of strings, not {overrides!r}")
    if isinstance(source, dict):
        raw, name, base = source, "<python>", Path.cwd()
    else:
        path = Path(source)
        if path.is_dir():
            raise KdError(f"{path}: is a folder; give the recipe's .toml file")
        raw, name, base = read_toml(path), str(path), path.resolve().parent
    changes = [*overrides, *flatten_values(values)]
    raw = apply_overrides(with_default_losses(raw, changes), changes)
    raw = deep_merge(task_defaults(raw), raw)
    recipe = validate(raw, name)
    if recipe.data.manifest and not Path(recipe.data.manifest).is_absolute():
        candidate = base / recipe.data.manifest
        if candidate.exists() or not Path(recipe.data.manifest).exists():
            recipe.data.manifest = str(candidate)
    return recipe
