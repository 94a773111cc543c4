"""``kd data``: dataset commands (import annotations as a manifest, check a data set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import check_parent

console = Console()

data_app = typer.Typer(
    name="data",
    help="Dataset tools: import annotations into manifest.csv, check a data set.",
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

    target = check_parent((output or images / "manifest.csv").expanduser().resolve(), "manifest")
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


@data_app.command("check")
def check(
    manifest: Annotated[
        Path, typer.Argument(metavar="MANIFEST", help="manifest.csv or the folder holding it.")
    ],
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="Recipe whose \\[data] keys (slice, window, spacing_mm, ...), classes, "
            "crop size and cv.folds to check with."
        ),
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="Folds each class must fill.", show_default="5 or cv.folds")
    ] = None,
    sheet: Annotated[
        Path | None,
        typer.Option(help="Contact sheet PNG to write.", show_default="MANIFEST_check.png"),
    ] = None,
    per_class: Annotated[int, typer.Option(help="Images per class on the sheet.")] = 4,
) -> None:
    """Read every image once and report every problem with its row (exit 2 if any), print a
    summary and write a contact sheet: images with their ROI and the teacher's crop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    from kdtoolkit.data.check import check_data, contact_sheet
    from kdtoolkit.data.scan import ReadSpec, read_spec

    read, classes, crop_size, k = ReadSpec(), None, (224, 224), 5
    if recipe is not None:
        from kdtoolkit.config.recipe import load_recipe

        loaded = load_recipe(recipe, [f"data.manifest={str(manifest)!r}"])
        read, crop_size, k = read_spec(loaded), loaded.size("crop"), loaded.cv.folds
        classes = loaded.data.classes or None
    if per_class < 1:
        raise KdError(f"--per-class {per_class}: give 1 or more images per class")
    given = Path(manifest).expanduser().resolve()
    folder = given if given.is_dir() else given.parent
    default = Path(f"{folder.name or 'manifest'}_check.png")
    target = check_parent((sheet or default).expanduser().resolve(), "contact sheet")
    if folds is not None:
        if folds < 2:
            raise KdError(f"--folds {folds}: give 2 or more folds")
        k = folds
    with Progress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def advance(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        result = check_data(manifest, classes, read, k, advance)
    for title, header, rows in result.tables:
        table = Table(*header, title=title, title_justify="left")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    found = result.manifest
    if found.samples:
        contact_sheet(found, target, crop_size, per_class)
        console.print(f"contact sheet: {target}", highlight=False, soft_wrap=True)
    if result.problems:
        for line in result.problems:
            console.print(f"[red]problem[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise KdError(
            f"{found.path}: {len(result.problems)} problem(s) — fix the rows listed above"
        )
    console.print(f"[green]ok[/]: {len(found.samples)} rows, no problem found", highlight=False)
