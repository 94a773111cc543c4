"""Statistics of a run from its pooled out-of-fold predictions.

Every finished fold's held-out predictions are pooled (with repeated cross-validation, a sample
has one prediction per repeat). From them: each row's accuracy, macro F1, QWK (ordinal tasks)
and pointing game with a percentile bootstrap confidence interval; paired comparisons of rows
(the difference a − b with its interval, the discordant counts and an exact McNemar test); and
the gap closure with its interval.

The bootstrap resamples units with replacement: groups (patients) when the samples have groups,
else samples; a unit carries all its predictions. One matrix of resampled units serves every
row, pair and the gap closure, so paired quantities are computed on the same resamples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import binomtest

from kdtoolkit.errors import KdError
from kdtoolkit.report.metrics import classification_metrics

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
#: The gap closure's interval is null when more than this share of the resamples has no gap
#: (teacher accuracy ≤ baseline accuracy): the gap itself is then not clearly positive.
MAX_UNDEFINED = (1 - LEVEL) / 2
#: Keys of ``FoldResult.predictions`` that are not a row's predicted classes.
NOT_ROWS = (
    "index",
    "label",
    "group",
    "pointing",
    "student_probabilities",  # eval.json before the raw and calibrated keys
    "student_probabilities_raw",
    "student_probabilities_calibrated",
)
TEST = "mcnemar-exact"


# -- pooling -----------------------------------------------------------------------------------


@dataclass
class Pooled:
    """Out-of-fold predictions, one entry per (fold, held-out sample).

    ``units``: each entry's resampling unit (0..n_units-1); ``outcomes``: ``{metric: {row: 1.0
    right / 0.0 wrong, NaN where the row has no prediction}}`` for ``accuracy`` and (when the
    folds have it) ``pointing_game``; ``predicted``: ``{row: class, -1 where absent}``.
    """

    labels: np.ndarray
    units: np.ndarray
    n_units: int
    unit: str
    predicted: dict[str, np.ndarray]
    outcomes: dict[str, dict[str, np.ndarray]]


def _column(values: Any, n: int | None, key: str, fold: Any) -> list:
    """``values`` as a list of ``n`` entries (None: any number), or a KdError naming them."""
    if not isinstance(values, list | tuple) or (n is not None and len(values) != n):
        size = len(values) if isinstance(values, list | tuple) else type(values).__name__
        wanted = "" if n is None else f" for {n}"
        raise KdError(f"fold {fold} eval.json: predictions.{key} has {size} entries{wanted}")
    return list(values)


def pool(predictions: Sequence[Mapping[str, Any]], folds: Sequence[Any] = ()) -> Pooled | None:
    """Pool the folds' ``predictions`` (``FoldResult.predictions``; ``folds``: their ids, for
    messages). None when no fold has ``index`` and ``label`` (results read from results.json)."""
    ids = list(folds) or list(range(len(predictions)))
    usable = [(p, k) for p, k in zip(predictions, ids, strict=True) if p]
    usable = [(p, k) for p, k in usable if "index" in p and "label" in p]
    if not usable:
        return None
    keys: list[tuple] = []
    labels: list[int] = []
    rows: dict[str, list[tuple[int, int]]] = {}
    hits: dict[str, list[tuple[int, float]]] = {}
    for p, k in usable:
        index = _column(p["index"], None, "index", k)
        n, start = len(index), len(labels)
        labels += [int(y) for y in _column(p["label"], n, "label", k)]
        groups = _column(p.get("group") or [None] * n, n, "group", k)
        keys += [
            ("s", i) if g in (None, "") else ("g", g) for i, g in zip(index, groups, strict=True)
        ]
        for row, values in p.items():
            if row in NOT_ROWS or not isinstance(values, list) or len(values) != n:
                continue
            if values and not isinstance(values[0], int | float):
                continue
            rows.setdefault(row, []).extend((start + j, int(v)) for j, v in enumerate(values))
        pointing = p.get("pointing") or {}
        if not isinstance(pointing, Mapping):
            raise KdError(f"fold {k} eval.json: predictions.pointing must map rows to 0/1 lists")
        for row, values in pointing.items():
            values = _column(values, n, f"pointing.{row}", k)
            hits.setdefault(row, []).extend((start + j, float(v)) for j, v in enumerate(values))
    m = len(labels)
    lookup: dict[tuple, int] = {}
    units = np.array([lookup.setdefault(key, len(lookup)) for key in keys], dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)
    predicted, correct, pointing_game = {}, {}, {}
    for row, pairs in rows.items():
        where, values = np.array([j for j, _ in pairs]), np.array([v for _, v in pairs])
        predicted[row] = np.full(m, -1, dtype=np.int64)
        predicted[row][where] = values
        correct[row] = np.full(m, np.nan)
        correct[row][where] = (values == y[where]).astype(float)
    for row, pairs in hits.items():
        pointing_game[row] = np.full(m, np.nan)
        pointing_game[row][[j for j, _ in pairs]] = [v for _, v in pairs]
    outcomes = {"accuracy": correct}
    if pointing_game:
        outcomes["pointing_game"] = pointing_game
    unit = "group" if any(key[0] == "g" for key in keys) else "sample"
    return Pooled(y, units, len(lookup), unit, predicted, outcomes)


# -- the bootstrap -----------------------------------------------------------------------------


def resample_units(n_units: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``resamples × n_units`` unit indices drawn with replacement (row b: resample b)."""
    return np.random.default_rng(seed).integers(0, n_units, size=(resamples, n_units))


def unit_counts(draws: np.ndarray, n_units: int) -> np.ndarray:
    """How often each unit is drawn in each resample (``resamples × n_units``)."""
    b = draws.shape[0]
    flat = (draws + n_units * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(np.float64)


def interval(values: np.ndarray) -> list[float] | None:
    """The percentile interval (``LEVEL``) of the finite ``values``; None when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def _per_unit(pooled: Pooled, values: np.ndarray) -> np.ndarray:
    return np.bincount(pooled.units, weights=values, minlength=pooled.n_units)


def _ratio(weights: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ num) / (weights @ den)


def macro_f1_of(conf: np.ndarray) -> np.ndarray:
    """Macro F1 of ``… × K × K`` confusion counts (rows true), as ``classification_metrics``."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1)
    den = conf.sum(-1) + conf.sum(-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(den > 0, 2 * tp / den, 0.0)
    return f1.mean(-1)


def qwk_of(conf: np.ndarray) -> np.ndarray:
    """Quadratic-weighted kappa of ``… × K × K`` confusion counts, as ``classification_metrics``
    (1.0 when every label and prediction is one class)."""
    k = conf.shape[-1]
    w = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2.0
    total = conf.sum((-2, -1))[..., None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = conf.sum(-1)[..., :, None] * conf.sum(-2)[..., None, :] / total
        observed, chance = (w * conf).sum((-2, -1)), (w * expected).sum((-2, -1))
        return np.where(chance > 0, 1 - observed / chance, np.where(observed == 0, 1.0, np.nan))


# -- the statistics ----------------------------------------------------------------------------


@dataclass
class Statistics:
    """What ``results.json`` keeps: ``bootstrap`` (resamples, seed, unit, ci, n_units),
    ``pooled`` (``{row: {"n", "accuracy", "ci95", "macro_f1", "macro_f1_ci95", …}}``),
    ``comparisons`` (one dict per pair and metric) and ``gap_closure`` (``{student row:
    {"value", "ci95", "undefined"}}``)."""

    bootstrap: dict[str, Any]
    pooled: dict[str, dict[str, Any]]
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    gap_closure: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        student = self.gap_closure.get("student", {})
        return {
            "bootstrap": self.bootstrap,
            "pooled": self.pooled,
            "comparisons": self.comparisons,
            "gap_closure_pooled": student.get("value"),
            "gap_closure_ci95": student.get("ci95"),
            "gap_closures": self.gap_closure,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Statistics | None:
        """The statistics a ``results.json`` document holds, or None (an older file)."""
        if not isinstance(doc.get("pooled"), Mapping) or "bootstrap" not in doc:
            return None
        return cls(
            bootstrap=dict(doc["bootstrap"]),
            pooled={r: dict(v) for r, v in doc["pooled"].items()},
            comparisons=[dict(c) for c in doc.get("comparisons") or []],
            gap_closure={r: dict(v) for r, v in (doc.get("gap_closures") or {}).items()},
        )


def comparison_pairs(
    rows: Sequence[str],
    student: str = "student",
    baseline: str = "baseline_full",
    two_stage: str = "two_stage",
) -> list[tuple[str, str]]:
    """The pairs ``(a, b)`` of ``rows`` to compare: student vs baseline, student vs two-stage,
    two-stage vs baseline, each ``student_<name>`` vs baseline and vs the reference student:
    ``student`` when present, else the first variant (``kd compare``'s first, e.g. the paper's
    loss)."""
    wanted = [(student, baseline), (student, two_stage), (two_stage, baseline)]
    variants = [row for row in rows if row.startswith(f"{student}_")]
    reference = student if student in rows else next(iter(variants), None)
    for row in variants:
        wanted += [(row, baseline)] + ([(row, reference)] if row != reference else [])
    return [(a, b) for a, b in wanted if a in rows and b in rows]


def mcnemar_p(a_right_b_wrong: int, b_right_a_wrong: int) -> float:
    """Two-sided exact McNemar p: the binomial test of the discordant counts (1.0 for none)."""
    n = a_right_b_wrong + b_right_a_wrong
    if n == 0:
        return 1.0
    return float(binomtest(min(a_right_b_wrong, b_right_a_wrong), n=n, p=0.5).pvalue)


def verdict(ci: Sequence[float] | None) -> str:
    """``better`` when the interval of a − b lies above 0, ``worse`` below, else ``not
    distinguishable`` (also without an interval)."""
    if ci is None:
        return "not distinguishable"
    if ci[0] > 0:
        return "better"
    if ci[1] < 0:
        return "worse"
    return "not distinguishable"


def paired(
    pooled: Pooled, weights: np.ndarray, a: str, b: str, metric: str
) -> dict[str, Any] | None:
    """The paired comparison of rows ``a`` and ``b`` in ``metric`` over the entries both have."""
    oa, ob = pooled.outcomes[metric].get(a), pooled.outcomes[metric].get(b)
    if oa is None or ob is None:
        return None
    both = np.isfinite(oa) & np.isfinite(ob)
    if not both.any():
        return None
    xa, xb = np.where(both, oa, 0.0), np.where(both, ob, 0.0)
    diffs = _ratio(weights, _per_unit(pooled, xa - xb), _per_unit(pooled, both.astype(float)))
    a_only = int(np.sum(both & (xa > 0.5) & (xb < 0.5)))
    b_only = int(np.sum(both & (xb > 0.5) & (xa < 0.5)))
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "diff": float((xa - xb).sum() / both.sum()),
        "ci95": interval(diffs),
        "discordant": [a_only, b_only],
        "p": mcnemar_p(a_only, b_only),
        "test": TEST,
        "n": int(both.sum()),
    }


def row_statistics(
    pooled: Pooled, weights: np.ndarray, row: str, num_classes: int, ordinal: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """Row ``row``'s pooled metrics with their intervals, and its resampled accuracies."""
    present = pooled.predicted[row] >= 0
    y, p = pooled.labels[present], pooled.predicted[row][present]
    point = classification_metrics(y, p, num_classes, ordinal)
    correct = np.nan_to_num(pooled.outcomes["accuracy"][row])
    accuracy = _ratio(weights, _per_unit(pooled, correct), _per_unit(pooled, present * 1.0))
    out: dict[str, Any] = {"n": int(present.sum()), "accuracy": point["accuracy"]}
    out["ci95"] = interval(accuracy)
    cell = pooled.labels * num_classes + np.maximum(pooled.predicted[row], 0)
    codes = pooled.units * num_classes**2 + cell
    per_unit = np.bincount(codes[present], minlength=pooled.n_units * num_classes**2).reshape(
        pooled.n_units, num_classes, num_classes
    )
    conf = np.einsum("bu,ukl->bkl", weights, per_unit)
    out["macro_f1"], out["macro_f1_ci95"] = point["macro_f1"], interval(macro_f1_of(conf))
    if ordinal:
        out["qwk"], out["qwk_ci95"] = point["qwk"], interval(qwk_of(conf))
    hits = pooled.outcomes.get("pointing_game", {}).get(row)
    if hits is not None:
        seen = np.isfinite(hits)
        game = _ratio(
            weights, _per_unit(pooled, np.nan_to_num(hits)), _per_unit(pooled, seen * 1.0)
        )
        out["pointing_game"] = float(np.nanmean(hits))
        out["pointing_game_ci95"] = interval(game)
    return out, accuracy


def gap_of(
    student: np.ndarray, baseline: np.ndarray, teacher: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(student − baseline) / (teacher − baseline)`` and where it is defined (gap > 0)."""
    gap = teacher - baseline
    defined = np.isfinite(gap) & (gap > 0) & np.isfinite(student)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, (student - baseline) / gap, np.nan), defined


def compute(
    predictions: Sequence[Mapping[str, Any]],
    num_classes: int,
    ordinal: bool = False,
    folds: Sequence[Any] = (),
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Statistics | None:
    """The statistics of the folds' pooled ``predictions`` (``FoldResult.predictions``), or None
    when they hold none. ``num_classes``: at least the number of classes."""
    pooled = pool(predictions, folds)
    if pooled is None:
        return None
    if resamples < 1:
        raise KdError(f"bootstrap resamples must be at least 1, got {resamples}")
    num_classes = max(num_classes, int(pooled.labels.max(initial=-1)) + 1, 1)
    weights = unit_counts(resample_units(pooled.n_units, resamples, seed), pooled.n_units)
    rows = list(pooled.predicted)
    stats = Statistics(
        bootstrap={
            "resamples": resamples,
            "seed": seed,
            "unit": pooled.unit,
            "ci": LEVEL,
            "n_units": pooled.n_units,
            "n_predictions": int(pooled.labels.size),
        },
        pooled={},
    )
    accuracy: dict[str, np.ndarray] = {}
    for row in rows:
        stats.pooled[row], accuracy[row] = row_statistics(
            pooled, weights, row, num_classes, ordinal
        )
    for metric in pooled.outcomes:
        for a, b in comparison_pairs(rows):
            if (found := paired(pooled, weights, a, b, metric)) is not None:
                stats.comparisons.append(found)
    teacher, baseline = "teacher_crop", "baseline_full"
    if teacher in accuracy and baseline in accuracy:
        for row in [r for r in rows if r == "student" or r.startswith("student_")]:
            point, _ = gap_of(
                *(np.array([stats.pooled[r]["accuracy"]]) for r in (row, baseline, teacher))
            )
            boot, defined = gap_of(accuracy[row], accuracy[baseline], accuracy[teacher])
            undefined = float(1 - defined.mean())
            stats.gap_closure[row] = {
                "value": None if math.isnan(point[0]) else float(point[0]),
                "ci95": interval(boot) if undefined <= MAX_UNDEFINED else None,
                "undefined": undefined,
            }
    return stats
