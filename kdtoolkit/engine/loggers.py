"""The run's loggers (``experiment.loggers``): the one place the engine hands parameters,
per-epoch scalars, results and artifacts to them.

Loggers run on rank 0 only. A logger that raises is reported once in the run log and switched
off; the run goes on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.distributed import is_main
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.fileio import read_json
from kdtoolkit.plugins.logger import RunInfo, RunLogger, flatten, logger_specs, scalars_of
from kdtoolkit.plugins.manager import registries

#: Results keys that are not metrics.
NOT_METRICS = ("classes", "folds_run", "recipe_digest", "models", "summary", "folds", "comparisons")
#: Files of the run folder handed to ``log_artifacts`` (those that exist).
ARTIFACTS = ("report.md", "results.json", "results.csv", "recipe.resolved.json")


def results_metrics(doc: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a ``results.json`` document, flat: ``student/accuracy/mean``,
    ``gap_closure``, ``pooled/student/ci95/0``, per fold ``fold_<k>/student/accuracy``, per
    comparison ``student_vs_baseline_full/accuracy/p_value``."""
    out = scalars_of(flatten(doc.get("summary") or {}, sep="/"))
    out.update(scalars_of(flatten({k: v for k, v in doc.items() if k not in NOT_METRICS}, sep="/")))
    folds = doc.get("folds_run") or range(len(doc.get("folds") or []))
    for k, metrics in zip(folds, doc.get("folds") or [], strict=False):
        out.update(scalars_of(flatten(metrics, f"fold_{k}", sep="/")))
    for c in doc.get("comparisons") or []:
        if isinstance(c, Mapping):
            prefix = f"{c.get('a')}_vs_{c.get('b')}/{c.get('metric', '')}".rstrip("/")
            rest = {k: v for k, v in c.items() if k not in ("a", "b", "metric")}
            out.update(scalars_of(flatten(rest, prefix, sep="/")))
    return out


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class RunLoggers:
    """The loggers of one run (empty on ranks other than 0), each call guarded: a logger that
    raises is named once in the log and dropped."""

    def __init__(
        self,
        loggers: list[tuple[str, RunLogger]] | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.loggers = list(loggers or [])
        self.log = log

    @classmethod
    def open(cls, recipe: Recipe, log: Callable[[str], None], job: int | None = None) -> RunLoggers:
        """Build the recipe's loggers and start them (rank 0; elsewhere none). ``job``: the
        fold this process runs as a job (``RunInfo.job``)."""
        self = cls([], log)
        if not is_main():
            return self
        registry = registries().loggers
        for name, options in logger_specs(recipe.experiment.loggers):
            try:
                self.loggers.append((name, registry.get(name)(**options)))
            except Exception as e:  # a logger never stops a run
                self.warn(name, "__init__", e)
        root = recipe.output_dir
        raw = recipe.to_dict()
        info = RunInfo(
            name=recipe.experiment.name,
            run_dir=root,
            recipe=raw,
            params=flatten(raw, lists=False),
            digest=recipe.digest(),
            resumed=any(root.glob("fold_*")),
            job=job,
        )
        self.call("start", info)
        return self

    def warn(self, name: str, method: str, e: BaseException) -> None:
        owner = registries().loggers.owner(name) if name in registries().loggers else "?"
        self.log(
            f"warning: logger {name!r} (plugin {owner!r}) failed in {method}: {first_line(e)}; "
            "switched off for the rest of this run"
        )

    def call(self, method: str, *args: Any) -> None:
        """``method(*args)`` of every logger; one that raises is reported and dropped."""
        for entry in list(self.loggers):
            name, logger = entry
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                self.loggers.remove(entry)
                self.warn(name, method, e)
                if method != "close":
                    with contextlib.suppress(Exception):
                        logger.close("failed")

    def epoch(self, fold: int, stage: str, epoch: int, record: Mapping[str, Any]) -> None:
        """One finished epoch: every number of its record but the epoch itself."""
        if self.loggers:
            scalars = scalars_of({k: v for k, v in record.items() if k != "epoch"})
            self.call("log_epoch", fold, stage, epoch, scalars)

    def results(self, root: Path) -> None:
        """The run's results (its ``results.json``) and files: report, results, resolved
        recipe and figures."""
        if not self.loggers:
            return
        try:
            doc = read_json(root / "results.json", "results", "rerun kd report")
        except KdError as e:
            self.log(f"warning: the loggers get no results: {e}")
            return
        self.call("log_results", results_metrics(doc), doc)
        files = [root / name for name in ARTIFACTS if (root / name).is_file()]
        files += sorted((root / "figures").glob("*.png"))
        self.call("log_artifacts", files)

    def close(self, status: str) -> None:
        self.call("close", status)
        self.loggers = []


@contextlib.contextmanager
def run_loggers(ctx: Any, job: int | None = None) -> Iterator[RunLoggers]:
    """Open the recipe's loggers as ``ctx.loggers`` of a ``RunContext`` for the block, and
    close them with its outcome (finished, interrupted or failed)."""
    ctx.loggers = RunLoggers.open(ctx.recipe, ctx.log, job)
    status = "failed"
    try:
        yield ctx.loggers
        status = "finished"
    except (KeyboardInterrupt, SystemExit, Interrupted):
        status = "interrupted"
        raise
    finally:
        ctx.loggers.close(status)
        ctx.loggers = RunLoggers([], ctx.log)
