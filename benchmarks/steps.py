"""What the benchmarks share: a run context of a recipe in a scratch folder, the models and
loss of a training stage, an endless batch stream and a timer of training steps."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer

from kdtoolkit.config.recipe import ModelConfig, load_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.distributed import data_parallel
from kdtoolkit.engine.loss import build_loss, cross_entropy
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.train import Stage, make_context
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.device import autocast, channels_last, compile_trunk

#: The command-line arguments every benchmark takes: the recipe, ``--set`` overrides, ``--device``.
RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML file.")]
SetOption = Annotated[list[str] | None, typer.Option("--set", help="Recipe override (repeatable).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]

#: What each role sees.
ROLES = {"teacher": "crop", "student": "image", "baseline": "image"}

Batch = dict[str, torch.Tensor]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def open_context(
    recipe: Path, overrides: list[str], scratch: Path, name: str = "run"
) -> Iterator[RunContext]:
    """The ``RunContext`` of ``recipe`` with ``overrides``, its run folder in ``scratch``."""
    r = load_recipe(recipe, [*overrides, f"experiment.output='{scratch / name}'"])
    with RunProgress(scratch / f"{name}.log", quiet=True) as progress:
        yield RunContext.open(r, progress)


def build_model(ctx: RunContext, config: ModelConfig) -> torch.nn.Module:
    """A freshly initialised model of ``config`` for the run's classes and channels."""
    options = dict(config.backbone_options)
    return build_backbone(config.backbone, ctx.num_classes, ctx.view.channels, options)


@dataclass
class StageSetup:
    """A stage ready to step: model, loss (teacher frozen when its terms need one), the
    engine's forward wrapper, optimiser and fold 0's training loader."""

    stage: Stage
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    device: torch.device

    def step(self, batch: Batch) -> None:
        """One training step of the engine on ``batch``."""
        with autocast(self.device):
            total, _ = self.stage.loss(make_context(self.stage, batch, self.device, self.net))
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()

    def batches(self) -> Iterator[Batch]:
        """Fold 0's training batches, epoch after epoch, forever."""
        epoch = 0
        while True:
            self.loader.dataset.set_epoch(epoch)
            yield from self.loader
            epoch += 1


def stage_setup(ctx: RunContext, role: str, compiled: bool = False) -> StageSetup:
    """``role`` (teacher: crops and CE; student: full images, the recipe's loss and a frozen
    teacher; baseline: full images, CE) as the engine trains it; ``compiled``: its trunk
    compiled (``experiment.compile``)."""
    r, device = ctx.recipe, ctx.device
    config = r.teacher if role == "teacher" else r.student
    view = ROLES[role]
    loss = build_loss(r.loss) if role == "student" else cross_entropy()
    teacher = None
    if loss.needs_teacher:
        teacher = channels_last(build_model(ctx, r.teacher).to(device), device)
        teacher.eval().requires_grad_(False)
    views = ("image", "crop") if teacher is not None else (view,)
    loader = ctx.loaders(ctx.fold_indices(0)[0], True, config.batch_size, seed=0, views=views)
    model = channels_last(build_model(ctx, config).to(device), device).train()
    if compiled:
        compile_trunk(model, device)
    loss.setup(model.num_features, teacher.num_features if teacher is not None else None)
    loss.to(device)
    stage = Stage(role, model, view, loss, config, teacher=teacher)
    params = [*model.parameters(), *loss.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    return StageSetup(stage, data_parallel(model, loss, device), optimizer, loader, device)


def images_per_second(
    step: Callable[[], int], steps: int, device: torch.device, warmup: int = 1
) -> float:
    """Images/s of ``steps`` calls of ``step`` (each returns its batch's image count) after
    ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    started, images = time.perf_counter(), 0
    for _ in range(steps):
        images += step()
    sync(device)
    return images / (time.perf_counter() - started)
