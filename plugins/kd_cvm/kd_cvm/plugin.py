"""Hook implementations of the kd-cvm plugin: the ``cvm`` task and the ``kd cvm`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kdtoolkit import hookimpl


@hookimpl
def kd_register_tasks(registry: Any) -> None:
    from kd_cvm.task import CVM_TASK

    registry.register("cvm", CVM_TASK)


def phantom_command(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="Folder for images/ and manifest.csv.")
    ],
    n: Annotated[int, typer.Option(help="Number of cephalograms (>= 1).")] = 600,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels (64-1024).")] = 128,
) -> None:
    """Generate the synthetic CVM phantom (reused when OUT already holds the same one)."""
    from kd_cvm.task import ensure_phantom
    from kdtoolkit import KdError

    if n < 1 or not 64 <= size <= 1024:
        raise KdError(f"phantom: need n >= 1 and 64 <= size <= 1024, got n={n}, size={size}")
    written = []
    manifest = ensure_phantom(
        out, n=n, seed=seed, size=size, progress=lambda i, t: written.append(i)
    )
    verb = "wrote" if written else "reused"
    typer.echo(f"{verb} {n} cephalograms; manifest: {manifest}")


def stages_command() -> None:
    """Print the six CVM stages (Baccetti) and what marks each."""
    from kd_cvm.task import CVM_TASK

    for name, text in zip(CVM_TASK.classes, CVM_TASK.descriptions, strict=True):
        typer.echo(f"{name}  {text}")


@hookimpl
def kd_register_commands(app: Any) -> None:
    cvm = typer.Typer(help="CVM staging: the synthetic cephalogram phantom.", no_args_is_help=True)
    cvm.command("phantom")(phantom_command)
    cvm.command("stages")(stages_command)
    app.add_typer(cvm, name="cvm")
