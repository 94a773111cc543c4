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
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

from kdtoolkit.config.recipe import ModelConfig, load_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.device import autocast
from kdtoolkit.engine.loss import build_loss, cross_entropy
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.train import Stage, make_context
from kdtoolkit.models.backbone import build_backbone

ROLES = {"teacher": "crop", "student": "image", "baseline": "image"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(ctx: RunContext, config: ModelConfig) -> torch.nn.Module:
    options = dict(config.backbone_options)
    return build_backbone(config.backbone, ctx.num_classes, ctx.view.channels, options)


def measure(ctx: RunContext, role: str, batches: int) -> dict[str, float]:
    """Images/s of view building alone and of full training steps of ``role``."""
    r, device = ctx.recipe, ctx.device
    config = r.teacher if role == "teacher" else r.student
    view = ROLES[role]
    loss = build_loss(r.loss) if role == "student" else cross_entropy()
    teacher = _model(ctx, r.teacher).to(device).eval() if loss.needs_teacher else None
    views = ("image", "crop") if teacher is not None else (view,)
    train_idx = ctx.fold_indices(0)[0]
    loader = ctx.loaders(train_idx, True, config.batch_size, seed=0, views=views)
    model = _model(ctx, config).to(device).train()
    loss.setup(model.num_features, teacher.num_features if teacher is not None else None)
    loss.to(device)
    stage = Stage(role, model, view, loss, config, teacher=teacher)
    params = [*model.parameters(), *loss.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def batch_stream():
        epoch = 0
        while True:
            loader.dataset.set_epoch(epoch)
            yield from loader
            epoch += 1

    out = {}
    for what in ("views", "step"):
        stream, images = batch_stream(), 0
        for i in range(batches + 1):
            if i == 1:  # after one warm-up batch
                _sync(device)
                started, images = time.perf_counter(), 0
            batch = next(stream)
            if what == "step":
                with autocast(device):
                    total, _ = loss(make_context(stage, batch, device))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
            else:
                batch[view].to(device)
            images += len(batch["label"])
        _sync(device)
        out[what] = images / (time.perf_counter() - started)
    return out


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Recipe override (repeatable).")
    ] = None,
    role: Annotated[str, typer.Option(help="teacher, student or baseline.")] = "student",
    batches: Annotated[int, typer.Option(min=1, help="Timed batches per measurement.")] = 20,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    if role not in ROLES:
        raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in ("workers", "device"):
            extra = [
                f"data.loader='{path}'",
                f"experiment.device='{device}'",
                f"experiment.output='{Path(scratch) / path}'",
            ]
            r = load_recipe(recipe, [*(overrides or []), *extra])
            with RunProgress(Path(scratch) / f"{path}.log", quiet=True) as progress:
                ctx = RunContext.open(r, progress)
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
