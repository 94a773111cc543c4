"""Live progress of a run (rich) and its log file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RunProgress:
    """Fold/stage/epoch bars with each loss term, mirrored to ``run.log``.

    ``quiet`` keeps the log file and drops the live view (for scripts and CI).
    """

    def __init__(self, log_path: Path, quiet: bool = False) -> None:
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=quiet,
        )
        self._overall: TaskID | None = None
        self._stage: TaskID | None = None

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()
        self._log.close()

    def log(self, message: str) -> None:
        """A line in the log file and above the live bars."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._log.write(f"{stamp} {message}\n")
        self._log.flush()
        self.progress.console.print(message, highlight=False)

    def start_run(self, total_stages: int) -> None:
        self._overall = self.progress.add_task("run", total=total_stages, info="")

    def advance_run(self) -> None:
        if self._overall is not None:
            self.progress.advance(self._overall)

    def start_stage(self, description: str, epochs: int) -> None:
        if self._stage is not None:
            self.progress.remove_task(self._stage)
        self._stage = self.progress.add_task(description, total=epochs, info="")

    def epoch(self, epoch: int, record: dict[str, Any], description: str) -> None:
        shown = {k.removeprefix("train_"): v for k, v in record.items() if k != "lr"}
        info = " ".join(f"{k}={v:.3f}" for k, v in shown.items() if isinstance(v, float))
        if self._stage is not None:
            self.progress.update(self._stage, completed=epoch, info=info)
        self._log.write(f"{time.strftime('%H:%M:%S')} {description} epoch {epoch}: {info}\n")
        self._log.flush()

    def advance_stage(self) -> None:
        """One more step of the current stage (e.g. one image decoded)."""
        if self._stage is not None:
            self.progress.advance(self._stage)

    def end_stage(self) -> None:
        if self._stage is not None:
            self.progress.remove_task(self._stage)
            self._stage = None
        self.advance_run()
