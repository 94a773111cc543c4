"""The statistics as text: the "Is the student better?" table (one line per paired comparison),
each row's pooled metrics with their 95% intervals and the gap closure's interval. The Markdown
report and the terminal tables are made from these cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from kdtoolkit.report.format import md_table
from kdtoolkit.report.stats import Statistics, verdict

COMPARISON_HEADER = (
    "a",
    "b",
    "metric",
    "a − b, points [95% CI]",
    "discordant a / b",
    "McNemar p",
    "verdict",
)
#: (key, heading) of the pooled table; the interval is ``<key>_ci95`` (``ci95`` for accuracy).
POOLED_METRICS = (
    ("accuracy", "accuracy %"),
    ("macro_f1", "macro F1 %"),
    ("qwk", "QWK"),
    ("pointing_game", "pointing game %"),
)


def points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.2f}"


def with_ci(value: float | None, ci: Sequence[float] | None, percent: bool = True) -> str:
    """``83.33 [78.10, 88.20]`` (percent) or ``0.812 [0.750, 0.860]``; "–" without a value."""
    if value is None:
        return "–"
    k, d = (100, 2) if percent else (1, 3)
    text = f"{k * value:.{d}f}"
    return text + (f" [{k * ci[0]:.{d}f}, {k * ci[1]:.{d}f}]" if ci else " [n/a]")


def p_text(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def comparison_cells(comparison: Mapping[str, Any], names: Mapping[str, str] = {}) -> list[str]:
    """One comparison's cells (``COMPARISON_HEADER``); ``names`` renames rows."""
    ci = comparison.get("ci95")
    diff = points(comparison["diff"])
    diff += f" [{points(ci[0])}, {points(ci[1])}]" if ci else " [n/a]"
    right, wrong = comparison["discordant"]
    return [
        names.get(comparison["a"], comparison["a"]),
        names.get(comparison["b"], comparison["b"]),
        comparison["metric"],
        diff,
        f"{right} / {wrong}",
        p_text(float(comparison["p"])),
        verdict(ci),
    ]


def pooled_header(stats: Statistics) -> list[str]:
    present = [(k, h) for k, h in POOLED_METRICS if any(k in v for v in stats.pooled.values())]
    return ["setting", "n", *(h for _, h in present)]


def pooled_cells(stats: Statistics, row: str, label: str | None = None) -> list[str]:
    """Row ``row``'s pooled metrics with their intervals (``pooled_header``'s columns)."""
    values = stats.pooled[row]
    present = [k for k, _ in POOLED_METRICS if any(k in v for v in stats.pooled.values())]
    cells = [label or row, str(values.get("n", ""))]
    for key in present:
        ci = values.get("ci95" if key == "accuracy" else f"{key}_ci95")
        cells.append(with_ci(values.get(key), ci, key != "qwk"))
    return cells


def gap_ci_text(stats: Statistics, row: str = "student") -> str:
    """``41.2% (95% CI [12.0, 70.3])`` of the pooled gap closure of ``row``, or ''."""
    gap = stats.gap_closure.get(row)
    if not gap or gap.get("value") is None:
        return ""
    ci = gap.get("ci95")
    interval = f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "n/a"
    return f"{100 * gap['value']:.1f}% (95% CI {interval})"


def statistics_lines(
    stats: Statistics | None,
    labels: Mapping[str, str] = {},
    names: Mapping[str, str] = {},
    order: Sequence[str] = (),
) -> list[str]:
    """The Markdown of the statistics: the verdict table, the gap closure's interval and the
    pooled table (rows in ``order`` first; ``labels``: the setting text of a row)."""
    if stats is None:
        return []
    boot = stats.bootstrap
    unit = "patients (groups)" if boot.get("unit") == "group" else "samples"
    out = ["## Is the student better?", ""]
    if stats.comparisons:
        rows = [comparison_cells(c, names) for c in stats.comparisons]
        out += [*md_table(COMPARISON_HEADER, rows), ""]
    else:
        out += ["No pair of rows to compare.", ""]
    out.append(
        f"Pooled held-out predictions of every fold ({boot.get('n_predictions')} predictions, "
        f"{boot.get('n_units')} {unit}); 95% percentile bootstrap intervals over "
        f"{boot.get('resamples')} resamples of {unit} (seed {boot.get('seed')}). Verdict: "
        "better when the interval of a − b lies above 0, worse when below, else not "
        "distinguishable. Discordant: a right and b wrong / b right and a wrong; McNemar: "
        "exact two-sided binomial test of the discordant pairs."
    )
    out.append("")
    for row, gap in stats.gap_closure.items():
        if text := gap_ci_text(stats, row):
            out += [f"Gap closure of {names.get(row, row)}, pooled accuracy: {text}.", ""]
        elif gap.get("value") is not None:
            out += [
                f"Gap closure of {names.get(row, row)}: no interval (no gap in too many "
                "resamples).",
                "",
            ]
    rows = [r for r in order if r in stats.pooled] + [r for r in stats.pooled if r not in order]
    body = [pooled_cells(stats, r, labels.get(r) or names.get(r)) for r in rows]
    out += ["### Pooled held-out metrics (95% CI)", "", *md_table(pooled_header(stats), body), ""]
    return out


def verdict_table(stats: Statistics | None, names: Mapping[str, str] | None = None) -> Table | None:
    """The "Is the student better?" table of the pooled held-out predictions (the report's
    cells, ``verdicts.comparison_cells``), or None without statistics or pairs."""
    if stats is None or not stats.comparisons:
        return None
    unit = "patients" if stats.bootstrap.get("unit") == "group" else "samples"
    gaps = [
        f"{(names or {}).get(r, r)} {t}" for r in stats.gap_closure if (t := gap_ci_text(stats, r))
    ]
    table = Table(
        title=f"Is the student better? (pooled held-out predictions, bootstrap over {unit})",
        caption="gap closure, pooled: " + "; ".join(gaps) if gaps else None,
    )
    for i, heading in enumerate(COMPARISON_HEADER):
        table.add_column(heading, justify="right" if 3 <= i <= 5 else "left", no_wrap=True)
    for comparison in stats.comparisons:
        table.add_row(*comparison_cells(comparison, names or {}))
    return table
