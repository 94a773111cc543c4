"""A run folder's outputs (results.json/csv, figures/, report.md), written from its finished
folds: at the end of ``kd run``, and again by ``kd report RUN_DIR`` from whatever folds are
finished in a folder (folds made on other machines join by copying their fold folders in)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.engine.context import RunPaths
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import read_json, reading
from kdtoolkit.report import figures
from kdtoolkit.report.calibration import pooled_reliability
from kdtoolkit.report.markdown import write_report
from kdtoolkit.report.results import (
    BASELINE_FULL,
    ROLES,
    STUDENT,
    TEACHER,
    TEACHER_CROP,
    TWO_STAGE,
    TWO_STAGE_CLASSIFIER,
    FoldResult,
    RunResults,
    write_results,
)

#: The two-stage row's own classifier, by the crops it trained on (``TrainSpec.crops``).
CLASSIFIER_CROPS = {"enclosure": "axis-aligned enclosure crops", "expert": "expert crops"}


def row_models(
    teacher: str,
    student: str,
    provider: str,
    two_stage: str | None = None,
    jitter: bool = False,
) -> dict[str, str]:
    """``{row: model name}`` of a run's report. The teacher trains on exact expert crops; the
    two-stage row says which classifier it used: the teacher, or (``two_stage``: "enclosure"
    or "expert", ``kdtoolkit.engine.plan.two_stage_crops``) the two-stage classifier trained
    on those crops, ``jitter``: moved by the crop-box jitter."""
    if two_stage is None:
        classifier = "teacher on expert crops"
    else:
        jittered = "jittered " if jitter else ""
        classifier = f"two-stage classifier on {jittered}{CLASSIFIER_CROPS[two_stage]}"
    return {
        TEACHER_CROP: f"{teacher} on exact expert crops",
        TWO_STAGE: f"{provider} → {classifier} ({teacher})",
        BASELINE_FULL: student,
        STUDENT: student,
    }


#: The fix for a damaged file of a trained stage.
RETRAIN = "delete its stage folder and rerun kd run to retrain it"


def classifier_of(run_dir: Path, folds: Iterable[int]) -> tuple[str | None, bool]:
    """``(crops, jitter)`` of the two-stage classifier of a run folder's ``folds`` (its
    ``model.json``; a folder made before it recorded them: axis-aligned enclosures, no
    jitter), or ``(None, False)`` when the two-stage row used the teacher."""
    for k in folds:
        meta = run_dir / f"fold_{k}" / TWO_STAGE_CLASSIFIER / "model.json"
        if meta.parent.is_dir():
            doc = read_json(meta, "model metadata", RETRAIN) if meta.exists() else {}
            return str(doc.get("crops", "enclosure")), bool(doc.get("crop_jitter", False))
    return None, False


def history_of(paths: RunPaths, k: int) -> dict[str, list[dict]]:
    """The training history of fold ``k``'s stages that have one."""
    out = {}
    for role in (TEACHER, BASELINE_FULL, STUDENT):
        meta = paths.stage(k, role) / "model.json"
        if meta.exists():
            doc = read_json(meta, "model metadata", RETRAIN)
            with reading(meta, "model metadata", RETRAIN):
                out[role] = [dict(record) for record in doc.get("history") or []]
    return out


def write_figures(paths: RunPaths, results: RunResults, backbone: str) -> dict[str, str]:
    """The run's figures into ``figures/`` (``backbone``: the model named in the results
    table); ``{title: path relative to the run folder}``."""
    out = paths.figures
    out.mkdir(exist_ok=True)
    made: dict[str, str] = {}
    classes = list(results.classes)
    figures.plot_confusions(out / "confusion.png", results.matrices(), classes)
    made["confusion matrices"] = "figures/confusion.png"
    figures.plot_results_table(out / "results_table.png", results.summary, backbone)
    made["results table"] = "figures/results_table.png"
    curves = {
        row: curve
        for row in results.calibration()
        if (curve := pooled_reliability([f.predictions for f in results.folds], row))
    }
    if curves:
        figures.plot_reliability(out / "reliability.png", curves)
        made["reliability diagrams (pooled folds)"] = "figures/reliability.png"
    first = results.fold_ids[0]
    figures.plot_curves(out / "curves.png", history_of(paths, first))
    made[f"training curves (fold {first})"] = "figures/curves.png"
    cams_path = paths.cams(first)
    if cams_path.exists():
        data = np.load(cams_path)
        if BASELINE_FULL in data and STUDENT in data:
            figures.plot_cam_pairs(
                out / "gradcam.png",
                [np.transpose(im, (1, 2, 0)) for im in data["images"]],
                list(data[BASELINE_FULL]),
                list(data[STUDENT]),
                list(data["boxes"]),
                [classes[int(y)] for y in data["labels"]],
            )
            made[f"Grad-CAM, baseline vs student (fold {first})"] = "figures/gradcam.png"
    return made


def write_outputs(
    paths: RunPaths, results: RunResults, backbone: str, log: Callable[[str], None]
) -> Path:
    """Figures, results.json/csv and report.md of ``results``; returns the report's path."""
    made = write_figures(paths, results, backbone)
    write_results(paths.root, results)
    path = write_report(paths.root, results, made)
    gap = results.gap_closure()
    log("gap closure: " + ("n/a" if gap is None else f"{100 * gap:.1f}%") + f"; report {path}")
    return path


def finished_folds(paths: RunPaths, folds: int) -> dict[int, FoldResult]:
    """``{k: result}`` of the folds ``0..folds-1`` that have their ``fold_<k>/eval.json``."""
    done = [k for k in range(folds) if paths.evaluation(k).exists()]
    return {k: FoldResult.read(paths.evaluation(k)) for k in done}


@dataclass
class Rebuilt:
    """What ``rebuild_report`` wrote: the results, the report's path, the folds it lacks and
    the folds it left out (made by another recipe), each with a reason."""

    results: RunResults
    report: Path
    missing: list[int]
    left_out: dict[int, str]

    def missing_line(self) -> str:
        """One line naming the folds the report lacks ('' when none)."""
        parts = []
        if self.missing:
            names = ", ".join(str(k) for k in self.missing)
            parts.append(f"fold{'s' if len(self.missing) > 1 else ''} {names} not finished")
        parts += [f"fold {k} left out ({why})" for k, why in self.left_out.items()]
        if not parts:
            return ""
        done = ", ".join(str(k) for k in self.results.fold_ids)
        return f"missing: {'; '.join(parts)}; the report covers fold(s) {done}"


def saved_recipe(run_dir: Path) -> dict[str, Any]:
    """The ``recipe.resolved.json`` document of a run folder (``digest`` and ``recipe``)."""
    path = run_dir / "recipe.resolved.json"
    if not run_dir.is_dir():
        raise KdError(f"{run_dir}: no such folder; give a run folder (experiment.output)")
    if not path.exists():
        raise KdError(
            f"{run_dir}: not a run folder (no recipe.resolved.json); give the folder kd run "
            "wrote (experiment.output)"
        )
    fix = "rerun kd run with its recipe to rewrite it"
    doc = read_json(path, "resolved recipe", fix)
    with reading(path, "resolved recipe", fix):
        saved_fold_count(doc["recipe"])
        str(doc["recipe"]["teacher"]["backbone"]), str(doc["recipe"]["student"]["backbone"])
    return doc


def saved_fold_count(recipe: Mapping[str, Any]) -> int:
    """The folds of a resolved recipe's every repeat (``context.fold_count`` of its data)."""
    return int(recipe["cv"]["folds"]) * int(recipe["cv"].get("repeats", 1))


def stage_meta(paths: RunPaths, k: int) -> dict[str, Any]:
    """The metadata (``model.json``: classes, recipe digest, history) of fold ``k``'s first
    stage that has one, or {}."""
    for role in ROLES:
        meta = paths.stage(k, role) / "model.json"
        if meta.exists():
            return read_json(meta, "model metadata", RETRAIN)
    return {}


def rebuild_report(run_dir: Path, log: Callable[[str], None] = lambda line: None) -> Rebuilt:
    """Rewrite results.json/csv, figures/ and report.md of ``run_dir`` from every fold that has
    its ``eval.json`` (folds whose models another recipe made are left out); a ``KdError``
    when there is none. The recipe is read from the folder, not validated again: no data,
    plugin or device is needed."""
    run_dir = Path(run_dir)
    saved_recipe(run_dir)  # a run folder, before it is locked
    with RunLock(run_dir):  # not while a run writes there
        return rebuild_locked(run_dir, log)


def rebuild_locked(run_dir: Path, log: Callable[[str], None]) -> Rebuilt:
    """``rebuild_report`` in the locked run folder."""
    doc = saved_recipe(run_dir)
    recipe: Mapping[str, Any] = doc["recipe"]
    paths = RunPaths(run_dir)
    n_folds = saved_fold_count(recipe)
    found = finished_folds(paths, n_folds)
    left_out: dict[int, str] = {}
    classes: list[str] = []
    for k in list(found):
        meta = stage_meta(paths, k)
        digest = meta.get("recipe_digest")
        if digest and digest != doc.get("digest"):
            left_out[k] = f"its models were made by another recipe ({digest})"
            del found[k]
        elif meta.get("classes") and not classes:
            classes = list(meta["classes"])
    classes = classes or list(recipe.get("data", {}).get("classes") or [])
    if not found:
        raise KdError(
            f"{run_dir}: no finished fold (no fold_<k>/eval.json for k in 0..{n_folds - 1}); "
            "run kd run with this recipe, or copy finished fold folders into it"
        )
    if not classes:
        raise KdError(
            f"{run_dir}: the class names are unknown (no data.classes, no fold_<k>/<stage>/"
            "model.json); copy a fold folder with its model.json files"
        )
    teacher, student = recipe["teacher"]["backbone"], recipe["student"]["backbone"]
    results = RunResults(
        folds=list(found.values()),
        classes=classes,
        models=row_models(
            teacher,
            student,
            recipe.get("roi", {}).get("provider", ""),
            *classifier_of(run_dir, found),
        ),
        recipe_digest=str(doc.get("digest", "")),
    )
    report = write_outputs(paths, results, student, log)
    missing = [k for k in range(n_folds) if k not in found and k not in left_out]
    return Rebuilt(results, report, missing, left_out)
