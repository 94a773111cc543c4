"""Live progress of a run (rich) and its log file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

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

    ``quiet`` keeps the log file and drops the live view (for scripts and CI). ``held``: the
    log file is neither made nor written until ``commit`` (a run that is refused before it
    starts leaves no log); held lines are written then, or dropped.
    """

    def __init__(self, log_path: Path, quiet: bool = False, held: bool = False) -> None:
        self.log_path = Path(log_path)
        self._held: list[str] | None = [] if held else None
        self._log: TextIO | None = None
        if not held:
            self.commit()
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
        if self._log is not None:
            self._log.close()

    def commit(self) -> None:
        """Open the log file (making its folder) and write the lines held so far."""
        if self._log is not None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        for line in self._held or []:
            self._write(line)
        self._held = None

    def _write(self, line: str) -> None:
        if self._log is None:
            assert self._held is not None
            self._held.append(line)
            return
        self._log.write(line)
        self._log.flush()

    def log(self, message: str) -> None:
        """A line in the log file and above the live bars."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(f"{stamp} {message}\n")
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
        hidden = ("lr", "epoch_seconds", "images_per_second")
        shown = {k.removeprefix("train_"): v for k, v in record.items() if k not in hidden}
        info = " ".join(f"{k}={v:.3f}" for k, v in shown.items() if isinstance(v, float))
        if self._stage is not None:
            self.progress.update(self._stage, completed=epoch, info=info)
        self._write(f"{time.strftime('%H:%M:%S')} {description} epoch {epoch}: {info}\n")

    def advance_stage(self) -> None:
        """One more step of the current stage (e.g. one image decoded)."""
        if self._stage is not None:
            self.progress.advance(self._stage)

    def end_stage(self) -> None:
        if self._stage is not None:
            self.progress.remove_task(self._stage)
            self._stage = None
        self.advance_run()
