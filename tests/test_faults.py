"""Fault injection: every failure mode of docs/reliability.md, reproduced."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer

from kdtoolkit.cli import run_app
from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.resume import read_state
from kdtoolkit.engine.run import run
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_bytes
from kdtoolkit.models.checkpoint import load_model, save_checkpoint
from kdtoolkit.plugins.loss import CompositeLoss
from tests.conftest import RECIPE, kd, make_manifest

# A ``kd`` process that kills itself (SIGKILL) at a chosen file replacement: KD_KILL_AT is
# "NAME:N[:partial]": the N-th ``os.replace`` onto a file called NAME (relative to the run
# folder, e.g. fold_0/teacher/last.pt); with ``partial`` it dies before the replace, leaving a
# half-written temporary file (a kill during a checkpoint write); "detector:N" dies after
# ultralytics saved the detector's epoch N. Test-side only.
KILLER = """
import os, signal, sys
from kdtoolkit import cli
name, n, *mode = os.environ["KD_KILL_AT"].split(":")
seen = [0]
real = os.replace
def replace(src, dst, *a, **k):
    hit = str(dst).endswith(name)
    if hit:
        seen[0] += 1
    if hit and seen[0] == int(n) and mode:
        with open(src, "r+b") as fh:
            fh.truncate(max(1, os.path.getsize(src) // 2))
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst, *a, **k)
    if hit and seen[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
if name == "detector":  # inside detector training: right after ultralytics saves epoch N
    from ultralytics.engine.trainer import BaseTrainer
    real_save = BaseTrainer.save_model
    def save_model(self):
        real_save(self)
        seen[0] += 1
        if seen[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)
    BaseTrainer.save_model = save_model
sys.argv = ["kd", *sys.argv[1:]]
cli.main()
"""


def write_recipe(folder: Path, manifest: Path, name: str = "tiny.toml", **extra: str) -> Path:
    path = folder / name
    text = RECIPE.format(output=folder / "run", manifest=manifest)
    path.write_text(text)
    return path


def strip_timings(doc: object) -> object:
    """results.json without its timings (``latency_ms``: wall-clock, differs run to run)."""
    if isinstance(doc, dict):
        return {k: strip_timings(v) for k, v in doc.items() if "latency" not in k}
    if isinstance(doc, list):
        return [strip_timings(v) for v in doc]
    return doc


def kill_run(recipe: Path, at: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_KILL_AT": at}
    return subprocess.run(
        [sys.executable, "-c", KILLER, "run", str(recipe), "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# ---- exact resume after SIGKILL (items 4, 8) -------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_several_points_resumes_to_identical_results(tmp_path):
    """A tiny run killed (SIGKILL) inside teacher training, inside student training and in the
    middle of a checkpoint write, resumed each time, ends with the results.json of an
    uninterrupted run: equal except the ``latency_ms`` timings (wall-clock measurements)."""
    manifest = make_manifest(tmp_path / "data")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    ref = write_recipe(ref_dir, manifest)
    cut = write_recipe(cut_dir, manifest)
    done = kd("run", str(ref), "--quiet")
    assert done.returncode == 0, done.stderr
    kills = [
        "fold_0/teacher/last.pt:1",  # after teacher epoch 1
        "fold_0/student/last.pt:1",  # after student epoch 1
        "fold_1/student/model.safetensors:1:partial",  # mid-write of a checkpoint
    ]
    for at in kills:
        killed = kill_run(cut, at)
        assert killed.returncode == -signal.SIGKILL, (at, killed.stderr)
    assert list((cut_dir / "run" / "fold_1" / "student").glob(".model.safetensors.*"))
    resumed = kd("run", str(cut), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    log = (cut_dir / "run" / "run.log").read_text()
    assert "resuming after epoch 1" in log and "recovered the stale lock" in log
    expected = json.loads((ref_dir / "run" / "results.json").read_text())
    got = json.loads((cut_dir / "run" / "results.json").read_text())
    assert strip_timings(got) == strip_timings(expected)


@pytest.mark.slow
def test_sigkill_inside_detector_training_resumes_to_identical_results(tmp_path):
    """Killed while ultralytics trains the ROI detector (after its first of two epochs), the
    rerun trains the detector again from its start and ends with the uninterrupted results."""
    manifest = make_manifest(tmp_path / "data")
    yolo = [
        "cv.only=[0]",
        "teacher.epochs=1",
        "student.epochs=1",
        "evaluate.cam_examples=0",
        "evaluate.baseline=false",
        'roi.provider="yolo"',
        "roi.epochs=2",
        "roi.imgsz=64",
        "roi.batch=4",
        "roi.workers=0",
    ]
    results = []
    for name, kill in (("ref", None), ("cut", "detector:1")):
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(folder, manifest)
        sets = [arg for s in yolo for arg in ("--set", s)]
        if kill:
            killed = kill_run(recipe, kill, *sets)
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            assert (folder / "run" / "fold_0" / "teacher" / "model.safetensors").exists()
            assert not (folder / "run" / "fold_0" / "student").exists()
        done = kd("run", str(recipe), "--quiet", *sets)
        assert done.returncode == 0, done.stderr
        results.append(json.loads((folder / "run" / "results.json").read_text()))
    assert "map50" in results[0]["roi"]["0"]  # the detector was trained and evaluated
    assert strip_timings(results[1]) == strip_timings(results[0])


def test_damaged_resume_state_is_set_aside_and_named(tmp_path):
    logged: list[str] = []
    empty = tmp_path / "a" / "last.pt"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    assert read_state(empty, logged.append) is None
    assert (empty.parent / "last.pt.corrupt").exists() and not empty.exists()
    truncated = tmp_path / "b" / "last.pt"
    truncated.parent.mkdir()
    torch.save({"model": {"w": torch.zeros(100)}, "epoch": 1}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:50])
    assert read_state(truncated, logged.append) is None
    partial = tmp_path / "c" / "last.pt"
    partial.parent.mkdir()
    torch.save({"model": {}}, partial)
    assert read_state(partial, logged.append) is None
    assert len(logged) == 3 and all("set aside" in line for line in logged)
    assert str(empty) in logged[0] and str(truncated) in logged[1]


# ---- locks (item 5) ---------------------------------------------------------------------------


def test_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path, tiny_recipe):
    with RunLock(tmp_path / "run"):
        result = kd("run", str(tiny_recipe), "--quiet")
    assert result.returncode == 2, result.stderr
    assert f"process {os.getpid()}" in result.stderr and "in use" in result.stderr
    assert not (tmp_path / "run" / "run.log").exists()


def test_kd_compare_on_a_locked_folder_exits_2_naming_the_holder(tmp_path, tiny_recipe):
    out = tmp_path / "compare"
    with RunLock(out):
        result = kd("compare", str(tiny_recipe), "--variant", "paper:", "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert f"process {os.getpid()}" in result.stderr and "in use" in result.stderr
    assert not (out / "gap_closure.log").exists()


def test_stale_lock_of_a_dead_process_is_recovered(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.lock").write_text("process 999999 on elsewhere, since then: kd run x\n")
    with RunLock(folder) as lock:
        assert lock.recovered and "999999" in lock.recovered
    assert not (folder / "run.lock").exists()


# ---- non-finite training (item 2) ------------------------------------------------------------


def test_nan_loss_stops_the_stage_naming_stage_epoch_and_term(tmp_path, tiny_recipe, monkeypatch):
    original = CompositeLoss.forward

    def poisoned(self, ctx):
        total, parts = original(self, ctx)
        if self.needs_teacher:  # the student's terms
            return total * float("nan"), {**parts, "kl": float("nan")}
        return total, parts

    monkeypatch.setattr(CompositeLoss, "forward", poisoned)
    recipe = load_recipe(tiny_recipe, ["cv.only=[0]"])
    with pytest.raises(KdError, match=r"fold 0 student epoch 1: loss term 'kl' is nan"):
        run(recipe, quiet=True)
    assert (tmp_path / "run" / "fold_0" / "teacher" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "fold_0" / "student" / "model.safetensors").exists()


def test_non_finite_numbers_are_refused(tiny_recipe, tmp_path):
    for bad in ("teacher.lr=inf", "student.lr=nan", "student.epochs=1e23", "teacher.lr=1e6"):
        with pytest.raises(KdError, match=bad.split("=")[0]):
            load_recipe(tiny_recipe, [bad])
    with pytest.raises(KdError, match="not finite"):
        save_checkpoint(tmp_path / "m.safetensors", {"w": torch.tensor([float("nan")])}, {})


# ---- interrupts (item 3) ---------------------------------------------------------------------


def test_interrupt_of_any_command_exits_130_with_one_line(capsys):
    app = typer.Typer()

    @app.command()
    def slow() -> None:
        raise KeyboardInterrupt

    @app.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as exit_info:
        sys.argv = ["kd", "slow"]
        run_app(app)
    assert exit_info.value.code == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_during_kd_run_exits_130_saying_what_is_kept(tmp_path, tiny_recipe):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtoolkit.cli", "run", str(tiny_recipe), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.monotonic()
    while not (tmp_path / "run" / "fold_0" / "teacher").exists():
        assert proc.poll() is None and time.monotonic() - started < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err and str(tmp_path / "run") in err


# ---- recipe digest of reused outputs (item 6) ------------------------------------------------


def test_checkpoint_of_another_recipe_is_not_reused(tmp_path, tiny_recipe):
    ckpt = tmp_path / "run" / "fold_0" / "teacher" / "model.safetensors"
    save_checkpoint(ckpt, {"w": torch.zeros(1)}, {"recipe_digest": "0123456789abcdef"})
    with pytest.raises(KdError, match=r"fold 0 teacher: .* another recipe.*--force"):
        run(load_recipe(tiny_recipe), quiet=True)


# ---- data: duplicates, broken images (items 7, 9) ----------------------------------------------


def open_context(recipe: Path, tmp_path: Path) -> tuple[RunContext, str]:
    with RunProgress(tmp_path / "ctx.log", quiet=True) as progress:
        ctx = RunContext.open(load_recipe(recipe), progress)
    return ctx, (tmp_path / "ctx.log").read_text()


def test_duplicate_images_never_straddle_folds(tmp_path, tiny_manifest, tiny_recipe):
    data = tiny_manifest.parent
    rows = tiny_manifest.read_text().splitlines()
    header, body = rows[0].rsplit(",", 1)[0], [r.rsplit(",", 1)[0] for r in rows[1:]]
    shutil.copy(data / "img_004.png", data / "copy_of_4.png")
    body += [body[3], body[4].replace("img_004.png", "copy_of_4.png")]  # same path, same pixels
    tiny_manifest.write_text("\n".join([header, *body]) + "\n")
    ctx, log = open_context(tiny_recipe, tmp_path)
    assert "duplicate images" in log
    n = len(body)
    assert ctx.fold_of[3] == ctx.fold_of[n - 2] and ctx.fold_of[4] == ctx.fold_of[n - 1]
    for k in range(2):
        train, val, test = ctx.fold_indices(k)
        for a, b in ((3, n - 2), (4, n - 1)):
            assert {a, b} <= set(test) or not {a, b} & set(test)
            assert not ({a, b} & set(train) and {a, b} & set(val))


def test_broken_image_fails_before_training_naming_row_and_file(tmp_path, tiny_manifest):
    broken = tiny_manifest.parent / "img_007.png"
    broken.write_bytes(broken.read_bytes()[:60])
    recipe = write_recipe(tmp_path, tiny_manifest)
    with pytest.raises(KdError, match=r"row 9: .*img_007.png cannot be decoded"):
        run(load_recipe(recipe), quiet=True)
    assert not (tmp_path / "run" / "fold_0" / "teacher").exists()


# ---- safe loading of weights (item 1) ---------------------------------------------------------


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['KD_PAYLOAD']}",))


def test_pickled_roi_weights_cannot_run_code(tmp_path, monkeypatch):
    from kdtoolkit.builtin.yolo.provider import YoloProvider

    marker = tmp_path / "ran"
    monkeypatch.setenv("KD_PAYLOAD", str(marker))
    weights = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, weights)
    with pytest.raises(KdError, match="not loadable as plain weights"):
        YoloProvider(weights=str(weights))
    assert not marker.exists()


# ---- messages (item 10) ------------------------------------------------------------------------


def test_disk_full_names_the_file(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "out" / "results.json"
    with pytest.raises(KdError, match=f"{target}: cannot be written"):
        atomic_write_bytes(target, b"{}")


def test_cv_only_out_of_range_is_a_validate_error(tiny_recipe):
    with pytest.raises(KdError, match=r"cv.only: folds \[5\]"):
        load_recipe(tiny_recipe, ["cv.only=[5]"])


def test_checkpoint_metadata_not_matching_weights_is_one_line(tmp_path):
    from kdtoolkit.models.backbone import build_backbone

    model = build_backbone("resnet10t", 3, 1, {})
    meta = {"backbone": "resnet18", "classes": ["a", "b", "c"], "channels": 1}
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model.state_dict(), {**meta, "backbone_options": {}})
    with pytest.raises(KdError) as info:
        load_model(path)
    assert "\n" not in str(info.value) and "resnet18" in str(info.value)


def test_library_caches_stay_out_of_home():
    home = str(Path.home())
    assert not os.environ["MPLCONFIGDIR"].startswith(home)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "compare"])
def test_sigterm_during_kd_run_and_compare_is_handled_as_ctrl_c(tmp_path, tiny_recipe, command):
    """SIGTERM (a scheduler's stop) ends the command as Ctrl-C does: the same one line saying
    what is kept, exit 143 (128 + 15), and the rerun resumes."""
    args = [sys.executable, "-m", "kdtoolkit.cli", command, str(tiny_recipe), "--quiet"]
    out = tmp_path / ("run" if command == "run" else "run-gap_closure")
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while not (out / "fold_0" / "teacher").exists():
        assert proc.poll() is None and time.monotonic() - started < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "rerun the same command to resume" in err and str(out) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
