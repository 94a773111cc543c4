"""Built-in plugin: the ``tensorboard`` run logger (needs ``kdtoolkit[tensorboard]``).

Event files under the run folder's ``tb/``: one TensorBoard run per fold and stage
(``tb/fold_<k>/<stage>``, a scalar per epoch), and ``tb/results`` with the final metrics, the
recipe as hyperparameters (the HPARAMS tab), the report as text and the figures as images.
``tensorboard --logdir runs/`` shows every run side by side.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.logger import RunInfo, RunLogger, relative_inside

PREFIXES = ("train_", "val_", "grad_share_")


def tag_of(name: str) -> str:
    """``train_loss`` → ``train/loss``, ``val_accuracy`` → ``val/accuracy``; others as they
    are (``lr``, ``epoch_seconds``)."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return f"{prefix[:-1]}/{name[len(prefix) :]}"
    return name


def hparam_value(value: Any) -> Any:
    """A recipe value as TensorBoard takes a hyperparameter: number, bool or text."""
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


class TensorBoardLogger(RunLogger):
    """Event files in ``tb/`` of the run folder (``folder``: another name, relative to it)."""

    requires = {"tensorboard": "tensorboard"}

    def __init__(self, folder: str = "tb") -> None:
        self.folder = folder
        self.root = relative_inside("folder", folder)
        self.writers: dict[tuple[int, str], Any] = {}
        self.params: dict[str, Any] = {}
        self.results: Any = None

    def writer(self, log_dir: Path, purge_step: int | None = None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def start(self, run: RunInfo) -> None:
        self.root = run.run_dir / self.folder
        self.params = {k: hparam_value(v) for k, v in run.params.items()}
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (missing: fail now)

    def log_epoch(self, fold: int, stage: str, epoch: int, scalars: dict[str, float]) -> None:
        key = (fold, stage)
        if key not in self.writers:
            # events of this epoch and later from an interrupted attempt are dropped on reading
            self.writers[key] = self.writer(self.root / f"fold_{fold}" / stage, purge_step=epoch)
        writer = self.writers[key]
        for name, value in scalars.items():
            writer.add_scalar(tag_of(name), value, epoch)
        writer.flush()

    def log_results(self, metrics: dict[str, float], results: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        folder = self.root / "results"
        if self.results is not None:
            self.results.close()
        shutil.rmtree(folder, ignore_errors=True)  # the latest results only
        self.results = writer = self.writer(folder)
        for summary in hparams(self.params, metrics):
            writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            writer.add_scalar(name, value, 0)
        writer.flush()

    def log_artifacts(self, paths: list[Path]) -> None:
        from PIL import Image

        if self.results is None:
            return
        for path in paths:
            if path.suffix == ".md":
                self.results.add_text(path.stem, path.read_text(encoding="utf-8"), 0)
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.results.add_image(f"figures/{path.stem}", pixels, 0, dataformats="HWC")
        self.results.flush()

    def close(self, status: str) -> None:
        for writer in [*self.writers.values(), self.results]:
            if writer is not None:
                writer.close()
        self.writers, self.results = {}, None


@hookimpl
def kd_register_loggers(registry):
    registry.register("tensorboard", TensorBoardLogger)
