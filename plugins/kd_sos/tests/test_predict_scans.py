"""Train/serve parity on scans: ``kd predict`` reads a DICOM series folder or a NIfTI volume
with the recipe's read settings stored in the checkpoint, so its probabilities for a held-out
scan are the ones the run evaluated."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from kd_sos.volumes import ensure_volumes

from kdtoolkit import KdModel, load_recipe, run
from kdtoolkit.data.manifest import read_manifest
from kdtoolkit.data.scan import ReadSpec
from kdtoolkit.report.calibration import softmax
from kdtoolkit.testing import kd_in_process


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(fmt)``: (manifest, run folder) of a tiny run on the phantom as ``fmt``
    scans, made once per format."""
    made: dict[str, tuple] = {}

    def make(fmt: str):
        if fmt not in made:
            tmp = tmp_path_factory.mktemp(fmt)
            manifest = ensure_volumes(tmp / "data", fmt, n=30, size=64)
            recipe = {
                "experiment": {"output": str(tmp / "run"), "device": "cpu"},
                # read settings other than the defaults: read with defaults, a scan differs
                "data": {
                    "manifest": str(manifest),
                    "image_size": 32,
                    "crop_size": [16, 32],
                    "percentiles": [2.0, 98.0],
                    "spacing_mm": 4.0,
                },
                "cv": {"folds": 2, "val_fraction": 0.25, "only": [0]},
                "teacher": {"backbone": "resnet10t", "epochs": 1, "batch_size": 8},
                "student": {"backbone": "resnet10t", "epochs": 1, "batch_size": 8},
                "loss": [{"name": "ce"}, {"name": "kl"}],
                "evaluate": {"baseline": False, "cam_examples": 0, "two_stage": False},
            }
            made[fmt] = (manifest, run(load_recipe(recipe), quiet=True))
        return made[fmt]

    return make


@pytest.mark.parametrize("fmt", ["dicom", "nifti"])
def test_kd_predict_gives_the_evaluated_probabilities(fmt, trained):
    manifest, result = trained(fmt)
    evaluated = json.loads((result.output / "fold_0" / "eval.json").read_text())["predictions"]
    samples = read_manifest(manifest).samples
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    held_out = evaluated["index"][:3]
    scans = [str(samples[i].image) for i in held_out]
    if fmt == "dicom":
        assert all(samples[i].image.is_dir() for i in held_out)  # series folders
    logits = np.array(evaluated["logits"]["student"])[:3]
    t = evaluated["temperature"]["student"]
    classes = KdModel.load(ckpt, "cpu").classes

    # one kd predict: the scans by path, and every row of the manifest (read as evaluated,
    # row slices included)
    done = kd_in_process(
        "predict", str(ckpt), *scans, "--manifest", str(manifest), "--json", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    by_path, by_row = got[: len(scans)], {g["row"]: g for g in got[len(scans) :]}
    assert [g["image"] for g in by_path] == scans and "row" not in by_path[0]
    assert len(by_row) == len(samples)
    calibrated = softmax(logits, t)
    for i, g, p in zip(held_out, by_path, calibrated, strict=True):
        np.testing.assert_allclose([g["probabilities"][c] for c in classes], p, atol=1e-5)
        row = by_row[samples[i].row]["probabilities"]
        np.testing.assert_allclose([row[c] for c in classes], p, atol=1e-5)
    # --no-calibrated: the plain softmax that eval.json's logits give
    plain = KdModel.load(ckpt, "cpu", calibrated=False).predict_proba(scans)
    np.testing.assert_allclose(plain, softmax(logits), atol=1e-5)

    # the read settings matter: read with the defaults, the same scan is another input
    model = KdModel.load(ckpt, "cpu")
    assert model.read == ReadSpec(percentiles=(2.0, 98.0), spacing_mm=4.0)
    stored = model.preprocess(scans[:1])
    model.read = replace(model.read, percentiles=None, spacing_mm=0.0)
    assert (model.preprocess(scans[:1]) - stored).abs().max() > 0.05


def test_kd_predict_takes_a_folder_of_series(trained, tmp_path):
    """A folder of DICOM series folders: each series is one scan; a series folder alone too."""
    manifest, result = trained("dicom")
    images = manifest.parent / "images"
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    series = sorted(images.iterdir())
    done = kd_in_process(
        "predict", str(ckpt), str(images), str(series[0]), "--json", "--cam", str(tmp_path / "c")
    )
    assert done.returncode == 0, done.stderr
    got = [json.loads(line)["image"] for line in done.stdout.splitlines()]
    assert got == [*map(str, series), str(series[0])] and len(series) == 30
    assert len(list((tmp_path / "c").glob("*_cam.png"))) == 31
