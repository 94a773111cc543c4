"""Gap closure of several student recipes ("variants") against one teacher and one baseline;
the same as ``kd compare`` (``kdtoolkit.engine.compare``).

    python benchmarks/gap_closure.py RECIPE \\
        --variant "paper:" \\
        --variant "roi_feature:loss.3.name=roi_feature,loss.3.weight=0.5" \\
        [--set cv.folds=3 ...] [--output DIR] [--device cpu] [--quiet] [--force]

A variant is ``NAME:OVERRIDES``: a lower snake_case name, then ``--set``-style ``key=value``
overrides separated by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the value).
``NAME:`` (or ``NAME``) is the recipe as it is. ``loss.N.key=value`` with N equal to the number
of loss terms appends a new term; ``loss.N.weight=0`` switches a term off. A variant may change
only ``loss`` and the student's settings (``student.*``, its backbone options included, but not
its backbone): the folds, teacher, ROI provider and full-image baseline are shared, so they are
trained once per fold (stages ``teacher``, ``roi``, ``baseline_full``) and each variant trains
its own student (stage ``student_<name>``), all cached in the output folder (a rerun, or one
with more variants, reuses them). Variant students share the plain student's seed, so they
start from the same weights and batch order and differ only in what the variant changes.

Every model is evaluated on the held-out folds; the table (and ``gap_closure.json`` /
``gap_closure.md`` in the output folder) gives accuracy and weighted F1 as mean ± std over folds
and the gap closure ``(student − baseline) / (teacher − baseline)`` in mean accuracy.
"""

from __future__ import annotations

import sys

from kdtoolkit.cli import app, run_app

if __name__ == "__main__":
    sys.argv.insert(1, "compare")
    run_app(app)
