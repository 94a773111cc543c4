"""Every file kind ``kd`` reads, damaged: each command exits 2 with one line naming the file
(never "internal error", exit 1). One finished tiny run is made once and copied per case."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import RECIPE, kd, make_manifest


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding ``data/`` (manifest and images), ``tiny.toml`` and its finished
    ``run/`` (one fold)."""
    root = tmp_path_factory.mktemp("finished")
    manifest = make_manifest(root / "data")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(output=root / "run", manifest=manifest))
    result = kd("run", str(recipe), "--quiet", "--set", "cv.only=[0]")
    assert result.returncode == 0, result.stderr
    return root


def copy_of(finished: Path, tmp_path: Path) -> Path:
    """A folder with a copy of ``finished``'s run folder and a recipe writing into it (the
    same data, so the same recipe digest)."""
    root = tmp_path / "copy"
    shutil.copytree(finished / "run", root / "run")
    (root / "data").symlink_to(finished / "data")
    text = (finished / "tiny.toml").read_text().replace(str(finished / "run"), str(root / "run"))
    (root / "tiny.toml").write_text(text)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def one_line_naming(result, name: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert name in lines[0] and "internal error" not in lines[0], lines[0]


# ---- the run folder --------------------------------------------------------------------------

RUN_FOLDER_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated folds.json": (lambda run: truncate(run / "folds.json"), "folds.json"),
    "folds.json of the wrong shape": (
        lambda run: (run / "folds.json").write_text('{"samples": [{"image": 3}]}'),
        "folds.json",
    ),
    "truncated eval.json": (lambda run: truncate(run / "fold_0" / "eval.json"), "eval.json"),
    "eval.json holding a list": (
        lambda run: (run / "fold_0" / "eval.json").write_text("[1, 2]"),
        "eval.json",
    ),
    "truncated rois.json": (
        lambda run: truncate(run / "fold_0" / "roi" / "rois.json"),
        "rois.json",
    ),
    "rois.json of the wrong shape": (
        lambda run: (run / "fold_0" / "roi" / "rois.json").write_text('{"boxes": [[1, 2]]}'),
        "rois.json",
    ),
    "truncated checkpoint": (
        lambda run: truncate(run / "fold_0" / "teacher" / "model.safetensors"),
        "model.safetensors",
    ),
    "Latin-1 recipe.resolved.json": (
        lambda run: (run / "recipe.resolved.json").write_bytes(b'{"digest": "caf\xe9"}'),
        "recipe.resolved.json",
    ),
}


@pytest.mark.parametrize("case", list(RUN_FOLDER_CASES))
def test_damaged_run_folder_file_is_one_line_naming_it(finished, tmp_path, case):
    root = copy_of(finished, tmp_path)
    damage, name = RUN_FOLDER_CASES[case]
    damage(root / "run")
    result = kd("run", str(root / "tiny.toml"), "--quiet", "--set", "cv.only=[0]")
    one_line_naming(result, name)


def test_damage_and_another_recipe_are_told_apart(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    truncate(root / "run" / "fold_0" / "teacher" / "model.safetensors")
    result = kd("run", str(root / "tiny.toml"), "--quiet", "--set", "cv.only=[0]")
    assert "unreadable" in result.stderr and "another recipe" not in result.stderr
    (root / "run" / "recipe.resolved.json").write_text("{")
    result = kd("run", str(root / "tiny.toml"), "--quiet", "--set", "cv.only=[0]")
    one_line_naming(result, "recipe.resolved.json")
    assert "different recipe" not in result.stderr and "not valid JSON" in result.stderr


def test_report_on_a_truncated_eval_json_names_it(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    truncate(root / "run" / "fold_0" / "eval.json")
    one_line_naming(kd("report", str(root / "run")), "eval.json")


def test_a_garbage_run_lock_is_one_line_and_changes_nothing(finished, tmp_path):
    root = copy_of(finished, tmp_path)
    lock = root / "run" / "run.lock"
    lock.write_bytes(b"process \xff\xfe garbage\n\x00\x01")
    log = (root / "run" / "run.log").read_text()
    one_line_naming(
        kd("run", str(root / "tiny.toml"), "--quiet", "--set", "cv.only=[0]"), "run.lock"
    )
    assert lock.read_bytes() == b"process \xff\xfe garbage\n\x00\x01"
    assert (root / "run" / "run.log").read_text() == log


def test_run_output_onto_a_file_is_one_line(tiny_recipe, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    one_line_naming(kd("run", str(tiny_recipe), "--output", str(target), "--quiet"), "a_file")
    assert target.read_text() == "x"


# ---- checkpoints given to kd predict -----------------------------------------------------------


def rewrite_metadata(path: Path, meta_text: str) -> None:
    """``path``'s safetensors header with its kdtoolkit metadata replaced by ``meta_text``."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"]["kdtoolkit"] = meta_text
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + size :])


@pytest.mark.parametrize("damage", ["no backbone_options", "not JSON", "cam onto a file", "cam"])
def test_predict_with_damaged_checkpoint_or_cam_path_is_one_line(finished, tmp_path, damage):
    root = copy_of(finished, tmp_path)
    ckpt = root / "run" / "fold_0" / "student" / "model.safetensors"
    image = root / "data" / "img_000.png"
    args = ["predict", str(ckpt), str(image)]
    name = "model.safetensors"
    if damage == "no backbone_options":
        meta = json.loads((ckpt.with_suffix(".json")).read_text())
        del meta["backbone_options"]
        rewrite_metadata(ckpt, json.dumps(meta))
    elif damage == "not JSON":
        rewrite_metadata(ckpt, "{not json")
    elif damage == "cam onto a file":
        args += ["--cam", str(image)]
        name = "img_000.png"
    else:
        args += ["--cam", "/dev/null/cams"]
        name = "/dev/null/cams"
    one_line_naming(kd(*args), name)


# ---- kd data check ---------------------------------------------------------------------------


def test_data_check_options_are_one_line(tiny_manifest, tmp_path):
    one_line_naming(kd("data", "check", str(tiny_manifest), "--per-class", "-1"), "--per-class")
    one_line_naming(
        kd("data", "check", str(tiny_manifest), "--sheet", str(tmp_path)), str(tmp_path)
    )
    away = tmp_path / "no" / "such" / "sheet.png"
    one_line_naming(kd("data", "check", str(tiny_manifest), "--sheet", str(away)), "no such folder")
    assert not (tmp_path / "no").exists()


# ---- kd data import ----------------------------------------------------------------------------


def coco_folder(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (40, 30)).save(images / "a.png")
    return tmp_path / "instances.json", images


COCO_CASES: dict[str, bytes] = {
    "integer annotations": json.dumps({"images": [], "annotations": 5}).encode(),
    "dict annotations": json.dumps({"images": [], "annotations": {"a": 1}}).encode(),
    "a JSON list": b"[]",
    "Latin-1": b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "caf\xe9"}]}',
}


@pytest.mark.parametrize("case", list(COCO_CASES))
def test_damaged_coco_is_one_line_naming_it(tmp_path, case):
    source, images = coco_folder(tmp_path)
    source.write_bytes(COCO_CASES[case])
    result = kd("data", "import", "coco", str(source), "--images", str(images))
    one_line_naming(result, "instances.json")


def test_coco_output_onto_a_folder_and_markup_safe_hints(tmp_path):
    source, images = coco_folder(tmp_path)
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2]}],
        "categories": [{"id": 1, "name": "x"}],
    }
    source.write_text(json.dumps(doc))
    result = kd("data", "import", "coco", str(source), "--images", str(images))
    assert result.returncode == 2 and "bbox [x, y, w, h]" in result.stderr, result.stderr
    doc["annotations"][0]["bbox"] = [float("nan"), 2, 3, 4]
    source.write_text(json.dumps(doc))
    result = kd("data", "import", "coco", str(source), "--images", str(images))
    assert result.returncode == 2 and "NaN" in result.stderr and "no area" not in result.stderr
    assert "Warning" not in result.stderr
    out = tmp_path / "folder"
    out.mkdir()
    args = ["data", "import", "coco", str(source), "--images", str(images), "-o", str(out)]
    one_line_naming(kd(*args, "--force"), "folder")


def yolo_folder(tmp_path: Path) -> tuple[Path, Path]:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    Image.new("L", (40, 30)).save(images / "a.png")
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    return labels, images


YOLO_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "broken data.yaml": (lambda d: (d / "data.yaml").write_text("names: [a, b\n"), "data.yaml"),
    "data.yaml names a number": (lambda d: (d / "data.yaml").write_text("names: 5\n"), "data.yaml"),
    "data.yaml names mixed keys": (
        lambda d: (d / "data.yaml").write_text("names: {0: a, x: b}\n"),
        "data.yaml",
    ),
    "Latin-1 labels": (lambda d: (d / "a.txt").write_bytes(b"0 0.5 0.5 0.2 0.2 \xe9\n"), "a.txt"),
    "a folder named x.txt": (
        lambda d: ((d / "a.txt").unlink(), (d / "x.txt").mkdir()),  # type: ignore[func-returns-value]
        "labels",
    ),
}


@pytest.mark.parametrize("case", list(YOLO_CASES))
def test_damaged_yolo_is_one_line_naming_it(tmp_path, case):
    labels, images = yolo_folder(tmp_path)
    damage, name = YOLO_CASES[case]
    damage(labels)
    result = kd("data", "import", "yolo", str(labels), "--images", str(images))
    one_line_naming(result, name)


def test_yolo_class_written_as_a_float_is_read(tmp_path):
    labels, images = yolo_folder(tmp_path)
    (labels / "a.txt").write_text("0.0 0.5 0.5 0.2 0.2\n")
    result = kd("data", "import", "yolo", str(labels), "--images", str(images))
    assert result.returncode == 0, result.stderr
    (labels / "a.txt").write_text("0.5 0.5 0.5 0.2 0.2\n")
    result = kd("data", "import", "yolo", str(labels), "--images", str(images), "--force")
    assert result.returncode == 2 and "class '0.5' is not a class index" in result.stderr


# ---- kd sos phantom ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["onto a file", "negative seed", "unwritable"])
def test_phantom_refusals_are_one_line(tmp_path, case):
    out = tmp_path / "phantom"
    args = ["sos", "phantom", str(out), "--n", "2", "--size", "64"]
    name = str(out)
    if case == "onto a file":
        out.write_text("x")
    elif case == "negative seed":
        args += ["--seed", "-1"]
        name = "seed"
    else:
        args[2] = name = "/dev/null/phantom"
    one_line_naming(kd(*args), name)


def test_phantom_of_other_settings_is_not_replaced_silently(tmp_path):
    out = tmp_path / "phantom"
    assert kd("sos", "phantom", str(out), "--n", "2", "--size", "64").returncode == 0
    result = kd("sos", "phantom", str(out), "--n", "3", "--size", "64")
    one_line_naming(result, "other settings")
    assert kd("sos", "phantom", str(out), "--n", "3", "--size", "64", "--force").returncode == 0


# ---- messages ----------------------------------------------------------------------------------


def test_single_dicom_file_without_pixels_or_fake_is_named_as_a_file(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    from kdtoolkit.data.volume import clear_cache, read_slice
    from kdtoolkit.errors import KdError

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm")
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    for name, text in (("no_pixels.dcm", "without an image"), ("fake.dcm", "without an image")):
        clear_cache()
        with pytest.raises(KdError) as info:
            read_slice(tmp_path / name, "axial")
        assert name in str(info.value) and "folder" not in str(info.value).split("—")[0]
        assert text in str(info.value)


class Foreign:
    """A class a weights-only load refuses."""


def test_a_refused_resume_state_is_logged_without_unsafe_advice(tmp_path):
    import torch

    from kdtoolkit.engine.resume import read_state

    path = tmp_path / "last.pt"
    torch.save({"model": Foreign()}, path)
    logged: list[str] = []
    assert read_state(path, logged.append) is None
    assert "set aside" in logged[0] and "safe load refuses" in logged[0]
    assert "weights_only" not in logged[0] and "Re-running" not in logged[0]


# ---- every reader of the run folder, every damage ------------------------------------------------

ODD_VALUES: list[object] = [None, 5, -1.5, "x", [], {}, [None], [[1, 2]], {"a": None}]


def damaged_variants(data: bytes) -> list[bytes]:
    """Truncations of ``data``, non-JSON bytes and, when it is a JSON object, each of its keys
    dropped or given each of ``ODD_VALUES``."""
    out = [data[:n] for n in sorted({0, 1, 7, 8, 9, len(data) // 3, len(data) // 2, len(data) - 1})]
    out += [b"null", b"[]", b"{}", b"5", b'"x"', b"\xff\xfe\x00", b'{"a": 1}' + b"\xe9"]
    try:
        doc = json.loads(data)
    except ValueError:
        return out
    if isinstance(doc, dict):
        for key in doc:
            out.append(json.dumps({k: v for k, v in doc.items() if k != key}).encode())
            for value in ODD_VALUES:
                out.append(json.dumps({**doc, key: value}).encode())
    return out


def test_every_run_folder_reader_turns_any_damage_into_one_kd_error(finished, tmp_path):
    from kdtoolkit.config.recipe import load_recipe
    from kdtoolkit.data.manifest import read_manifest
    from kdtoolkit.engine.context import RunPaths, assign_run_folds
    from kdtoolkit.engine.outputs import history_of, saved_recipe, stage_meta
    from kdtoolkit.engine.stage import read_rois
    from kdtoolkit.errors import KdError
    from kdtoolkit.models.checkpoint import load_model, read_metadata
    from kdtoolkit.report.results import FoldResult

    root = copy_of(finished, tmp_path)
    run_dir, paths = root / "run", RunPaths(root / "run")
    recipe = load_recipe(root / "tiny.toml")
    manifest = read_manifest(recipe.data.manifest, list(recipe.data.classes))
    readers = {
        "fold_0/eval.json": lambda p: FoldResult.read(p),
        "recipe.resolved.json": lambda p: saved_recipe(run_dir),
        "fold_0/roi/rois.json": lambda p: read_rois(p, False, print),
        "fold_0/teacher/model.json": lambda p: (stage_meta(paths, 0), history_of(paths, 0)),
        "folds.json": lambda p: assign_run_folds(p, manifest, recipe),
        "fold_0/student/model.safetensors": lambda p: (read_metadata(p), load_model(p)),
    }
    tried, escaped = 0, []
    for name, read in readers.items():
        path = run_dir / name
        original = path.read_bytes()
        read(path)  # the undamaged file reads
        for variant in damaged_variants(original):
            path.write_bytes(variant)
            try:
                read(path)
            except KdError as e:
                if "\n" in str(e) or path.name not in str(e):
                    escaped.append((name, variant[:60], str(e)))
            except Exception as e:  # noqa: BLE001  (what this test looks for)
                escaped.append((name, variant[:60], f"{type(e).__name__}: {e}"))
            tried += 1
        path.write_bytes(original)
    assert tried > 100 and not escaped, "\n".join(map(str, escaped))


# ---- kd predict and kd export: bad pixels, refused exports, folders ---------------------------


def test_predict_skips_non_finite_scans_and_blames_the_input(finished, tmp_path):
    """One good NIfTI, one with a NaN plane, one with inf voxels and a float TIFF of NaN: the
    good one is predicted, each bad file named as bad input (exit 2); nothing blames the
    checkpoint and no library warning reaches the terminal."""
    import nibabel as nib
    import numpy as np

    ckpt = finished / "run" / "fold_0" / "student" / "model.safetensors"
    scans = tmp_path / "scans"
    scans.mkdir()
    volume = np.random.default_rng(0).uniform(0, 100, (12, 12, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), scans / "good.nii.gz")
    plane = volume.copy()
    plane[6] = np.nan
    nib.save(nib.Nifti1Image(plane, np.eye(4)), scans / "nan_plane.nii.gz")
    inf = volume.copy()
    inf[4:8, 4:8, 4:8] = np.inf  # inside the middle sagittal slice, which is read
    nib.save(nib.Nifti1Image(inf, np.eye(4)), scans / "inf.nii.gz")
    Image.fromarray(np.full((16, 16), np.nan, np.float32)).save(scans / "nan.tif")
    result = kd("predict", str(ckpt), str(scans), "--json")
    assert result.returncode == 2, result.stderr
    predicted = [json.loads(line)["image"] for line in result.stdout.splitlines()]
    assert predicted == [str(scans / "good.nii.gz")]
    lines = result.stderr.strip().splitlines()
    for name in ("inf.nii.gz", "nan.tif", "nan_plane.nii.gz"):
        line = next(x for x in lines if name in x)
        assert "NaN or infinite" in line, line
    assert (
        lines[-1]
        == "error: 3 of 4 images could not be read (listed above); the others were predicted"
    )
    text = result.stderr.lower()
    assert "checkpoint" not in text and "diverged" not in text and "warning" not in text


def dead_pid() -> int:
    """A process id that no process has (a child that has exited and been reaped)."""
    import subprocess
    import sys

    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)


def test_refused_exports_keep_nothing(finished, tmp_path):
    """A preprocess.json that is a folder, an -o three folders deep, a --cam three folders
    deep: refused before any work, nothing written and no folder made; the temporary file a
    killed export left behind is removed by the next export, one of a live process kept."""
    import os

    from kdtoolkit.fileio import writer_tag

    ckpt = finished / "run" / "fold_0" / "student" / "model.safetensors"
    out = tmp_path / "exp"
    (out / "preprocess.json").mkdir(parents=True)
    result = kd("export", str(ckpt), "-f", "torchscript", "-o", str(out / "a.pt"))
    one_line_naming(result, "preprocess.json")
    assert sorted(p.name for p in out.iterdir()) == ["preprocess.json"]
    deep = tmp_path / "deep" / "b" / "c" / "a.pt"
    one_line_naming(kd("export", str(ckpt), "-f", "torchscript", "-o", str(deep)), str(deep))
    cams = tmp_path / "camd" / "a" / "b"
    image = finished / "data" / "img_000.png"
    one_line_naming(kd("predict", str(ckpt), str(image), "--cam", str(cams)), str(cams))
    assert not (tmp_path / "deep").exists() and not (tmp_path / "camd").exists()
    # one missing folder is made; a killed export's temporary file is cleared, a live one kept
    target = tmp_path / "new" / "a.pt"
    target.parent.mkdir()
    stale = target.parent / f".a.pt.{writer_tag(dead_pid())}.x1.tmp.pt"
    live = target.parent / f".a.pt.{writer_tag(os.getpid())}.x2.tmp.pt"
    other_host = target.parent / f".a.pt.elsewhere-{writer_tag(dead_pid())}.x3.tmp.pt"
    for leftover in (stale, live, other_host):
        leftover.write_bytes(b"")
    result = kd("export", str(ckpt), "-f", "torchscript", "-o", str(target))
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.exists() and other_host.exists() and target.is_file()
    one = tmp_path / "one" / "a.pt"  # one missing folder: made
    assert kd("export", str(ckpt), "-f", "torchscript", "-o", str(one)).returncode == 0


def test_verify_of_a_truncated_export_is_one_line(finished, tmp_path):
    ckpt = finished / "run" / "fold_0" / "student" / "model.safetensors"
    for fmt, name in (("exported", "a.pt2"), ("torchscript", "a.pt")):
        path = tmp_path / fmt / name
        assert kd("export", str(ckpt), "-f", fmt, "-o", str(path)).returncode == 0
        truncate(path)
        one_line_naming(kd("export", str(ckpt), "--verify", "-o", str(path)), name)
