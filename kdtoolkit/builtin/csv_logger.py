"""Built-in plugin: the ``csv`` run logger, one tidy ``metrics.csv`` per run folder.

Columns ``stage, fold, epoch, name, value``: a row per scalar of every finished epoch, and the
run's results as rows of stage ``results`` (fold and epoch empty). A resumed run appends; an
epoch already in the file is not written again (a resumed stage repeats it exactly).
"""

from __future__ import annotations

import csv
import io
from typing import Any

from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.logger import RunInfo, RunLogger, relative_inside

COLUMNS = ("stage", "fold", "epoch", "name", "value")
RESULTS = "results"


def csv_text(rows: list[tuple[Any, ...]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


class CsvLogger(RunLogger):
    """``metrics.csv`` in the run folder (``file``: another name, relative to it)."""

    def __init__(self, file: str = "metrics.csv") -> None:
        self.file = file
        self.path = relative_inside("file", file)
        self.logged: set[tuple[str, str, str]] = set()

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / self.file
        if not self.path.exists():
            atomic_write_text(self.path, csv_text([COLUMNS]))
        with open(self.path, newline="", encoding="utf-8") as f:
            self.logged = {(r["stage"], r["fold"], r["epoch"]) for r in csv.DictReader(f)}

    def log_epoch(self, fold: int, stage: str, epoch: int, scalars: dict[str, float]) -> None:
        key = (stage, str(fold), str(epoch))
        if key in self.logged:
            return
        rows = [(*key, name, repr(value)) for name, value in scalars.items()]
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            f.write(csv_text(rows))  # one write: a fold job's rows stay whole
        self.logged.add(key)

    def log_results(self, metrics: dict[str, float], results: dict[str, Any]) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [tuple(r) for r in csv.reader(f)]
        kept = [r for r in rows[1:] if r and r[0] != RESULTS]
        new = [(RESULTS, "", "", name, repr(value)) for name, value in metrics.items()]
        atomic_write_text(self.path, csv_text([COLUMNS, *kept, *new]))


@hookimpl
def kd_register_loggers(registry):
    registry.register("csv", CsvLogger)
