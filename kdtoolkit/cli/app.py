"""The ``kd`` application: its commands (one module per group in this package), the way it
reports errors and interrupts, and its entry point ``main``."""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kdtoolkit import __version__, interrupts
from kdtoolkit.cli.data import data_app
from kdtoolkit.cli.deploy import export_command, predict_command
from kdtoolkit.cli.experiment import compare, report, run, validate
from kdtoolkit.cli.plugins import plugins
from kdtoolkit.cli.tune import tune_command
from kdtoolkit.errors import KdError
from kdtoolkit.scaffold import new_plugin_command

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="kd",
    help="Knowledge distillation from ROI-crop teachers to full-image students.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (run, report, compare, validate, plugins):
    app.command()(command)
app.add_typer(data_app, name="data")
app.command("new-plugin")(new_plugin_command)
app.command("predict")(predict_command)
app.command("tune")(tune_command)
app.command("export")(export_command)


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


def _add_plugin_commands() -> None:
    """Plugins' sub-commands (the installed plugins alone: no built-in component, so no torch
    import); one warning line per installed plugin that is switched off. None on an install
    without the training stack when a plugin needs it at import."""
    from kdtoolkit.plugins.manager import broken_message, installed_plugins

    try:
        pm = installed_plugins()
    except ModuleNotFoundError as e:
        if missing_training_stack(e):
            return
        raise
    for name, why in pm.broken.items():
        err_console.print(
            f"[yellow]warning[/]: {escape(broken_message(name, why))}",
            highlight=False,
            soft_wrap=True,
        )
    if not PLUGIN_COMMANDS_ADDED:  # once per process (kd run in-process by the tests)
        pm.hook.kd_register_commands(app=app)
        PLUGIN_COMMANDS_ADDED.append(True)


PLUGIN_COMMANDS_ADDED: list[bool] = []


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
    errors exit 2, Ctrl-C 130 with one line, anything else one line and exit 1; Python and
    library warnings are not shown. ``KD_DEBUG=1`` shows tracebacks and warnings instead."""
    debug = os.environ.get("KD_DEBUG") == "1"
    if not debug:  # what kd has to say, it says in its own lines; KD_DEBUG=1 shows the rest
        warnings.simplefilter("ignore")
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
        if missing := missing_training_stack(e):
            err_console.print(f"[red]error[/]: {escape(missing)}", highlight=False, soft_wrap=True)
            sys.exit(2)
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


#: What ``pip install "kdtoolkit[train]"`` adds to the base install (which serves exports).
TRAINING_STACK = ("torch", "torchvision", "timm", "ultralytics", "safetensors", "sklearn",
                  "scipy", "matplotlib", "submitit")  # fmt: skip


def missing_training_stack(e: BaseException) -> str | None:
    """One line for a command that needs the training stack on an install without it."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if not isinstance(e, ModuleNotFoundError) or name not in TRAINING_STACK:
        return None
    return (
        f"this command needs the training stack ({name} is not installed): "
        'pip install "kdtoolkit[train]"; an ONNX export is served without it (kd predict '
        "model.onnx)"
    )


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
    """Entry point of ``kd``; plugins add their commands (see ``wants_plugin_commands``)."""
    run_app(app, plugin_commands=wants_plugin_commands(sys.argv[1:]))


def wants_plugin_commands(args: list[str]) -> bool:
    """Whether ``kd ARGS`` loads the installed plugins first (their commands, a warning per
    broken one): always but for ``--version``. Loading them imports no training stack."""
    return args != ["--version"]
