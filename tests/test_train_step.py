"""benchmarks/train_step.py: the plain, student, data-path and compiled steps side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_prints_every_step_and_its_ratio_to_the_plain_one(tiny_recipe: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_recipe), "--steps", "1", "--device", "cpu"]
        + ["--no-compile"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 5:
            rows[cells[1]] = (float(cells[2]), cells[3])
    assert set(rows) == {
        "plain timm step (CE)",
        "student step (recipe losses, frozen teacher)",
        "student step + data path",
    }
    assert rows["plain timm step (CE)"][1] == "1.00×"
    assert all(speed > 0 and ratio.endswith("×") for speed, ratio in rows.values())
    assert "data path / student step:" in result.stdout
