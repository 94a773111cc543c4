"""``kd data``: dataset commands (import annotations as a manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kdtoolkit.errors import KdError

console = Console()

data_app = typer.Typer(
    name="data",
    help="Dataset tools: import annotations into manifest.csv.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@data_app.command("import")
def import_(
    fmt: Annotated[str, typer.Argument(metavar="FORMAT", help="yolo, yolo-obb, coco or cvat.")],
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE", help="Annotation file (COCO .json, CVAT .xml) or YOLO labels folder."
        ),
    ],
    images: Annotated[Path, typer.Option(help="Folder holding the annotated images.")],
    labels: Annotated[
        Path | None, typer.Option(help="CSV with image,label columns (else the box classes).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Manifest to write.", show_default="IMAGES/manifest.csv"
        ),
    ] = None,
    roi_class: Annotated[
        str | None, typer.Option(help="Keep only the boxes of this class as the ROI.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing manifest.")] = False,
) -> None:
    """Convert annotations to manifest.csv (image, label, x0,y0,x1,y1, angle): one ROI per
    image, rotated boxes in the manifest's angle convention."""
    from kdtoolkit.data.annotation import to_rows, write_manifest
    from kdtoolkit.data.annotation_formats import read_annotations

    target = (output or images / "manifest.csv").expanduser().resolve()
    if target.exists() and not force:
        raise KdError(f"{target}: already exists — pass --force to overwrite or -o another path")
    annotations = read_annotations(fmt.lower(), source, images)
    rows = to_rows(annotations, images, labels=labels, roi_class=roi_class)
    if not rows:
        raise KdError(
            f"{source}: no boxes found"
            + (f" of class '{roi_class}'" if roi_class else "")
            + " — check the format and the annotation file"
        )
    write_manifest(rows, target)
    boxed = sum(row.box is not None for row in rows)
    rotated = sum(row.box is not None and row.angle != 0 for row in rows)
    console.print(
        f"[green]wrote[/] {target}: {len(rows)} rows, {boxed} with a box ({rotated} rotated), "
        f"{len(rows) - boxed} without",
        highlight=False,
        soft_wrap=True,
    )
