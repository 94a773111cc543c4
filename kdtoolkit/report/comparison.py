"""Student variants compared against one crop teacher and one full-image baseline: their
results (``gap_closure.json``) and Markdown (``gap_closure.md``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.report.format import md_table
from kdtoolkit.report.results import (
    BASELINE_FULL,
    TEACHER_CROP,
    RunResults,
    jsonable,
    variant_row,
)
from kdtoolkit.report.verdicts import p_text, points, statistics_lines, with_ci

#: What the gap closure is.
FORMULA = "(student - baseline_full) / (teacher_crop - baseline_full), mean accuracy"


@dataclass
class VariantInfo:
    """One student variant: its name, stage role, overrides and resolved settings."""

    name: str
    overrides: list[str]
    recipe_digest: str
    loss: list[dict[str, Any]]
    student: dict[str, Any]

    @property
    def role(self) -> str:
        return variant_row(self.name)


@dataclass
class Comparison:
    """The variants' run results (rows ``teacher_crop``, ``baseline_full`` and
    ``student_<name>``), shown with each variant's row named by the variant."""

    recipe: str
    recipe_digest: str
    output: Path
    results: RunResults
    variants: list[VariantInfo]
    teacher_model: str
    student_model: str

    @property
    def rows(self) -> list[str]:
        return [TEACHER_CROP, BASELINE_FULL, *(v.name for v in self.variants)]

    def named(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """``{row: value}`` with each variant's row renamed to the variant's name."""
        return {self.names.get(row, row): value for row, value in metrics.items()}

    @property
    def summary(self) -> dict[str, Any]:
        return self.named(self.results.summary)

    @property
    def names(self) -> dict[str, str]:
        """``{student_<name>: name}`` of the variants' rows."""
        return {v.role: v.name for v in self.variants}

    def variant(self, row: str) -> VariantInfo | None:
        """The variant whose row is ``row`` (by name or stage role), or None."""
        return next((v for v in self.variants if row in (v.name, v.role)), None)

    def architecture(self, row: str) -> str:
        """The backbone of a row (the teacher's, the baseline's or a variant's student)."""
        if row == TEACHER_CROP:
            return self.teacher_model
        v = self.variant(row)
        return str(v.student.get("backbone") or self.student_model) if v else self.student_model

    def dead_cam(self, row: str) -> float | None:
        """The share of dead held-out CAMs of ``row`` over all folds (None: not measured)."""
        v = self.variant(row)
        return self.results.dead_cam.get(v.role if v else row)

    def statistics(self) -> dict[str, Any]:
        """The bootstrap statistics (``report.stats``) with the variants' rows named, or {};
        each variant's accuracy comparison with the baseline carries ``p_holm``, its McNemar p
        Holm-adjusted over all the variants compared."""
        stats = self.results.statistics()
        if stats is None:
            return {}
        doc = stats.to_json()
        names = self.names
        doc["pooled"] = self.named(doc["pooled"])
        doc["comparisons"] = [
            {**c, "a": names.get(c["a"], c["a"]), "b": names.get(c["b"], c["b"])}
            for c in doc["comparisons"]
        ]
        family = [c for c in doc["comparisons"] if self.against_baseline(c)]
        for c, p in zip(family, holm([float(c["p"]) for c in family]), strict=True):
            c["p_holm"] = p
        doc["gap_closures"] = self.named(doc["gap_closures"])
        doc["gap_closure_ci95"] = {
            v.name: doc["gap_closures"].get(v.name, {}).get("ci95") for v in self.variants
        }
        doc.pop("gap_closure_pooled")
        return doc

    def against_baseline(self, comparison: dict[str, Any]) -> bool:
        """A variant's accuracy against the baseline (rows named), the family Holm adjusts."""
        names = {v.name for v in self.variants}
        return (
            comparison["a"] in names
            and comparison["b"] == BASELINE_FULL
            and comparison["metric"] == "accuracy"
        )

    def gap_closure(self) -> dict[str, float | None]:
        return {v.name: self.results.gap_closure(student=v.role) for v in self.variants}

    def to_json(self) -> dict[str, Any]:
        """The ``gap_closure.json`` document."""
        return jsonable(
            {
                "recipe": self.recipe,
                "recipe_digest": self.recipe_digest,
                "output": str(self.output),
                "metric": "accuracy",
                "formula": FORMULA,
                "folds_run": self.results.fold_ids,
                "rows": self.rows,
                "models": {"teacher": self.teacher_model, "student": self.student_model},
                "architectures": {row: self.architecture(row) for row in self.rows},
                "dead_cam": {row: self.dead_cam(row) for row in self.rows[1:]},
                "variants": {
                    v.name: {
                        "overrides": v.overrides,
                        "role": v.role,
                        "recipe_digest": v.recipe_digest,
                        "loss": v.loss,
                        "student": v.student,
                    }
                    for v in self.variants
                },
                "folds": [
                    {"fold": f.fold, "n_test": f.n_test, "metrics": self.named(f.metrics)}
                    for f in self.results.folds
                ],
                "summary": self.summary,
                "gap_closure": self.gap_closure(),
                **self.statistics(),
            }
        )


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the input order: the i-th smallest p (1-based) becomes
    ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))`` over the m values."""
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def variant_table(comparison: Comparison) -> list[str]:
    """Each variant against the shared baseline: architecture, pooled accuracy, paired
    difference, McNemar and Holm p, gap closure, pointing game and dead CAMs, with intervals."""
    doc = comparison.statistics()
    if not doc:
        return []
    pooled, gaps = doc["pooled"], doc["gap_closures"]
    versus = {c["a"]: c for c in doc["comparisons"] if comparison.against_baseline(c)}
    header = [
        "row",
        "architecture",
        "accuracy % [95% CI]",
        "a − baseline, points [95% CI]",
        "discordant",
        "McNemar p",
        "Holm p",
        "gap closure % [95% CI]",
        "pointing game %",
        "dead CAMs %",
    ]
    body = []
    for row in comparison.rows:
        values, c, gap = pooled.get(row, {}), versus.get(row), gaps.get(row, {})
        dead = comparison.dead_cam(row) if row != TEACHER_CROP else None
        ci, gap_ci = (c or {}).get("ci95"), gap.get("ci95")
        body.append(
            [
                row,
                comparison.architecture(row),
                with_ci(values.get("accuracy"), values.get("ci95")),
                f"{points(c['diff'])} [{points(ci[0])}, {points(ci[1])}]" if c and ci else "—",
                "{} / {}".format(*c["discordant"]) if c else "—",
                p_text(float(c["p"])) if c else "—",
                p_text(float(c["p_holm"])) if c else "—",
                with_ci(gap.get("value"), gap_ci) if gap.get("value") is not None else "—",
                with_ci(values.get("pointing_game"), values.get("pointing_game_ci95"))
                if "pointing_game" in values
                else "—",
                f"{100 * dead:.1f}" if dead is not None else "—",
            ]
        )
    n = len(comparison.variants)
    return [
        "## Variants against the baseline",
        "",
        *md_table(header, body),
        "",
        f"{n} variant{'s' if n != 1 else ''} compared with the baseline; Holm p adjusts the "
        f"McNemar p of each over all {n}. Pooled held-out predictions, paired bootstrap "
        "intervals.",
        "",
    ]


def mean_std_percent(summary: dict[str, Any], row: str, metric: str) -> str:
    value = summary.get(row, {}).get(metric)
    if value is None:
        return "n/a"
    return f"{100 * value['mean']:.2f} ± {100 * value['std']:.2f}"


def gap_text(comparison: Comparison, row: str) -> str:
    """A row's gap closure in percent; "—" for the reference rows, "n/a" when undefined."""
    if row in (TEACHER_CROP, BASELINE_FULL):
        return "—"
    value = comparison.gap_closure().get(row)
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def comparison_markdown(comparison: Comparison) -> str:
    """``gap_closure.md``: the table, the variants and the per-fold accuracies."""
    rows, summary = comparison.rows, comparison.summary
    lines = [
        "# Gap closure",
        "",
        f"Recipe `{comparison.recipe}` (digest `{comparison.recipe_digest}`), "
        f"folds {comparison.results.fold_ids}, teacher `{comparison.teacher_model}`, "
        f"student `{comparison.student_model}`. Held-out folds, mean ± std (%).",
        f"Gap closure = {FORMULA}.",
        "",
        "| setting | accuracy | F1 | gap closure |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row} | {mean_std_percent(summary, row, 'accuracy')} "
            f"| {mean_std_percent(summary, row, 'f1')} | {gap_text(comparison, row)} |"
        )
    lines += ["", "## Variants", ""]
    for v in comparison.variants:
        changes = ", ".join(f"`{o}`" for o in v.overrides) or "the recipe as it is"
        terms = " + ".join(f"{t['weight']:g}·{t['name']}" for t in v.loss)
        lines.append(
            f"- **{v.name}** (stage `{v.role}`, `{comparison.architecture(v.name)}`): "
            f"{changes}; loss {terms}"
        )
    lines += [
        "",
        "## Accuracy per fold (%)",
        "",
        "| fold | " + " | ".join(rows) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for fold in comparison.results.folds:
        metrics = comparison.named(fold.metrics)
        cells = [f"{100 * metrics[row]['accuracy']:.2f}" for row in rows]
        lines.append(f"| {fold.fold} | " + " | ".join(cells) + " |")
    stats = comparison.results.statistics()
    lines += [
        "",
        *variant_table(comparison),
        *statistics_lines(stats, names=comparison.names, order=list(comparison.results.rows)),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_comparison(comparison: Comparison) -> tuple[Path, Path]:
    """Write ``gap_closure.json`` and ``gap_closure.md`` into the output folder."""
    out = comparison.output
    doc = atomic_write_text(out / "gap_closure.json", json.dumps(comparison.to_json(), indent=1))
    md = atomic_write_text(out / "gap_closure.md", comparison_markdown(comparison))
    return doc, md
