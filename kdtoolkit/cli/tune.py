"""``kd tune``: search the recipe's ``[tune]`` space with Optuna on validation scores only."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from kdtoolkit.tuning.study import TuneResult


def trials_table(result: TuneResult, limit: int = 20) -> Table:
    """The trials, best first (complete ones by value, then pruned and failed ones)."""
    params = sorted({k for r in result.trials for k in r["params"]})
    title = f"kd tune: {len(result.trials)} trials, {result.metric} ({result.direction})"
    table = Table(title=title)
    for name in ("trial", "state", result.metric, *params, "s"):
        table.add_column(name, justify="right" if name != "state" else "left", no_wrap=True)
    reverse = result.direction == "maximize"
    done = sorted(
        (r for r in result.trials if r["value"] is not None),
        key=lambda r: r["value"],
        reverse=reverse,
    )
    rows = done + [r for r in result.trials if r["value"] is None]
    for r in rows[:limit]:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        cells = [
            f"{v:.4g}" if isinstance(v := r["params"].get(k, ""), float) else str(v) for k in params
        ]
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        number = f"{r['number']} (recipe)" if r.get("recipe") else str(r["number"])
        table.add_row(number, r["state"], value, *cells, seconds)
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more in trials.csv"
    return table


def tune_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file with a [tune] section.")],
    trials: Annotated[
        int, typer.Option(min=1, help="Finished trials in total (a rerun adds the missing).")
    ],
    workers: Annotated[int, typer.Option(min=1, help="Workers sharing the study.")] = 1,
    executor: Annotated[
        str | None,
        typer.Option(help="Workers: inline (processes here), or jobs: local, slurm (\\[launch])."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe value: --set student.epochs=5."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Study folder (default: the run folder + -tune).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Start a new study in a used folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No live progress view.")] = False,
) -> None:
    """Tune student settings on the validation splits of the training folds (never the
    held-out folds); write trials.csv, plots and best.toml."""
    from kdtoolkit.tuning.study import tune

    sets = list(set_ or [])
    if device is not None:
        sets.append(f"experiment.device={json.dumps(device)}")
    if executor is not None:
        sets.append(f"launch.executor={json.dumps(executor)}")
    result = tune(recipe, trials, sets, workers, output, force, quiet)
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(trials_table(result))
    out.print(f"ran {result.ran} trial(s); study in {result.output}", highlight=False)
    written = ", ".join(str(p) for p in result.files)
    out.print(f"written: {written}", highlight=False)
    if result.best_toml is not None:
        out.print(
            f"evaluate it once on the held-out folds: kd run {shlex.quote(str(result.best_toml))}",
            highlight=False,
        )
