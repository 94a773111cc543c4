"""No stage leaks into the next: torch's process-wide settings (threads, deterministic
algorithms, cuDNN and TF32 flags, default dtype, random states, the environment variables set
for them) are as they were after a stage's code changed them, a detector's training included."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.loss import cross_entropy
from kdtoolkit.engine.plan import teacher_spec
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.stage import train_model
from kdtoolkit.plugins.isolation import TORCH_ENV, torch_state
from kdtoolkit.plugins.roi import RoiRequest
from kdtoolkit.testing import TINY_RECIPE, tiny_manifest
from tests.test_yolo import rectangles


def settings() -> dict:
    """The process-wide settings ``torch_state`` keeps."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    return {
        "threads": torch.get_num_threads(),
        "interop": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill": torch.utils.deterministic.fill_uninitialized_memory,
        **{f"cudnn.{k}": getattr(cudnn, k) for k in ("deterministic", "benchmark", "enabled")},
        "cudnn.allow_tf32": cudnn.allow_tf32,
        "matmul.allow_tf32": matmul.allow_tf32,
        "precision": torch.get_float32_matmul_precision(),
        "dtype": torch.get_default_dtype(),
        **{k: os.environ.get(k) for k in TORCH_ENV},
    }


def ultralytics_threads() -> int:
    """The intra-op threads ultralytics sets for CPU training."""
    return min(8, max(1, (os.cpu_count() or 1) - 1))


@pytest.fixture
def unusual():
    """Non-default settings for the test (what a stage must give back), the defaults after."""
    saved = settings()
    torch.set_num_threads(3 if ultralytics_threads() == 2 else 2)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = True
    for k in TORCH_ENV:
        os.environ.pop(k, None)
    os.environ["OMP_NUM_THREADS"] = "2"
    yield settings()
    torch.set_num_threads(saved["threads"])
    torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
    torch.set_default_dtype(saved["dtype"])
    torch.backends.cudnn.benchmark = saved["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn.allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = saved["matmul.allow_tf32"]
    torch.set_float32_matmul_precision(saved["precision"])
    for k in TORCH_ENV:
        os.environ.pop(k, None)
        if saved[k] is not None:
            os.environ[k] = saved[k]


def change_everything() -> None:
    """What a detector's training library may do to the process."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_dtype(torch.float64)
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    os.environ["PYTHONHASHSEED"] = "0"
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.manual_seed(123)
    np.random.seed(123)


def test_torch_state_gives_back_every_setting_and_the_random_states(unusual) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    expected = torch.rand(3), np.random.random(3)
    torch.manual_seed(5)
    np.random.seed(5)
    with torch_state():
        change_everything()
        assert settings() != unusual
    assert settings() == unusual
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.random(3), expected[1])


def test_an_ultralytics_session_gives_them_back(tmp_path: Path, unusual) -> None:
    from kdtoolkit.builtin.yolo.session import ultralytics_session

    with ultralytics_session(tmp_path / "work", lambda line: None):
        change_everything()
    assert settings() == unusual


def train_teacher(folder: Path) -> dict[str, torch.Tensor]:
    """The tiny recipe's teacher on fold 0 (1 epoch), trained by the engine into ``folder``."""
    raw = {**TINY_RECIPE, "experiment": {**TINY_RECIPE["experiment"], "output": str(folder)}}
    raw["data"] = {**raw["data"], "manifest": str(tiny_manifest(folder / "data"))}
    recipe = load_recipe(raw)
    with RunProgress(folder / "run.log", quiet=True) as progress:
        ctx = RunContext.open(recipe, progress)
        train, val, _ = ctx.fold_indices(0)
        ckpt = train_model(ctx, 0, teacher_spec(recipe), cross_entropy(), (train, val))
    return load_file(ckpt)


@pytest.fixture
def detector(tmp_path: Path):
    """A tiny YOLO detector trained in this process (1 epoch, 64 px)."""
    from kdtoolkit.builtin.yolo.provider import YoloProvider

    def train() -> None:
        samples = rectangles(tmp_path / "images", 8)
        YoloProvider(epochs=1, imgsz=64, batch=4, conf=0.05, workers=0).provide(
            RoiRequest(
                fold=0,
                samples=samples,
                train=np.arange(6),
                predict=np.arange(8),
                workdir=tmp_path / "roi",
                device="cpu",
                seed=0,
                log=lambda line: None,
            )
        )

    return train


@pytest.mark.slow
def test_a_detector_trained_in_process_leaves_torch_as_it_was(unusual, detector) -> None:
    detector()
    assert settings() == unusual


@pytest.mark.slow
def test_a_teacher_trained_after_a_detector_is_the_teacher_trained_without(
    tmp_path: Path, unusual, detector
) -> None:
    before = train_teacher(tmp_path / "before")
    detector()
    after = train_teacher(tmp_path / "after")
    assert before.keys() == after.keys()
    for name, weights in before.items():
        assert torch.equal(weights, after[name]), name
