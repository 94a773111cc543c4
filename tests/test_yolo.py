"""The ``yolo`` ROI provider: labels, mAP, configuration errors and a tiny offline training."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdtoolkit.builtin.yolo.dataset import split_samples, stage_image, yolo_label
from kdtoolkit.builtin.yolo.metrics import average_precision, box_iou, detection_map
from kdtoolkit.builtin.yolo.options import packaged_detect_models, ultralytics_device
from kdtoolkit.builtin.yolo.provider import YoloProvider, detector_latency_ms
from kdtoolkit.config.option import check_options
from kdtoolkit.data.fold import split_validation
from kdtoolkit.data.manifest import Sample
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.roi import RoiRequest


def sample(index, image=Path("x.png"), box=(0, 0, 1, 1), angle=0.0, group=None, size=(64, 64)):
    return Sample(index, index + 2, image, 0, box, angle, None, group, None, *size)


# --------------------------------------------------------------------------- labels


def test_yolo_label_axis_aligned():
    # box 40×20 centred at (30, 30) in a 100×80 image
    assert yolo_label((10, 20, 50, 40), 0.0, 100, 80) == pytest.approx((0.3, 0.375, 0.4, 0.25))


def test_yolo_label_rotated_box_uses_its_enclosing_box():
    # 90°: the 40×20 box stands upright, 20×40
    assert yolo_label((10, 20, 50, 40), 90.0, 100, 80) == pytest.approx((0.3, 0.375, 0.2, 0.5))
    # 30°: half extents 20·cos30 + 10·sin30 = 22.3205 and 20·sin30 + 10·cos30 = 18.6603
    cx, cy, w, h = yolo_label((10, 20, 50, 40), 30.0, 100, 80)
    assert (cx, cy) == pytest.approx((0.3, 0.375))
    assert w == pytest.approx(2 * 22.320508 / 100)
    assert h == pytest.approx(2 * 18.660254 / 80)


def test_yolo_label_is_clipped_to_the_image():
    # x 80..120 → 80..100, y 60..80 stays
    assert yolo_label((80, 60, 120, 80), 0.0, 100, 80) == pytest.approx((0.9, 0.875, 0.2, 0.25))


# --------------------------------------------------------------------------- mAP


def test_average_precision_hand_example():
    # 3 images with one truth each; ranked detections: hit, miss, hit; image 1 never found.
    # precision 1, 1/2, 2/3 at recall 1/3, 1/3, 2/3 → envelope 1, 2/3, 2/3
    # AP = 1/3 · 1 + 1/3 · 2/3 = 5/9
    ap = average_precision([0, 1, 2], [0.9, 0.8, 0.7], [0.9, 0.1, 0.7], 3, 0.5)
    assert ap == pytest.approx(5 / 9)


def test_average_precision_counts_a_second_hit_on_the_same_image_as_false():
    assert average_precision([0, 0], [0.9, 0.8], [0.9, 0.9], 1, 0.5) == pytest.approx(1.0)
    assert average_precision([0, 0], [0.9, 0.8], [0.1, 0.9], 1, 0.5) == pytest.approx(0.5)
    assert average_precision([], [], [], 2, 0.5) == 0.0
    assert math.isnan(average_precision([], [], [], 0, 0.5))


def test_detection_map_hand_example():
    truth = {0: [0, 0, 10, 10], 1: [0, 0, 10, 10]}
    detections = [
        (0, 0.9, [0, 0, 10, 10]),  # IoU 1
        (1, 0.8, [0, 0, 10, 6.2]),  # IoU 0.62: a hit at 0.50, 0.55, 0.60 only
        (7, 0.99, [0, 0, 1, 1]),  # an image without truth: ignored
    ]
    assert box_iou(np.array([[0, 0, 10, 6.2]]), np.array([[0, 0, 10, 10]]))[0] == pytest.approx(
        0.62
    )
    map50, map50_95 = detection_map(detections, truth)
    assert map50 == pytest.approx(1.0)
    # AP 1 at 3 thresholds, 1/2 (one of two images found, at precision 1) at the other 7
    assert map50_95 == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)


# --------------------------------------------------------------------------- configuration


def one_line_error(**options) -> str:
    with pytest.raises(KdError) as info:
        YoloProvider(**options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_model_yaml_is_a_one_line_error_with_suggestions():
    message = one_line_error(model="yolo11q.yaml")
    assert "yolo11q.yaml" in message and "did you mean" in message and "yolo11" in message


def test_model_must_be_a_detection_yaml():
    assert ".pt" in one_line_error(model="yolo11n.pt")
    assert "not a detection model" in one_line_error(model="yolo11n-seg.yaml")
    assert "no such file" in one_line_error(model="models/mine.yaml")


def test_missing_or_wrong_weights_are_one_line_errors(tmp_path):
    assert "no such file" in one_line_error(weights=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "weights.pth"
    wrong.write_bytes(b"")
    assert ".pt" in one_line_error(weights=str(wrong))


def test_good_models_are_accepted(tmp_path):
    assert YoloProvider().model == "yolo11n.yaml"
    assert YoloProvider(model="yolov8s.yaml").model == "yolov8s.yaml"
    assert "yolo11n.yaml" in packaged_detect_models()
    local = tmp_path / "yolo11n.yaml"  # a local path keeps ultralytics' scale-from-name rule
    local.write_text("nc: 1\nbackbone: []\nhead:\n  - [[0], 1, Detect, [nc]]\n")
    assert YoloProvider(model=str(local)).model == str(local.resolve())
    weights = tmp_path / "start.pt"
    torch.save({"epoch": 0}, weights)  # plain data: loadable with weights_only=True
    assert YoloProvider(weights=str(weights)).weights == str(weights.resolve())


def test_missing_ultralytics_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ultralytics" else real(name)
    )
    message = one_line_error()
    assert "needs ultralytics" in message and "pip install ultralytics" in message


def test_options_are_declared_for_recipes():
    assert check_options(YoloProvider, {"epochs": 5, "fallback": "whole_image"}, "roi") == []
    problems = check_options(YoloProvider, {"epochs": 0, "fallback": "centre"}, "roi")
    assert len(problems) == 2


def test_registered_as_yolo():
    from kdtoolkit.plugins.manager import registries

    assert registries().roi_providers.get("yolo") is YoloProvider


def test_importing_the_module_does_not_import_ultralytics():
    modules = ", ".join(f"kdtoolkit.builtin.yolo.{m}" for m in ("provider", "session", "options"))
    code = f"import sys, {modules}; assert 'ultralytics' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_device_names():
    assert [ultralytics_device(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == [
        "cpu",
        "0",
        "1",
        "mps",
    ]


# --------------------------------------------------------------------------- dataset


def test_validation_split_keeps_groups_together():
    samples = [sample(i, group=f"p{i // 2}") for i in range(20)]
    train, val = split_samples(samples, 0.15, seed=0)
    assert len(train) + len(val) == 20 and len(val) >= 2
    assert not {s.group for s in train} & {s.group for s in val}
    fit, held = split_validation(range(20), [0] * 20, [s.group for s in samples], 0.15, 0)
    assert [s.index for s in train] == fit.tolist() and [s.index for s in val] == held.tolist()
    assert split_samples(samples, 0.0, seed=0) == (samples, samples)
    one_group = [sample(i, group="p") for i in range(5)]
    assert split_samples(one_group, 0.15, seed=0) == (one_group, one_group)


def test_staging_symlinks_8_bit_and_stretches_16_bit(tmp_path):
    grey8 = tmp_path / "a.png"
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(grey8)
    staged = stage_image(sample(3, grey8), tmp_path / "out8")
    assert staged.is_symlink() and staged.resolve() == grey8.resolve()

    grey16 = tmp_path / "b.png"
    arr = np.zeros((12, 12), np.uint16)
    arr[:, 6:] = 4000  # a 12-bit range, dark as 8-bit high bytes
    Image.fromarray(arr).save(grey16)
    staged = stage_image(sample(4, grey16), tmp_path / "out16")
    out = np.asarray(Image.open(staged))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


# --------------------------------------------------------------------------- latency


def test_detector_latency_times_single_decoded_images_after_a_warm_up(tmp_path):
    calls = []

    class Boxes:
        xyxy = torch.zeros((0, 4))

    class Detector:
        def predict(self, source, **args):
            calls.append((source.shape, source.dtype, args["batch"], args["imgsz"]))
            time.sleep(0.002)
            return [type("Result", (), {"boxes": Boxes()})()]

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 20), i, np.uint8)).save(paths[-1])
    ms = detector_latency_ms(Detector(), paths, 64, "cpu", 0.05, warmup=2)
    assert len(calls) == 2 + 3  # two untimed warm-up calls, then one call per image
    assert all(c == ((10, 20, 3), np.uint8, 1, 64) for c in calls)
    assert 2 <= ms < 1000
    assert detector_latency_ms(Detector(), [], 64, "cpu", 0.05) is None


# --------------------------------------------------------------------------- tiny training


@pytest.fixture
def offline(monkeypatch):
    """Every network attempt (not local sockets) is recorded and refused."""
    attempts = []

    def refuse(name):
        def guard(*args, **kwargs):
            attempts.append(name)
            raise OSError(f"network blocked in tests ({name})")

        return guard

    def only_local(name, real):
        inet = refuse(name)

        def guard(sock, *args, **kwargs):  # local IPC (e.g. data-loader workers) is fine
            local = sock.family == getattr(socket, "AF_UNIX", None)
            return (real if local else inet)(sock, *args, **kwargs)

        return guard

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, only_local(name, getattr(socket.socket, name)))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    return attempts


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """HOME and XDG folders point at an empty folder; the working folder is empty too."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.chdir(cwd)
    return home, cwd


def rectangles(folder: Path, n: int, size: int = 64) -> list:
    """``n`` grey images with one bright rectangle each, the rectangle as the expert box."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    out = []
    for i in range(n):
        image = (rng.random((size, size)) * 40).astype(np.uint8)
        x0, y0 = rng.integers(4, size // 2, 2)
        w, h = rng.integers(size // 5, size // 3, 2)
        image[y0 : y0 + h, x0 : x0 + w] = 230
        path = folder / f"slice_{i}.png"
        Image.fromarray(image).save(path)
        box = (float(x0), float(y0), float(x0 + w), float(y0 + h))
        out.append(sample(i, path, box, angle=0.0, size=(size, size)))
    return out


@pytest.mark.slow
def test_tiny_training_runs_offline_and_inside_the_run_folder(tmp_path, offline, empty_home, capfd):
    home, cwd = empty_home
    samples = rectangles(tmp_path / "images", 8)
    workdir = tmp_path / "run" / "fold_0" / "roi"
    lines: list[str] = []
    provider = YoloProvider(epochs=1, imgsz=64, batch=4, conf=0.05, workers=2)
    result = provider.provide(
        RoiRequest(
            fold=0,
            samples=samples,
            train=np.arange(6),
            predict=np.arange(8),
            workdir=workdir,
            device="cpu",
            seed=0,
            log=lines.append,
        )
    )

    assert offline == [], f"network attempted: {offline}"
    assert list(home.iterdir()) == [], "something was written to the home folder"
    assert list(cwd.iterdir()) == [], "something was written to the working folder"
    assert capfd.readouterr().out == "", "ultralytics printed to the terminal"
    settings = json.loads((workdir / "config" / "Ultralytics" / "settings.json").read_text())
    assert settings["sync"] is False and settings["runs_dir"].startswith(str(workdir))
    assert (workdir / "train" / "weights" / "best.pt").is_file()
    assert (workdir / "dataset" / "data.yaml").is_file()
    staged = sorted(p.name for p in (workdir / "dataset" / "images").rglob("*.png"))
    assert staged == [f"{i:06d}.png" for i in range(6)]  # training images only
    assert any("epoch 1/1" in line for line in lines)

    assert result.boxes.shape == (8, 4) and result.angles.tolist() == [0.0] * 8
    assert result.found.dtype == bool
    train_labels = np.array([yolo_label(s.box, s.angle, 64, 64) for s in samples[:6]])
    cx, cy, w, h = train_labels.mean(axis=0) * 64
    mean_box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    for box, found in zip(result.boxes, result.found, strict=True):
        if not found:
            assert box == pytest.approx(mean_box)
    errors = {"shift_along_p90", "shift_across_p90", "size_p90"}
    assert (
        set(result.metrics)
        == {"map50", "map50_95", "mean_iou", "n_fallback", "latency_ms"} | errors
    )
    assert result.metrics["latency_ms"] > 0
    assert any("detector latency" in line and "(2 images)" in line for line in lines)
    assert result.metrics["n_fallback"] == float(np.sum(~result.found))
    assert 0.0 <= result.metrics["map50_95"] <= result.metrics["map50"] <= 1.0
    args = (workdir / "train" / "args.yaml").read_text()
    assert "workers: 2" in args and "seed: 0" in args  # the options reach ultralytics


def test_ultralytics_leaves_pil_alone(tmp_path):
    """After a YOLO session, PIL still raises its own error on an unreadable image."""
    from PIL import Image, UnidentifiedImageError

    from kdtoolkit.builtin.yolo.session import ultralytics_session

    with ultralytics_session(tmp_path / "work", lambda line: None):
        pass
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnidentifiedImageError):
        Image.open(bad)
