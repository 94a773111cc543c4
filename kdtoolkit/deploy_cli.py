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
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A student checkpoint (.safetensors), or a run folder: its fold students averaged."
        ),
    ],
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Images, DICOM files or series folders, NIfTI volumes, or folders of them."
        ),
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="Also predict every row of this manifest.csv, read as in training."),
    ] = None,
    calibrated: Annotated[
        bool, typer.Option(help="Divide the logits by the temperature fitted on validation.")
    ] = True,
    cam: Annotated[Path | None, typer.Option(help="Write Grad-CAM overlay PNGs here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Stage full images with a student alone: no crops, no detector."""
    from kdtoolkit.engine.serve import predict as predict_images

    report = predict_images(
        checkpoint,
        paths or [],
        cam_dir=cam,
        device=device,
        manifest=manifest,
        calibrated=calibrated,
    )
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
