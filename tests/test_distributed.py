"""Data-parallel runs (``kd run --nproc``, torchrun, gloo on CPU): each rank's part of every
global batch, DDP gradients equal to one process's (Grad-CAM term included), rank 0 alone
writing, and the one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdtoolkit.cli import app, run_app
from kdtoolkit.cli.experiment import without_nproc
from kdtoolkit.config.recipe import LossConfig, ModelConfig, load_recipe
from kdtoolkit.data.bank import BankDataset, BankLoader, ImageBank, rank_slice
from kdtoolkit.data.manifest import read_manifest
from kdtoolkit.data.view import view_config
from kdtoolkit.engine import distributed
from kdtoolkit.engine.loaders import Loaders
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.run import run
from kdtoolkit.engine.train import Stage, make_context
from kdtoolkit.plugins.loss import CompositeLoss
from kdtoolkit.testing import TinyBackbone
from kdtoolkit.testing import kd_cli as kd  # torchrun: processes of their own

#: One fold, one epoch of three steps (12 training images, batches of 4), a small
#: BatchNorm-free backbone: gloo has no synchronised batch norm, so with one the processes
#: would normalise their parts apart and the weights would differ from one process's.
DDP_SETS = [
    "teacher.backbone='test_convnext'",
    "student.backbone='test_convnext'",
    "teacher.epochs=1",
    "student.epochs=1",
    "teacher.batch_size=4",
    "student.batch_size=4",
    "cv.only=[0]",
    "evaluate.baseline=false",
    "data.crop_size=[32, 32]",
]


def test_rank_slices_cover_a_batch_in_order() -> None:
    for total, size in ((8, 2), (7, 2), (5, 3), (2, 4)):
        parts = [list(range(total))[rank_slice(total, r, size)] for r in range(size)]
        assert sum(parts, []) == list(range(total))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_rank_parts_make_the_global_batches(
    tiny_recipe: Path, loader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both data paths: the parts of rank 0 and rank 1, put together, are one process's
    batches (same order, same augmentation and noise)."""
    recipe = load_recipe(tiny_recipe, [f"data.loader='{loader}'"])
    manifest = read_manifest(Path(recipe.data.manifest), recipe.data.classes)
    loaders = Loaders(
        manifest.samples, view_config(recipe), torch.device("cpu"), recipe.data, print
    )
    indices = np.arange(20)

    def batches(rank: int, size: int) -> list[dict[str, torch.Tensor]]:
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("RANK", str(rank))
        made = loaders(indices, True, 8, seed=3)
        made.dataset.set_epoch(1)
        return list(made)

    whole, zero, one = batches(0, 1), batches(0, 2), batches(1, 2)
    assert len(whole) == len(zero) == len(one) == 2
    for full, a, b in zip(whole, zero, one, strict=True):
        assert len(a["label"]) == len(b["label"]) == 4
        for key in ("image", "crop", "label", "index", "box"):
            torch.testing.assert_close(torch.cat([a[key], b[key]]), full[key])


def test_bank_noise_of_a_part_is_the_global_batch_s(tiny_recipe: Path) -> None:
    recipe = load_recipe(tiny_recipe, ["augment.noise=0.2"])
    manifest = read_manifest(Path(recipe.data.manifest), recipe.data.classes)
    cfg, cpu = view_config(recipe), torch.device("cpu")
    bank = ImageBank(manifest.samples, cfg.channels, cpu)
    dataset = BankDataset(bank, None, manifest.samples, range(12), cfg, True, 0, views=("image",))

    def images(rank: int, size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        made = BankLoader(dataset, 6, True, True, gen, rank, size)
        return torch.cat([b["image"] for b in made])

    parts = [images(r, 3) for r in range(3)]
    whole = images(0, 1).view(2, 6, *parts[0].shape[1:])
    joined = torch.stack([p.view(2, 2, *p.shape[1:]) for p in parts], 1)
    torch.testing.assert_close(joined.reshape(whole.shape), whole)


def gradcam_setup() -> tuple[TinyBackbone, CompositeLoss, dict[str, torch.Tensor]]:
    """A tiny student, the Grad-CAM term alone, and a batch of 8 with masks."""
    torch.manual_seed(0)
    model = TinyBackbone(3, 1)
    loss = build_loss([LossConfig(name="attention_mse", weight=1.0)])
    gen = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(8, 1, 32, 32, generator=gen),
        "label": torch.arange(8) % 3,
        "mask": (torch.rand(8, 1, 32, 32, generator=gen) > 0.5).float(),
    }
    return model, loss, batch


def gradcam_rank(rank: int, port: int, out: Path) -> None:
    """Rank ``rank`` of 2 (a forked process): its half of the batch through DDP."""
    env = {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, loss, batch = gradcam_setup()
    device = distributed.start(torch.device("cpu"))
    net = distributed.data_parallel(model, loss, device)
    assert isinstance(net, torch.nn.parallel.DistributedDataParallel)
    local = {k: v[distributed.part(len(batch["label"]))] for k, v in batch.items()}
    stage = Stage("student", model, "image", loss, ModelConfig())
    total, _ = loss(make_context(stage, local, device, net))
    total.backward()
    if distributed.is_main():
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    distributed.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradcam_term_gradient_under_ddp_equals_one_process(tmp_path: Path) -> None:
    """The attention term's second-order gradient (through the head, outside DDP's forward)
    averaged by DDP over 2 processes (gloo) equals the 1-process gradient of the batch."""
    out = tmp_path / "grads.pt"
    args = (free_port(), out)
    torch.multiprocessing.start_processes(gradcam_rank, args, 2, start_method="fork")
    ddp = torch.load(out)

    model, loss, batch = gradcam_setup()
    stage = Stage("student", model, "image", loss, ModelConfig())
    total, _ = loss(make_context(stage, batch, torch.device("cpu")))
    total.backward()
    one = {n: p.grad for n, p in model.named_parameters()}
    assert set(ddp) == set(one) and one["head.bias"] is None  # CAMs ignore the bias
    assert float(one["head.weight"].abs().sum()) > 0  # the second-order term's share
    for name in one:
        if one[name] is None:
            assert ddp[name] is None
        else:
            torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=1e-7)


def weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        role: load_file(folder / "fold_0" / role / "model.safetensors")
        for role in ("teacher", "student")
    }


@pytest.mark.parametrize("loader", ["workers", pytest.param("device", marks=pytest.mark.slow)])
def test_two_processes_train_as_one(tiny_recipe: Path, tmp_path: Path, loader: str) -> None:
    """``kd run --nproc 2`` (gloo): the same weights after one epoch as one process at the
    same global batch (per-sample or device-resident views), one results.json, and every file
    written by rank 0 alone."""
    sets = [*DDP_SETS, f"data.loader='{loader}'"]
    one = run(load_recipe(tiny_recipe, [*sets, f"experiment.output='{tmp_path / 'one'}'"]))
    sets = [arg for s in sets for arg in ("--set", s)]
    two = tmp_path / "two"
    done = kd("run", str(tiny_recipe), *sets, "--output", str(two), "--nproc", "2", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done") == 1  # rank 0 alone reports
    for role, mine in weights(two).items():
        theirs = weights(one.output)[role]
        assert set(mine) == set(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in two.rglob("results.json")) == ["results.json"]
    results = json.loads((two / "results.json").read_text())
    assert results["summary"].keys() == one.results["summary"].keys()
    lines = [line.split(" ", 2)[-1] for line in (two / "run.log").read_text().splitlines()]
    assert len(lines) == len(set(lines)) and any("fold 0 student: trained" in x for x in lines)
    assert sum("device cpu" in x for x in lines) == 1
    assert "2 processes train each stage, each on its part of a batch" in lines
    # what each stage wrote, the same files as one process (no rank's extra copies)
    files = {p.relative_to(two) for p in two.rglob("*") if p.is_file()}
    assert files == {p.relative_to(one.output) for p in one.output.rglob("*") if p.is_file()}


#: ``kd`` killed (SIGKILL) right after it first writes ``fold_0/teacher/last.pt``.
KILLED_AFTER_TEACHER_EPOCH_1 = """
import os, signal, sys
from kdtoolkit import cli
real = os.replace
def replace(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if str(dst).endswith("fold_0/teacher/last.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["kd", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.slow
def test_one_process_run_resumed_by_two_trains_as_one(tiny_recipe: Path, tmp_path: Path) -> None:
    """A run killed after the teacher's first epoch, resumed with ``--nproc 2`` from its
    ``last.pt``, ends with the weights of an uninterrupted one-process run."""
    sets = [*DDP_SETS, "teacher.epochs=2"]
    one = run(load_recipe(tiny_recipe, [*sets, f"experiment.output='{tmp_path / 'one'}'"]))
    cut = tmp_path / "cut"
    args = ["run", str(tiny_recipe), *(a for s in sets for a in ("--set", s)), "--quiet"]
    args += ["--output", str(cut)]
    command = [sys.executable, "-c", KILLED_AFTER_TEACHER_EPOCH_1, *args]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (cut / "fold_0" / "teacher" / "last.pt").exists()
    done = kd(*args, "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (cut / "run.log").read_text()
    assert "resuming after epoch 1" in log and "recovered the stale lock" in log
    for role, mine in weights(cut).items():
        for key, value in weights(one.output)[role].items():
            torch.testing.assert_close(mine[key], value, rtol=1e-4, atol=1e-5)


def test_batch_size_not_divisible_is_one_line(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Checked before any process starts (``kd run`` as the command line runs it)."""
    args = ["run", str(tiny_recipe), "--set", "student.batch_size=7", "--nproc", "2"]
    monkeypatch.setattr(sys, "argv", ["kd", *args])
    with pytest.raises(SystemExit) as ended:
        run_app(app)
    assert ended.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "student.batch_size" in lines[0] and "divisible" in lines[0]


def test_folds_as_jobs_with_nproc_is_refused_before_any_process_starts(
    tiny_recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = ["run", str(tiny_recipe), "--executor", "local", "--nproc", "2"]
    monkeypatch.setattr(sys, "argv", ["kd", *args])
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("torchrun was started"))
    with pytest.raises(SystemExit) as ended:
        run_app(app)
    assert ended.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "launch.executor" in lines[0] and "--executor inline" in lines[0]


def test_a_stray_rank_without_a_world_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == distributed.World() and distributed.is_main()


def test_ultralytics_trains_as_one_process_under_torchrun(tmp_path: Path) -> None:
    """Rank 0 alone trains a detector: ultralytics must not see torchrun's variables."""
    code = (
        "from pathlib import Path\n"
        "from kdtoolkit.builtin.yolo.session import ultralytics_session\n"
        f"with ultralytics_session(Path({str(tmp_path)!r})):\n"
        "    import ultralytics.utils as u\n"
        "    print(u.WORLD_SIZE, u.RANK, u.LOCAL_RANK)\n"
    )
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "-1", "-1"]


def test_nproc_is_dropped_from_the_processes_command() -> None:
    args = ["run", "r.toml", "--nproc", "2", "--set", "a=1", "--nproc=3", "--quiet"]
    assert without_nproc(args) == ["run", "r.toml", "--set", "a=1", "--quiet"]
    command = distributed.torchrun_command(2, without_nproc(args))
    assert command[:3] == ["--standalone", "--nproc-per-node=2", "-m"]
    assert command[3:] == ["kdtoolkit.cli", "run", "r.toml", "--set", "a=1", "--quiet"]
