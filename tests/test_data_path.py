"""benchmarks/data_path.py: both data paths measured side by side, at a tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data_path.py"


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_prints_both_paths_and_their_ratio(tiny_recipe: Path) -> None:
    result = _bench(str(tiny_recipe), "--batches", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert {"workers", "device", "device / workers"} <= set(rows)
    ratios = [cell.strip() for cell in rows["device / workers"].split("│")[2:4]]
    assert all(r.endswith("×") and float(r[:-1]) > 0 for r in ratios)


def test_unknown_role_is_a_usage_error(tiny_recipe: Path) -> None:
    result = _bench(str(tiny_recipe), "--role", "pupil", "--device", "cpu")
    assert result.returncode == 2 and "--role must be one of" in result.stderr + result.stdout
