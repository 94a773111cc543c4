"""The results schema: a held-out fold's results, a run's, and their files.

Rows are result settings (``teacher_crop``, ``baseline_full``, ``two_stage``, ``student``, and
``student_<name>`` for student variants); roles are the stages of a fold (``teacher``, ``roi``,
``student``, ``baseline_full``), each with its folder ``fold_<k>/<role>/``. Metric values are
fractions. Folds keep their real ids (``cv.only=[3]`` is fold 3 everywhere).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.fileio import atomic_write_text, read_json, reading
from kdtoolkit.report.calibration import pooled_calibration
from kdtoolkit.report.metrics import gap_closure, summarise
from kdtoolkit.report.stats import Statistics, compute

# -- rows and roles ----------------------------------------------------------------------------

TEACHER_CROP = "teacher_crop"
BASELINE_FULL = "baseline_full"
TWO_STAGE = "two_stage"
STUDENT = "student"
#: eval.json's student probabilities: the plain softmax (``kd predict --no-calibrated``) and
#: ``softmax(logits / T)`` with the fitted temperature (``kd predict``'s default).
RAW, CALIBRATED = "student_probabilities_raw", "student_probabilities_calibrated"
#: Canonical result rows, in report order.
ROWS = (TEACHER_CROP, BASELINE_FULL, TWO_STAGE, STUDENT)

TEACHER = "teacher"
ROI = "roi"
#: The classifier of an axis-aligned provider's two-stage row, trained on the axis-aligned
#: enclosures of the training ROIs (what such a provider's boxes cut).
TWO_STAGE_CLASSIFIER = "two_stage_classifier"
#: Stages of a fold (folder names); the student and the baseline share their row's name.
ROLES = (TEACHER, ROI, STUDENT, BASELINE_FULL)

#: Setting column of the results table for the canonical rows.
ROW_LABELS = {
    TEACHER_CROP: "crops (teacher, upper bound)",
    BASELINE_FULL: "full image, baseline",
    TWO_STAGE: "two-stage: ROI crop → classifier",
    STUDENT: "full image, student (KD)",
}

Metrics = dict[str, dict[str, float]]
Summary = Mapping[str, Mapping[str, Mapping[str, float]]]


def ordered_rows(rows: Iterable[str]) -> list[str]:
    """Canonical rows first (teacher_crop, baseline_full, two_stage, student), then the rest
    in their given order."""
    names = list(rows)
    return [r for r in ROWS if r in names] + [r for r in names if r not in ROWS]


def row_label(row: str) -> str:
    """The table's setting text for ``row`` (``student_x`` → ``full image, student (x)``)."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    if row.startswith("student_"):
        return f"full image, student ({row.removeprefix('student_')})"
    return row


def variant_row(name: str) -> str:
    """The row (and stage role) of student variant ``name``: ``student_<name>``."""
    return f"{STUDENT}_{name}"


def jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, list | tuple | set):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return jsonable(obj.tolist())
    return str(obj)


# -- one fold ----------------------------------------------------------------------------------


@dataclass
class FoldResult:
    """Every row's held-out results on fold ``fold`` (``fold_<k>/eval.json``).

    ``metrics``: ``{row: {metric: value}}``; ``confusion``: ``{row: K×K counts}``;
    ``predictions``: ``index``, ``label``, ``group`` (each sample's group, None: none) and per
    row the predicted classes (plus the student's held-out probabilities, ``RAW`` the plain
    softmax and ``CALIBRATED`` ``softmax(z / T)``, and ``logits`` and ``temperature``:
    ``{row: N×K held-out logits}`` and ``{row: T fitted on validation}``, and ``pointing``:
    ``{row: 0/1 per sample}`` when measured); ``latency_ms``: ``{pipeline: ms per image}``;
    ``roi``: the ROI provider's metrics on this fold.
    """

    fold: int
    n_test: int
    metrics: Metrics
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    predictions: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    roi: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fold": self.fold,
            "n_test": self.n_test,
            "metrics": self.metrics,
            "confusion": self.confusion,
            "predictions": self.predictions,
            "latency_ms": self.latency_ms,
            "roi": self.roi,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldResult:
        return cls(
            fold=int(data["fold"]),
            n_test=int(data.get("n_test", 0)),
            metrics=dict(data["metrics"]),
            confusion=dict(data.get("confusion") or {}),
            predictions=dict(data.get("predictions") or {}),
            latency_ms=dict(data.get("latency_ms") or {}),
            roi=dict(data.get("roi") or {}),
        )

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(jsonable(self.to_dict()), indent=1))

    @classmethod
    def read(cls, path: Path) -> FoldResult:
        fix = "delete it and rerun kd run to evaluate that fold again"
        doc = read_json(path, "fold evaluation", fix)
        with reading(path, "fold evaluation", fix):
            return cls.from_dict(doc)


# -- a run -------------------------------------------------------------------------------------


@dataclass
class RunResults:
    """The folds of a run (sorted by fold id) and what the report says about them.

    ``models``: ``{row: model name}``; ``recipe_digest``: the recipe the folds were run with.
    """

    folds: list[FoldResult]
    classes: list[str]
    models: dict[str, str] = field(default_factory=dict)
    recipe_digest: str = ""
    saved_statistics: Statistics | None = field(default=None, repr=False)
    saved_calibration: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.folds = sorted(self.folds, key=lambda f: f.fold)
        self._statistics: tuple[Statistics | None] | None = None

    @property
    def ordinal(self) -> bool:
        """Whether the task is ordinal (its folds report QWK)."""
        return any("qwk" in m for f in self.folds for m in f.metrics.values())

    def statistics(self) -> Statistics | None:
        """The bootstrap statistics of the folds' pooled predictions (``report.stats``;
        computed once), or the ones a results.json kept, or None."""
        if self._statistics is None:
            found = compute(
                [f.predictions for f in self.folds],
                len(self.classes),
                self.ordinal,
                folds=self.fold_ids,
            )
            self._statistics = (found or self.saved_statistics,)
        return self._statistics[0]

    def calibration(self) -> dict[str, dict[str, Any]]:
        """Per row, ECE before/after temperature scaling over the folds' pooled held-out
        logits and each fold's temperature (``calibration.pooled_calibration``), or what a
        results.json kept."""
        return pooled_calibration([f.predictions for f in self.folds]) or self.saved_calibration

    @property
    def fold_ids(self) -> list[int]:
        return [f.fold for f in self.folds]

    @property
    def rows(self) -> list[str]:
        """Every row of any fold, canonical ones first."""
        return ordered_rows(dict.fromkeys(r for f in self.folds for r in f.metrics))

    @property
    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{row: {metric: {"mean", "std"}}}`` over the folds (``metrics.summarise``)."""
        return summarise([f.metrics for f in self.folds])

    def gap_closure(self, student: str = STUDENT) -> float | None:
        """``(student − baseline) / (teacher − baseline)`` in mean accuracy, or None."""
        return gap_closure(self.summary, student=student)

    @property
    def latency_ms(self) -> dict[str, float]:
        """Mean per-image time of each pipeline over the folds that measured it."""
        keys = sorted({key for f in self.folds for key in f.latency_ms})
        return {
            key: float(np.mean([f.latency_ms[key] for f in self.folds if key in f.latency_ms]))
            for key in keys
        }

    @property
    def dead_cam(self) -> dict[str, float]:
        """``{row: share of dead held-out CAMs}`` over the folds that measured it, each fold
        weighted by its held-out count (``metrics.is_dead``)."""
        out = {}
        for row in self.rows:
            pairs = [
                (max(f.n_test, 1), f.metrics[row]["dead_cam"])
                for f in self.folds
                if "dead_cam" in f.metrics.get(row, {})
            ]
            if pairs:
                out[row] = sum(n * v for n, v in pairs) / sum(n for n, _ in pairs)
        return out

    @property
    def roi(self) -> dict[str, dict[str, Any]]:
        """``{fold id: ROI provider metrics}``."""
        return {str(f.fold): f.roi for f in self.folds}

    def matrices(self) -> dict[str, np.ndarray]:
        """Confusion matrices summed over the folds, per canonical row that has them."""
        summary = self.summary
        return {
            row: np.sum([np.array(f.confusion[row]) for f in self.folds if row in f.confusion], 0)
            for row in ROWS
            if row in summary and any(row in f.confusion for f in self.folds)
        }

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` document: ``summary``, ``folds`` (one ``{row: {metric: x}}`` per
        fold, in the order of ``folds_run``), ``gap_closure``, ``classes``, ``folds_run``,
        ``roi``, ``latency_ms``, ``dead_cam`` (per row: the share of dead held-out CAMs),
        ``recipe_digest``, ``models``, ``calibration`` (per row: pooled
        ``ece`` and ``ece_calibrated``, ``n``, the folds' ``temperatures``; per fold they are
        in ``folds``) and, with the folds'
        predictions, the statistics (``Statistics.to_json``: ``bootstrap``, ``pooled``,
        ``comparisons``, ``gap_closure_pooled``, ``gap_closure_ci95``, ``gap_closures``)."""
        stats = self.statistics()
        return jsonable(
            {
                "summary": self.summary,
                "folds": [f.metrics for f in self.folds],
                "gap_closure": self.gap_closure(),
                "classes": list(self.classes),
                "folds_run": self.fold_ids,
                "roi": self.roi,
                "latency_ms": self.latency_ms,
                "dead_cam": self.dead_cam,
                "recipe_digest": self.recipe_digest,
                "models": self.models,
                "calibration": self.calibration(),
                **(stats.to_json() if stats is not None else {}),
            }
        )

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunResults:
        """Read a ``results.json`` document (per-fold confusion and predictions stay in the
        folds' ``eval.json``)."""
        metrics = list(doc.get("folds") or [])
        ids = list(doc.get("folds_run") or range(len(metrics)))
        roi = doc.get("roi") or {}
        folds = [
            FoldResult(
                fold=int(k),
                n_test=0,
                metrics=dict(m),
                roi=dict(roi.get(str(k)) or {}) if isinstance(roi, Mapping) else {},
            )
            for k, m in zip(ids, metrics, strict=True)
        ]
        latency = doc.get("latency_ms") or {}
        for f in folds:  # the mean is all results.json keeps
            f.latency_ms = {k: float(v) for k, v in latency.items() if v is not None}
        return cls(
            folds=folds,
            classes=list(doc.get("classes") or []),
            models=dict(doc.get("models") or {}),
            recipe_digest=str(doc.get("recipe_digest") or ""),
            saved_statistics=Statistics.from_json(doc),
            saved_calibration=dict(doc.get("calibration") or {}),
        )


def write_results(run_dir: str | os.PathLike[str], results: RunResults) -> Path:
    """Write ``results.json`` (``RunResults.to_json``) and ``results.csv`` into ``run_dir``;
    return the JSON path.

    CSV: columns ``fold,row,<metrics…>``, one line per fold × row (fold = the fold's id), then a
    ``mean`` and a ``std`` line per row; a metric a row lacks is left empty.
    """
    run = Path(run_dir)
    doc = results.to_json()
    json_path = atomic_write_text(
        run / "results.json", json.dumps(doc, indent=2, allow_nan=False) + "\n"
    )
    summary = results.summary
    rows = ordered_rows(dict.fromkeys([r for f in results.folds for r in f.metrics] + [*summary]))
    metrics: list[str] = []
    for source in [*(f.metrics for f in results.folds), summary]:
        for per_row in source.values():
            metrics += [m for m in per_row if m not in metrics]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        value = float(value)
        return repr(value) if math.isfinite(value) else ""

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "row", *metrics])
    for fold in results.folds:
        for row in rows:
            if row in fold.metrics:
                values = fold.metrics[row]
                writer.writerow([fold.fold, row, *(cell(values.get(m)) for m in metrics)])
    for stat in ("mean", "std"):
        for row in rows:
            if row in summary:
                values = summary[row]
                writer.writerow(
                    [stat, row, *(cell(values[m][stat] if m in values else None) for m in metrics)]
                )
    atomic_write_text(run / "results.csv", buf.getvalue())
    return json_path


def read_results(run_dir: str | os.PathLike[str]) -> RunResults:
    """The results of a finished run folder (its ``results.json``)."""
    path = Path(run_dir) / "results.json"
    fix = "rebuild it with kd report"
    doc = read_json(path, "results", fix)
    with reading(path, "results", fix):
        return RunResults.from_json(doc)
