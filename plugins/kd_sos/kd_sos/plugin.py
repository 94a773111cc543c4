"""Hook implementations of the kd-sos plugin: the ``sos`` task and the ``kd sos`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdtoolkit import hookimpl


@hookimpl
def kd_register_tasks(registry: Any) -> None:
    from kd_sos.task import SOS_TASK

    registry.register("sos", SOS_TASK)


def phantom_command(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder for images/ and manifest.csv.")
    ],
    n: Annotated[int, typer.Option(help="Number of slices (>= 1).")] = 723,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (64-4096).")] = 256,
    crops: Annotated[bool, typer.Option(help="Also write the expert ROI crops.")] = False,
    difficulty: Annotated[
        str,
        typer.Option(
            help="paper: global maturity cues as on real scans; hard: only the synchondrosis."
        ),
    ] = "paper",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="png: 2D slices; dicom or nifti: each slice as the central sagittal slice of a "
            "small scan (manifest slice = mid; the PNGs stay in OUT/png).",
        ),
    ] = "png",
    force: Annotated[
        bool, typer.Option(help="Replace a phantom made in OUT with other settings.")
    ] = False,
) -> None:
    """Generate the synthetic SOS phantom (reused when OUT already holds the same one)."""
    from kd_sos.volumes import FORMATS, ensure_volumes
    from kdtoolkit.errors import KdError

    if fmt not in FORMATS:
        raise KdError(f"--format {fmt}: unknown format — use one of: {', '.join(FORMATS)}")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from kd_sos.phantom import ensure_phantom, preset

    regime = preset(difficulty)  # an unknown name is a one-line error before any work
    if out.exists() and not out.is_dir():
        raise KdError(f"{out}: is a file; give a folder for the phantom")
    console = Console(stderr=True)
    with Progress(
        "[bold]phantom",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("phantom", total=n)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            if fmt == "png":
                manifest = ensure_phantom(
                    out, n, seed, size, crops, regime, progress=advance, replace=force
                )
            else:
                manifest = ensure_volumes(
                    out, fmt, n, seed, size, crops, progress=advance, difficulty=difficulty
                )
        except OSError as e:
            where = e.filename or out
            raise KdError(
                f"{where}: cannot be written ({e.strerror}); choose another OUT"
            ) from None
    generated = bar.tasks[task].completed > 0
    verb = "wrote" if generated else "reused"
    kind = "slices" if fmt == "png" else f"{fmt} scans"
    typer.echo(f"{verb} {n} {kind}; manifest: {manifest}")


@hookimpl
def kd_register_commands(app: Any) -> None:
    sos = typer.Typer(help="SOS fusion staging: the synthetic phantom.", no_args_is_help=True)
    sos.command("phantom")(phantom_command)
    app.add_typer(sos, name="sos")
