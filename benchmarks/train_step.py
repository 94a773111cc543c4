"""Where a training step's time goes: the student's step against a plain timm step of the same
backbone, measured side by side in one run on the device found (or ``--device``).

    python benchmarks/train_step.py RECIPE [--set key=value ...] [--device auto] [--steps N]
        [--compile/--no-compile]

Rows (images/s, and the ratio to the plain step):

- plain timm step: ``timm.create_model(student.backbone)``, cross-entropy on random inputs of
  the student's size, AdamW; the ceiling of any student step;
- student step: the engine's step of the student with the recipe's loss terms (a frozen
  teacher, the Grad-CAM term) on one batch of real views held on the device;
- + data path: the same step with each batch's views built by the run's loaders
  (``data.loader``; device-resident on CUDA by default);
- compiled: the student step with ``experiment.compile`` (the trunk compiled, the Grad-CAM
  head eager), after the compilation (its seconds are printed).

All use bf16 autocast, channels-last memory and fused AdamW on CUDA (fp32 on the CPU), the
recipe's student batch size, fold 0's training images, freshly initialised models: this
measures speed, not accuracy. ``--steps``: timed steps per row (default 20 on CUDA, 2 on the
CPU, where recipes/sos-quick.toml takes about two minutes, most of it compiling).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import timm
import torch
import typer
from rich.console import Console
from rich.table import Table
from steps import (
    Batch,
    DeviceOption,
    RecipeArg,
    SetOption,
    StageSetup,
    images_per_second,
    open_context,
    stage_setup,
    sync,
)

from kdtoolkit.engine.context import RunContext
from kdtoolkit.models.device import autocast, channels_last


def plain_step(ctx: RunContext, steps: int) -> float:
    """Images/s of a plain timm cross-entropy step of the student backbone."""
    r, device = ctx.recipe, ctx.device
    config, size = r.student, r.size("image")
    options = dict(config.backbone_options)
    model = timm.create_model(
        config.backbone, num_classes=ctx.num_classes, in_chans=ctx.view.channels, **options
    )
    model = channels_last(model.to(device), device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x = channels_last(torch.randn(config.batch_size, ctx.view.channels, *size), device)
    x = x.to(device)
    y = torch.randint(0, ctx.num_classes, (config.batch_size,), device=device)

    def step() -> int:
        with autocast(device):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return len(y)

    return images_per_second(step, steps, device)


def held(setup: StageSetup) -> Batch:
    """One batch of real views, on the device."""
    batch = next(setup.batches())
    return {k: v.to(setup.device) for k, v in batch.items()}


def fixed_step(setup: StageSetup, steps: int, warmup: int = 1) -> float:
    """Images/s of the stage's step on one batch held on the device."""
    batch = held(setup)

    def step() -> int:
        setup.step(batch)
        return len(batch["label"])

    return images_per_second(step, steps, setup.device, warmup)


def streamed_step(setup: StageSetup, steps: int) -> float:
    """Images/s of the stage's step with every batch built by the loaders (the model warmed
    up by ``fixed_step``)."""
    stream = setup.batches()

    def step() -> int:
        batch = next(stream)
        setup.step(batch)
        return len(batch["label"])

    return images_per_second(step, steps, setup.device, warmup=0)


def compiled_step(ctx: RunContext, steps: int) -> tuple[float, float]:
    """(images/s, compile seconds) of the student step with its trunk compiled."""
    setup = stage_setup(ctx, "student", compiled=True)
    batch = held(setup)
    started = time.perf_counter()
    setup.step(batch)  # compiles forward and backward
    sync(ctx.device)
    seconds = time.perf_counter() - started
    return fixed_step(setup, steps, warmup=0), seconds


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    recipe: RecipeArg,
    overrides: SetOption = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Timed steps per row (20 on CUDA, 2 on CPU).")
    ] = None,
    device: DeviceOption = "auto",
    compile_: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Measure the compiled step too.")
    ] = True,
) -> None:
    """Images/s of a plain timm step, the student step, with the data path, and compiled."""
    console = Console()
    with tempfile.TemporaryDirectory() as scratch:
        sets = [*(overrides or []), f"experiment.device='{device}'"]
        with open_context(recipe, sets, Path(scratch)) as ctx:
            steps = steps or (20 if ctx.device.type == "cuda" else 2)
            rows = [("plain timm step (CE)", plain_step(ctx, steps))]
            student = stage_setup(ctx, "student")
            rows.append(
                ("student step (recipe losses, frozen teacher)", fixed_step(student, steps))
            )
            rows.append(("student step + data path", streamed_step(student, steps)))
            if compile_:
                speed, seconds = compiled_step(ctx, steps)
                rows.append((f"student step, compiled trunk ({seconds:.0f}s to compile)", speed))
    r = ctx.recipe
    size = "×".join(map(str, r.size("image")))
    title = (
        f"{recipe.name}: {r.student.backbone}, batch {r.student.batch_size}, {size}, "
        f"{steps} steps, {ctx.device}, torch {torch.__version__}"
    )
    table = Table(title=title)
    for column in ("step", "images/s", "× plain"):
        table.add_column(column, justify="right")
    plain = rows[0][1]
    for name, speed in rows:
        table.add_row(name, f"{speed:.1f}", f"{speed / plain:.2f}×")
    console.print(table)
    student_speed = rows[1][1]
    lines = [f"data path / student step: {rows[2][1] / student_speed:.2f}×"]
    if compile_:
        lines.append(f"compiled / eager student step: {rows[3][1] / student_speed:.2f}×")
    console.print("; ".join(lines), highlight=False)


if __name__ == "__main__":
    from kdtoolkit.cli import run_app

    sys.exit(run_app(app))
