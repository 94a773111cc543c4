"""Student variants compared against one crop teacher and one full-image baseline: their
results (``gap_closure.json``) and Markdown (``gap_closure.md``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.report.results import (
    BASELINE_FULL,
    TEACHER_CROP,
    RunResults,
    jsonable,
    variant_row,
)
from kdtoolkit.report.verdicts import statistics_lines

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

    def statistics(self) -> dict[str, Any]:
        """The bootstrap statistics (``report.stats``) with the variants' rows named, or {}."""
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
        doc["gap_closures"] = self.named(doc["gap_closures"])
        doc["gap_closure_ci95"] = {
            v.name: doc["gap_closures"].get(v.name, {}).get("ci95") for v in self.variants
        }
        doc.pop("gap_closure_pooled")
        return doc

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
        lines.append(f"- **{v.name}** (stage `{v.role}`): {changes}; loss {terms}")
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
        *statistics_lines(stats, names=comparison.names, order=list(comparison.results.rows)),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_comparison(comparison: Comparison) -> tuple[Path, Path]:
    """Write ``gap_closure.json`` and ``gap_closure.md`` into the output folder."""
    out = comparison.output
    doc = atomic_write_text(out / "gap_closure.json", json.dumps(comparison.to_json(), indent=1))
    md = atomic_write_text(out / "gap_closure.md", comparison_markdown(comparison))
    return doc, md
