"""How fast the ``kd`` command answers, against bare Python and ``import torch``, measured side
by side in one run (interleaved rounds, median wall time of each command).

    python benchmarks/cli_startup.py [--rounds 5] [--recipe recipes/sos-quick.toml]

Each command runs in a fresh interpreter, as a user types it; the table gives its median
seconds, its ratio to ``python -c pass`` and to ``python -c "import torch"``, and whether it
imported torch (``-X importtime``).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
KD = [sys.executable, "-m", "kdtoolkit.cli"]


def commands(recipe: str) -> dict[str, list[str]]:
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "kd --version": [*KD, "--version"],
        "kd --help": [*KD, "--help"],
        "kd plugins": [*KD, "plugins"],
        f"kd validate {recipe}": [*KD, "validate", recipe],
    }


def seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, cwd=ROOT)
    return time.perf_counter() - started


def imports_torch(command: list[str]) -> bool:
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, cwd=ROOT
    )
    return any(re.search(r"\|\s+torch$", line.rstrip()) for line in done.stderr.splitlines())


def main(
    rounds: Annotated[int, typer.Option(min=1, help="Runs of each command.")] = 5,
    recipe: Annotated[str, typer.Option(help="The recipe kd validate checks.")] = (
        "recipes/sos-quick.toml"
    ),
) -> None:
    todo = commands(recipe)
    times: dict[str, list[float]] = {name: [] for name in todo}
    for _ in range(rounds):  # interleaved: a load change touches every command alike
        for name, command in todo.items():
            times[name].append(seconds(command))
    median = {name: statistics.median(t) for name, t in times.items()}
    bare, torch_time = median["python -c pass"], median["python -c 'import torch'"]
    table = Table(
        title=f"kd startup, median of {rounds} runs ({sys.platform}, {sys.version.split()[0]})"
    )
    for column in ("command", "s", "× python -c pass", "× import torch", "imports torch"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, command in todo.items():
        table.add_row(
            name,
            f"{median[name]:.2f}",
            f"{median[name] / bare:.1f}",
            f"{median[name] / torch_time:.2f}",
            "yes" if imports_torch(command) else "no",
        )
    Console().print(table)


if __name__ == "__main__":
    from kdtoolkit.cli import run_app

    app = typer.Typer(add_completion=False)
    app.command()(main)
    run_app(app)
