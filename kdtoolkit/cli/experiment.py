"""``kd run``, ``kd report``, ``kd compare`` and ``kd validate``: the experiment's commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from kdtoolkit.errors import KdError

if TYPE_CHECKING:
    from kdtoolkit.report.comparison import Comparison
    from kdtoolkit.report.results import RunResults

console = Console()

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: --set teacher.epochs=3 (repeatable)."),
]


def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    set_: SetOption = None,
    output: Annotated[Path | None, typer.Option(help="Run folder (experiment.output).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Reuse a run folder of another recipe.")] = False,
    quiet: Annotated[bool, typer.Option(help="No live progress view.")] = False,
    executor: Annotated[
        str | None,
        typer.Option(help="inline (this process), or each fold a job: local, slurm (\\[launch])."),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            min=1, help="Train each stage data-parallel in N processes (one per GPU): torchrun."
        ),
    ] = 1,
    final: Annotated[
        bool,
        typer.Option(
            help="Then train one more student on all labelled data into RUN_DIR/final/ "
            "(for deployment)."
        ),
    ] = False,
) -> None:
    """Run a recipe: per fold teacher, ROI provider, student and baselines, then the report."""
    from kdtoolkit.config.recipe import load_recipe
    from kdtoolkit.engine import distributed
    from kdtoolkit.engine.run import run as run_recipe
    from kdtoolkit.models.device import resolve_device

    overrides = list(set_ or [])
    if output is not None:
        overrides.append(f"experiment.output={json.dumps(str(output))}")
    if device is not None:
        overrides.append(f"experiment.device={json.dumps(device)}")
    if executor is not None:
        overrides.append(f"launch.executor={json.dumps(executor)}")
    resolved = load_recipe(recipe, overrides)
    size = distributed.world().size
    if nproc > 1 and size == 1:  # checked here, then started again as nproc processes
        device = resolve_device(resolved.experiment.device)
        distributed.check_launch(nproc, resolved.launch.executor, device)
        for role in ("teacher", "student"):
            batch_size = getattr(resolved, role).batch_size
            distributed.check_batch_size(batch_size, f"{role}.batch_size", nproc)
        distributed.launch(nproc, without_nproc(sys.argv[1:]))
        return
    if nproc > 1 and nproc != size:
        raise KdError(f"--nproc {nproc}: this process is one of {size} (torchrun); drop --nproc")
    result = run_recipe(resolved, force=force, quiet=quiet, final=final)
    if not distributed.is_main():
        return
    if not quiet:
        console.print(results_table(result.run))
    console.print(f"[green]done[/]: {result.report}")
    if result.final is not None:
        console.print(f"[green]final model[/]: {result.final}")


def without_nproc(args: list[str]) -> list[str]:
    """Command-line ``args`` without ``--nproc N`` (or ``--nproc=N``)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (experiment.output).")],
) -> None:
    """Rebuild results.json/csv, report.md and figures/ of a run folder from its finished
    folds (fold folders copied in from other machines included); say which are missing."""
    from kdtoolkit.engine.outputs import rebuild_report
    from kdtoolkit.report.verdicts import verdict_table

    rebuilt = rebuild_report(run_dir)
    console.print(results_table(rebuilt.results))
    if (table := verdict_table(rebuilt.results.statistics())) is not None:
        Console(width=None if sys.stdout.isatty() else 140).print(table)
    if line := rebuilt.missing_line():
        console.print(f"[yellow]{line}[/]", highlight=False, soft_wrap=True)
    console.print(f"[green]done[/]: {rebuilt.report}", highlight=False, soft_wrap=True)


def results_table(results: RunResults) -> Table:
    """The results table of a run: percent, mean ± std over its folds, and the gap closure."""
    from kdtoolkit.report.results import ordered_rows, row_label

    gap = results.gap_closure()
    caption = "gap closure: " + ("n/a" if gap is None else f"{100 * gap:.1f}%")
    table = Table(title="held-out folds (mean ± std, %)", caption=caption)
    table.add_column("setting")
    for metric in ("acc", "prec", "rec", "F1"):
        table.add_column(metric, justify="right")
    summary = results.summary
    for row in ordered_rows(summary):
        metrics = summary[row]
        cells = []
        for key in ("accuracy", "precision", "recall", "f1"):
            value = metrics.get(key, {})
            mean, std = value.get("mean"), value.get("std")
            cells.append("n/a" if mean is None else f"{100 * mean:.2f} ± {100 * (std or 0):.2f}")
        table.add_row(row_label(row), *cells)
    return table


def compare(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="NAME:key=value,key=value (repeatable); 'NAME:' is the recipe as it is. "
            "Default: the recipe's [compare] variants.",
        ),
    ] = None,
    set_: SetOption = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default: the run folder + -gap_closure).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Reuse an output folder of another recipe.")] = False,
    quiet: Annotated[bool, typer.Option(help="No live progress view.")] = False,
) -> None:
    """Gap closure of student variants against one crop teacher and one full-image baseline."""
    from kdtoolkit.engine.compare import compare as compare_variants
    from kdtoolkit.engine.compare import variants_of
    from kdtoolkit.report.verdicts import verdict_table

    sets = list(set_ or [])
    if device is not None:
        sets.append(f"experiment.device={json.dumps(device)}")
    variants = variants_of(recipe, variant or [], sets)
    comparison = compare_variants(recipe, variants, sets, output, force, quiet)
    out = Console(width=None if sys.stdout.isatty() else 140)
    out.print(comparison_table(comparison))
    if (table := verdict_table(comparison.results.statistics(), comparison.names)) is not None:
        out.print(table)
    for v in comparison.variants:
        out.print(f"  {v.name}: {', '.join(v.overrides) or '(recipe as is)'}", highlight=False)
    folder = comparison.output
    out.print(
        f"written: {folder / 'gap_closure.json'}, {folder / 'gap_closure.md'}", highlight=False
    )


def comparison_table(comparison: Comparison) -> Table:
    """The variants' table: accuracy and F1 (mean ± std, %) and gap closure per setting."""
    from kdtoolkit.report.comparison import gap_text, mean_std_percent

    n = len(comparison.results.folds)
    table = Table(title=f"Gap closure over {n} fold(s): {comparison.recipe}")
    table.add_column("setting", no_wrap=True)
    table.add_column("accuracy %", justify="right", no_wrap=True)
    table.add_column("F1 %", justify="right", no_wrap=True)
    table.add_column("gap closure", justify="right", no_wrap=True)
    summary = comparison.summary
    for row in comparison.rows:
        table.add_row(
            row,
            mean_std_percent(summary, row, "accuracy"),
            mean_std_percent(summary, row, "f1"),
            gap_text(comparison, row),
        )
    return table


def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    set_: SetOption = None,
    show: Annotated[bool, typer.Option(help="Print the resolved recipe as JSON.")] = False,
) -> None:
    """Check a recipe without running it: every problem at once, exit 2 if any."""
    from kdtoolkit.config.recipe import RecipeError, load_recipe
    from kdtoolkit.config.variants import variant_problems

    resolved = load_recipe(recipe, list(set_ or []))
    if resolved.experiment.device not in ("auto", "cpu"):  # as kd run: a device this lacks
        from kdtoolkit.models.device import resolve_device

        resolve_device(resolved.experiment.device)
    if problems := variant_problems(recipe, list(set_ or [])):  # as kd compare would
        raise RecipeError(str(recipe), problems)
    if show:
        print(resolved.to_json())
    else:
        console.print(f"[green]ok[/]: {recipe}")
