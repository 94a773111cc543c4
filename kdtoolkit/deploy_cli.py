"""``kd predict`` (and deployment commands): use a trained student outside the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kdtoolkit.errors import KdError

console = Console()
err_console = Console(stderr=True)


def predict_command(
    checkpoint: Annotated[Path, typer.Argument(help="A student checkpoint (.safetensors).")],
    paths: Annotated[list[Path], typer.Argument(help="Images or folders of images.")],
    cam: Annotated[Path | None, typer.Option(help="Write Grad-CAM overlay PNGs here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Stage full images with a student alone: no crops, no detector."""
    from kdtoolkit.engine.predict import predict as predict_images

    report = predict_images(checkpoint, paths, cam_dir=cam, device=device)
    if as_json:
        for r in report.results:
            print(json.dumps(r, allow_nan=False))
    else:
        table = Table(title=f"predictions of {checkpoint.name}")
        table.add_column("image")
        table.add_column("class")
        table.add_column("p", justify="right")
        for r in report.results:
            table.add_row(r["image"], r["class"], f"{r['probabilities'][r['class']]:.3f}")
        console.print(table)
    for path, reason in report.skipped:
        err_console.print(f"[yellow]skipped[/] {path}: {reason}", highlight=False, soft_wrap=True)
    if report.skipped:
        raise KdError(
            f"{len(report.skipped)} of {len(report.skipped) + len(report.results)} images could "
            "not be read (listed above); the others were predicted"
        )
