"""Training throughput with per-sample views (``data.loader = "workers"``) against
device-resident views (``"device"``), measured side by side in one run.

    python benchmarks/data_path.py RECIPE [--set key=value ...] [--role student]
        [--batches 20] [--device auto]

For each data path it times ``--batches`` batches of fold 0's training part (after one warm-up
batch): building the views alone, then a full training step of ``--role`` (``teacher``: crops,
CE; ``student``: full images with the recipe's loss and a frozen teacher; ``baseline``: full
images, CE) with bf16 autocast on CUDA. Prints images/s per path and the ratio. Models are
freshly initialised: this measures speed, not accuracy.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from steps import (
    ROLES,
    DeviceOption,
    RecipeArg,
    SetOption,
    images_per_second,
    open_context,
    stage_setup,
)

from kdtoolkit.engine.context import RunContext


def measure(ctx: RunContext, role: str, batches: int) -> dict[str, float]:
    """Images/s of view building alone and of full training steps of ``role``."""
    setup = stage_setup(ctx, role)
    view = setup.stage.view
    out = {}
    for what in ("views", "step"):
        stream = setup.batches()

        def step(what: str = what, stream=stream) -> int:
            batch = next(stream)
            if what == "step":
                setup.step(batch)
            else:
                batch[view].to(ctx.device)
            return len(batch["label"])

        out[what] = images_per_second(step, batches, ctx.device)
    return out


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    recipe: RecipeArg,
    overrides: SetOption = None,
    role: Annotated[str, typer.Option(help="teacher, student or baseline.")] = "student",
    batches: Annotated[int, typer.Option(min=1, help="Timed batches per measurement.")] = 20,
    device: DeviceOption = "auto",
) -> None:
    if role not in ROLES:
        raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in ("workers", "device"):
            extra = [f"data.loader='{path}'", f"experiment.device='{device}'"]
            with open_context(recipe, [*(overrides or []), *extra], Path(scratch), path) as ctx:
                rows.append((path, measure(ctx, role, batches)))
    table = Table(title=f"{recipe.name}, {role}, {batches} batches, {ctx.device}")
    for column in ("data path", "views img/s", "training step img/s"):
        table.add_column(column, justify="right")
    for path, speed in rows:
        table.add_row(path, f"{speed['views']:.0f}", f"{speed['step']:.0f}")
    base, fast = rows[0][1], rows[1][1]
    table.add_row(
        "device / workers",
        f"{fast['views'] / base['views']:.2f}×",
        f"{fast['step'] / base['step']:.2f}×",
    )
    console.print(table)


if __name__ == "__main__":
    from kdtoolkit.cli import run_app

    sys.exit(run_app(app))
