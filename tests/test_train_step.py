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
    plain = rows["plain timm step (CE)"][0]
    for speed, ratio in rows.values():  # each ratio from the printed speeds (each ±0.05)
        assert speed > 0 and ratio.endswith("×")
        low, high = within(speed, plain)
        assert low - 0.005 <= float(ratio.removesuffix("×")) <= high + 0.005, (speed, ratio)
    line = next(x for x in result.stdout.splitlines() if "data path / student step:" in x)
    printed = float(line.split("data path / student step:")[1].split("×")[0])
    low, high = within(
        rows["student step + data path"][0],
        rows["student step (recipe losses, frozen teacher)"][0],
    )
    assert low - 0.005 <= printed <= high + 0.005, line


def within(speed: float, plain: float) -> tuple[float, float]:
    """The range of ``speed / plain`` for speeds printed to one decimal."""
    return (speed - 0.05) / (plain + 0.05), (speed + 0.05) / max(plain - 0.05, 1e-9)
