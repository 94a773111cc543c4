"""Student variants against one crop teacher and one full-image baseline (``kd compare``).

A variant is ``NAME:OVERRIDES``: a lower snake_case name, then ``--set``-style ``key=value``
overrides separated by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the
value); ``NAME:`` (or ``NAME``) is the recipe as it is. ``loss.N.key=value`` with N equal to the
number of loss terms appends a term. A variant may change only ``loss`` and ``student.*``, its
backbone included: folds, teacher, ROI provider and baseline (the recipe's own student
architecture, cross-entropy) are shared, trained once per fold; each variant trains its own
student (stage ``student_<name>``) from the plain student's seed, so a variant of the
baseline's architecture starts from the baseline's initial weights (``experiment.paired``).
It is the run's fold plan with one student stage per variant (``compare_plan``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kdtoolkit.config.override import parse_override
from kdtoolkit.config.recipe import Recipe, load_recipe
from kdtoolkit.config.sections import VARIANT_NAME
from kdtoolkit.config.variants import check_shared, load_variant_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.folder import check_run_folder, stamped
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.engine.loggers import run_loggers
from kdtoolkit.engine.plan import compare_plan
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.run import interrupted, run_folds
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import read_json
from kdtoolkit.report.comparison import Comparison, VariantInfo, write_comparison
from kdtoolkit.report.results import (
    BASELINE_FULL,
    TEACHER_CROP,
    FoldResult,
    RunResults,
    variant_row,
)


@dataclass
class Variant:
    """A named list of recipe overrides."""

    name: str
    overrides: list[str]

    @property
    def role(self) -> str:
        return variant_row(self.name)


def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[2,3],c={x=1,y=2}`` at the commas outside brackets, braces and quotes."""
    parts, current, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_variant(text: str) -> Variant:
    """``'NAME:k=v,k=v'`` (or ``'NAME'``) → ``Variant``."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not VARIANT_NAME.fullmatch(name):
        raise KdError(
            f"--variant {text!r}: the name must be lower snake_case (a-z, 0-9, _), "
            "e.g. --variant 'roi_feature:loss.3.name=roi_feature'"
        )
    if name in (TEACHER_CROP, BASELINE_FULL):
        raise KdError(f"--variant {text!r}: {name!r} is the name of a reference row")
    overrides = split_overrides(rest)
    for item in overrides:
        parse_override(item)  # a malformed one fails here, naming itself
    return Variant(name, overrides)


def variants_of(path: Path, texts: list[str], overrides: list[str]) -> list[Variant]:
    """The variants of ``--variant`` texts; without any, the recipe's ``[compare]`` variants
    (after ``overrides``), else the recipe as it is (``recipe``)."""
    if texts:
        return [parse_variant(text) for text in texts]
    listed = load_recipe(path, overrides).compare.variants
    return [Variant(name, list(o)) for name, o in listed.items()] or [Variant("recipe", [])]


def check_cached_student(out: Path, fold: int, variant: Variant, recipe: Recipe) -> None:
    """Refuse a cached variant student trained for another definition of the variant."""
    meta_path = out / f"fold_{fold}" / variant.role / "model.json"
    if meta_path.exists():
        fix = "delete that folder or pass --force to retrain it"
        saved = read_json(meta_path, "model metadata", fix).get("recipe_digest")
        if saved != recipe.digest():
            raise KdError(
                f"{meta_path.parent}: trained for another definition of variant "
                f"{variant.name!r}; rename the variant, choose another --output, or --force"
            )


def compare_folds(
    base: Recipe,
    variants: list[Variant],
    recipes: list[Recipe],
    force: bool,
    quiet: bool,
    lock: RunLock,
) -> tuple[dict[int, FoldResult], list[str]]:
    """The body of ``compare`` in its locked output folder: every fold's results and the
    class names."""
    out = base.output_dir
    check_run_folder(base, force)  # again, now that no other run can stamp it
    names = [v.name for v in variants]
    with RunProgress(out / "gap_closure.log", quiet=quiet, held=True) as progress:
        if lock.recovered:
            progress.log(lock.recovered)
        progress.log(f"gap closure of {names} ({base.source}) -> {out}")
        ctx = RunContext.open(base, progress, force)
        folds = ctx.folds_to_run()
        if not force:
            for k in folds:
                for v, recipe in zip(variants, recipes, strict=True):
                    check_cached_student(out, k, v, recipe)
        plan = compare_plan(base, [(v.name, r) for v, r in zip(variants, recipes, strict=True)])

        def report_fold(result: FoldResult) -> None:
            accuracy = ", ".join(f"{row} {m['accuracy']:.3f}" for row, m in result.metrics.items())
            progress.log(f"fold {result.fold} accuracy: {accuracy}")

        # checks every cached output, then stamps the folder; loggers get every stage's epochs
        with stamped(ctx, plan, folds), run_loggers(ctx):
            return run_folds(ctx, plan, folds, on_fold=report_fold), list(ctx.classes)


def compare(
    recipe_path: Path,
    variants: list[Variant],
    sets: list[str],
    output: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> Comparison:
    """Train (or reuse) teacher, ROI provider, baseline and one student per variant on every
    fold, evaluate them on the held-out folds and write ``gap_closure.json``/``.md`` into the
    output folder (default: the run folder + ``-gap_closure``)."""
    if not variants:
        raise KdError("no --variant given, e.g. --variant 'paper:'")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise KdError(f"--variant: names must be unique, got {names}")
    forced = ["evaluate.cam_examples=0"]  # no per-fold CAM files: the variants would overwrite
    if output is None:
        output = Path(f"{load_variant_recipe(recipe_path, sets + forced).output_dir}-gap_closure")
    forced.append(f"experiment.output={json.dumps(str(output))}")
    base = load_variant_recipe(recipe_path, sets + forced)
    recipes = [
        load_variant_recipe(recipe_path, sets + v.overrides + forced, v.name) for v in variants
    ]
    for v, recipe in zip(variants, recipes, strict=True):
        check_shared(base, v.name, recipe)

    check_run_folder(base, force)
    try:
        with RunLock(output) as lock:
            per_fold, classes = compare_folds(base, variants, recipes, force, quiet, lock)
    except KeyboardInterrupt:
        raise interrupted(output) from None
    comparison = Comparison(
        recipe=str(recipe_path),
        recipe_digest=base.digest(),
        output=output,
        results=RunResults(folds=list(per_fold.values()), classes=classes),
        variants=[
            VariantInfo(
                name=v.name,
                overrides=v.overrides,
                recipe_digest=recipe.digest(),
                loss=recipe.to_dict()["loss"],
                student=recipe.to_dict()["student"],
            )
            for v, recipe in zip(variants, recipes, strict=True)
        ],
        teacher_model=base.teacher.backbone,
        student_model=base.student.backbone,
    )
    write_comparison(comparison)
    return comparison
