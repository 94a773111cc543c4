"""The ``kd`` command: a thin typer layer over the library functions."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdtoolkit import __version__, interrupts
from kdtoolkit.data_cli import data_app
from kdtoolkit.deploy_cli import export_command, predict_command
from kdtoolkit.errors import KdError
from kdtoolkit.scaffold import new_plugin_command
from kdtoolkit.tune_cli import tune_command

if TYPE_CHECKING:
    from kdtoolkit.report.comparison import Comparison
    from kdtoolkit.report.results import RunResults

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="kd",
    help="Knowledge distillation from ROI-crop teachers to full-image students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.command("new-plugin")(new_plugin_command)
app.command("predict")(predict_command)
app.command("tune")(tune_command)
app.command("export")(export_command)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value: --set teacher.epochs=3 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"kdtoolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """kdtoolkit: train crop teachers, distil them into full-image students, evaluate with CV."""


@app.command()
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
    from kdtoolkit.engine.device import resolve_device
    from kdtoolkit.engine.run import run as run_recipe

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


@app.command()
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


@app.command()
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


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    set_: SetOption = None,
    show: Annotated[bool, typer.Option(help="Print the resolved recipe as JSON.")] = False,
) -> None:
    """Check a recipe without running it: every problem at once, exit 2 if any."""
    from kdtoolkit.config.recipe import RecipeError, load_recipe
    from kdtoolkit.engine.compare import variant_problems
    from kdtoolkit.engine.device import resolve_device

    resolved = load_recipe(recipe, list(set_ or []))
    resolve_device(resolved.experiment.device)  # as kd run does: a device this machine lacks
    if problems := variant_problems(recipe, list(set_ or [])):  # as kd compare would
        raise RecipeError(str(recipe), problems)
    if show:
        print(resolved.to_json())
    else:
        console.print(f"[green]ok[/]: {recipe}")


@app.command()
def plugins(
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            metavar="NAME",
            help="Print the options of component NAME: types, bounds and defaults.",
        ),
    ] = None,
) -> None:
    """List every registered component by kind, with the plugin that provides it, and the
    resolvers that accept whole families of names (e.g. any timm model name); with
    ``--options NAME``, the options a recipe may give that component."""
    from kdtoolkit.plugins.manager import broken_plugins, list_components, options_of

    if options is not None:
        for c in options_of(options):
            table = Table(title=f"{c.kind} {c.name!r} ({c.plugin})")
            for column in ("option", "type", "bounds", "default"):
                table.add_column(column)
            for o in c.options:
                table.add_row(o.name, o.type, o.bounds, o.default)
            console.print(table if c.options else f"{c.kind} {c.name!r} ({c.plugin}): no options")
        return
    table = Table(title="kdtoolkit components")
    for column in ("kind", "name", "plugin"):
        table.add_column(column)
    for c in list_components():
        table.add_row(c.kind, f"<{c.name}>" if c.resolver else c.name, c.plugin)
    for name, why in broken_plugins().items():
        table.add_row("[red]broken[/]", escape(name), escape(f"switched off: it {why}"))
    console.print(table)


def _add_plugin_commands() -> None:
    """Plugins' sub-commands; one warning line per installed plugin that is switched off."""
    from kdtoolkit.plugins.manager import broken_message, broken_plugins, plugin_manager

    for name, why in broken_plugins().items():
        err_console.print(
            f"[yellow]warning[/]: {escape(broken_message(name, why))}",
            highlight=False,
            soft_wrap=True,
        )
    plugin_manager().hook.kd_register_commands(app=app)


def _is_usage_error(e: Exception) -> bool:
    """A typer/click usage error (typer may bundle its own copy of click)."""
    return any(
        cls.__name__ == "ClickException" and cls.__module__.endswith("exceptions")
        for cls in type(e).__mro__
    )


INTERRUPTED = "interrupted: nothing half-written is kept; rerun the command to resume or redo it"


def run_app(typer_app: typer.Typer, plugin_commands: bool = False) -> None:
    """Run a typer app the kdtoolkit way (``kd``, benchmark scripts): a ``KdError`` prints one
    line and exits with its code (2; 130 for an interrupted run, saying what is kept), usage
    errors exit 2, Ctrl-C 130 with one line, anything else one line and exit 1;
    ``KD_DEBUG=1`` shows tracebacks instead."""
    debug = os.environ.get("KD_DEBUG") == "1"
    interrupts.terminate_as_interrupt()
    try:
        if plugin_commands:
            _add_plugin_commands()
        code = typer_app(standalone_mode=False)  # typer returns Exit codes (Ctrl-C: 130)
    except KdError as e:
        if debug:
            raise
        defer_other_ranks()
        err_console.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(interrupts.exit_code(e.exit_code))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        code = 130
    except typer.Abort as e:
        if not isinstance(e.__cause__, EOFError):
            code = 130
        else:  # click turns an EOFError into Abort: an error, not an interrupt
            _internal_error(e.__cause__, debug)
    except Exception as e:
        if _is_usage_error(e):
            e.show()
            sys.exit(2)
        defer_other_ranks()
        _internal_error(e, debug)
    if code == 130:
        err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        code = interrupts.exit_code(code)
    if isinstance(code, int) and code:
        sys.exit(code)


def defer_other_ranks() -> None:
    """Under torchrun, a rank other than 0 waits before it reports an error: rank 0's own error
    (or a lost peer when rank 0 failed alone) ends the launch first, so one line is printed."""
    if os.environ.get("RANK", "0") != "0" and os.environ.get("WORLD_SIZE", "1") != "1":
        time.sleep(3)


def _internal_error(e: BaseException, debug: bool) -> None:
    """One line and exit 1 (the traceback with ``KD_DEBUG=1``)."""
    if debug:
        raise e
    err_console.print(
        f"[red]internal error[/]: {type(e).__name__}: {escape(str(e))} (KD_DEBUG=1 shows the "
        "traceback)",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(1)


def main() -> None:
    """Entry point of ``kd``; plugins add their commands (not for ``--version``: they import
    torch and timm, which takes seconds)."""
    run_app(app, plugin_commands=sys.argv[1:] != ["--version"])


if __name__ == "__main__":
    main()
