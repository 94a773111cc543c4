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
            help="A student checkpoint (.safetensors), a run folder (its fold students "
            "averaged), or an ONNX export of kd export (served without torch)."
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
    allow_missing_folds: Annotated[
        bool,
        typer.Option(help="A run folder missing folds: average the folds it has (else an error)."),
    ] = False,
) -> None:
    """Stage full images with a student alone: no crops, no detector."""
    from kdtoolkit.serving.predict import predict as predict_images

    report = predict_images(
        checkpoint,
        paths or [],
        cam_dir=cam,
        device=device,
        manifest=manifest,
        calibrated=calibrated,
        allow_missing_folds=allow_missing_folds,
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


def export_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A model.safetensors of kd run (a run folder with --ensemble).")
    ],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx, torchscript or exported (.pt2).")
    ] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The file to write (default: beside the checkpoint)."),
    ] = None,
    run: Annotated[
        Path | None,
        typer.Option(help="Run folder: check parity on its held-out images (else synthetic)."),
    ] = None,
    features: Annotated[
        bool, typer.Option("--features", help="Output the feature map too (Grad-CAM).")
    ] = False,
    tolerance: Annotated[
        float, typer.Option(help="Largest allowed difference of a probability.")
    ] = 1e-4,
    samples: Annotated[int, typer.Option(help="Images in the parity check.")] = 8,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    ensemble: Annotated[
        bool,
        typer.Option(
            "--ensemble", help="Export a run folder's fold students as one graph (their mean)."
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Only check an existing export (-o) against the checkpoint."),
    ] = False,
) -> None:
    """Export a student (or teacher) for serving, with its preprocessing and a parity check."""
    from kdtoolkit.engine.export import FORMATS, export_model, verify_export

    if verify:
        if output is None:
            raise KdError("--verify checks an existing export: give it with -o PATH")
        parity = verify_export(checkpoint, output, run=run, tolerance=tolerance, samples=samples)
        console.print(f"parity ok: {output}: {parity.describe()}", highlight=False)
        return
    if fmt not in FORMATS:
        raise KdError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    result = export_model(
        checkpoint,
        output,
        fmt,
        features=features,
        run=run,
        tolerance=tolerance,
        samples=samples,
        opset=opset,
        ensemble=ensemble,
    )
    opset_text = f", opset {result.metadata['opset']}" if "opset" in result.metadata else ""
    outputs = ", ".join(o["name"] for o in result.metadata["outputs"])
    console.print(f"wrote {result.path} ({fmt}{opset_text}; outputs {outputs})", highlight=False)
    console.print(f"wrote {result.preprocess}", highlight=False)
    console.print(f"parity ok: {result.parity.describe()}", highlight=False)
