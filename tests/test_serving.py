"""Serving: the numpy input pipeline is the training warp's arithmetic; a run folder's fold
students export as one graph (``--ensemble``) that matches ``FoldEnsemble``; an ONNX export is
served with torch, timm, ultralytics and scikit-learn unimportable and gives ``kd predict``'s
results on the checkpoint; ``kd predict`` decodes each input once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import kdtoolkit
from kdtoolkit import export_model, verify_export
from kdtoolkit.data import imageio
from kdtoolkit.data.affine import letterbox_matrix, resize_matrix
from kdtoolkit.data.warp import warp_tensor
from kdtoolkit.serving.predict import predict
from kdtoolkit.serving.resample import antialias_weights, warp_array
from kdtoolkit.testing import run_tiny_recipe

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
BLOCKED = ("torch", "timm", "ultralytics", "sklearn")


def test_numpy_resampling_is_the_training_warp():
    """``warp_array`` (numpy) against ``warp_tensor`` (torch, training) for enlargements,
    reductions past the antialiasing step, odd aspect ratios, grey and RGB; the reduction's
    weights against ``F.interpolate(antialias=True)``."""
    rng = np.random.default_rng(0)
    cases = [((64, 64), (48, 48)), ((200, 130), (48, 48)), ((31, 77), (64, 64)),
             ((500, 400), (32, 32)), ((48, 48), (48, 48)), ((7, 300), (40, 24))]  # fmt: skip
    for (height, width), size in cases:
        for channels in (1, 3):
            image = rng.random((height, width, channels)).astype(np.float32)
            for matrix in (letterbox_matrix((height, width), size)[0],
                           resize_matrix((height, width), size)):  # fmt: skip
                torch_out = warp_tensor(torch.from_numpy(image.transpose(2, 0, 1)), matrix, size)
                numpy_out = warp_array(image, matrix, size)
                assert numpy_out.shape == (*size, channels)
                assert np.abs(numpy_out - torch_out.numpy().transpose(1, 2, 0)).max() < 5e-6
    x = torch.from_numpy(rng.random((1, 1, 97, 61)).astype(np.float32))
    reference = F.interpolate(x, size=(20, 13), mode="bilinear", antialias=True)[0, 0].numpy()
    ours = antialias_weights(97, 20) @ x[0, 0].double().numpy() @ antialias_weights(61, 13).T
    assert np.abs(ours - reference).max() < 1e-6


def dicom_series(folder: Path, slices: int = 5) -> Path:
    """pydicom's shipped ``CT_small.dcm`` as a series of ``slices`` files, one slice thickness
    apart."""
    source = get_testdata_file("CT_small.dcm", download=False)
    if source is None:
        pytest.skip("CT_small.dcm is not shipped with this pydicom")
    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(slices):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        position = [float(v) for v in ds.ImagePositionPatient]
        position[2] += k * float(ds.SliceThickness or 1.0)
        ds.ImagePositionPatient = position
        ds.PixelData = (ds.pixel_array + 40 * k).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice_{k}.dcm")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A finished three-fold tiny run (48-pixel students), its ONNX exports (fold 0 and the
    ensemble of the three folds), and inputs: the run's images and a DICOM series."""
    root = tmp_path_factory.mktemp("serving")
    run = run_tiny_recipe(root, **{"cv.folds": 3, "cv.only": [], "data.image_size": 48}).output
    folds = json.loads((run / "folds.json").read_text())
    images = sorted({s["image"] for s in folds["samples"]})[:6]
    inputs = [*images, str(dicom_series(root / "series"))]
    single = export_model(run / "fold_0/student/model.safetensors", root / "one/s.onnx", "onnx")
    ensemble = export_model(run, root / "ens/ensemble.onnx", "onnx", ensemble=True, run=run)
    return run, inputs, single, ensemble


def test_ensemble_export_is_the_fold_ensemble(served):
    run, inputs, _, ensemble = served
    assert ensemble.parity.ok and ensemble.metadata["folds"] == [0, 1, 2]
    assert len(ensemble.metadata["temperatures"]) == 3 and ensemble.metadata["fold"] is None
    reference = kdtoolkit.FoldEnsemble.load(run, device="cpu")
    members = np.mean([m.predict_proba(inputs) for m in reference.members], axis=0)
    from kdtoolkit.serving.exported import ExportedModel

    exported = ExportedModel(ensemble.path)
    assert np.abs(exported.predict_proba(inputs) - members).max() < 1e-5
    assert [p.folds for p in exported.predict(inputs[:2])] == [[0, 1, 2]] * 2
    assert verify_export(run, ensemble.path).ok


def serve_without_torch(model: Path, inputs: list[str]) -> subprocess.CompletedProcess:
    """``kd predict MODEL INPUTS --json`` in a process where importing torch, timm,
    ultralytics or scikit-learn fails."""
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({BLOCKED!r}))\n"
        "from kdtoolkit.cli import main\n"
        f"sys.argv = ['kd', 'predict', {str(model)!r}, *{inputs!r}, '--json']\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("which", ["single", "ensemble"])
def test_an_onnx_export_is_served_without_torch(served, which):
    run, inputs, single, ensemble = served
    export = single if which == "single" else ensemble
    source = run / "fold_0/student/model.safetensors" if which == "single" else run
    done = serve_without_torch(export.path, inputs)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    expected = predict(source, inputs, device="cpu").results  # kd predict on the checkpoint
    assert [g["image"] for g in got] == [e["image"] for e in expected] == inputs
    assert [g["class"] for g in got] == [e["class"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert max(abs(g["probabilities"][c] - p) for c, p in e["probabilities"].items()) < 1e-5
        assert g.get("folds") == e.get("folds")


def test_predict_decodes_each_input_once(served, tmp_path, monkeypatch):
    """Three folds, predictions and Grad-CAM overlays: every image and the DICOM series are
    read once."""
    run, inputs, _, _ = served
    reads: list[str] = []
    original = imageio.read_native

    def counted(source, read=None):
        reads.append(str(getattr(source, "image", source)))
        return original(source, read)

    monkeypatch.setattr(imageio, "read_native", counted)
    report = predict(run, inputs, cam_dir=tmp_path / "cams", device="cpu")
    assert len(report.results) == len(inputs) and len(list((tmp_path / "cams").iterdir())) == 7
    assert sorted(reads) == sorted(inputs)


def test_the_serving_input_is_the_evaluation_input():
    """``prepare`` (numpy, serving) against ``student_view`` (torch, what training evaluates):
    letterboxed and stretched, enlarged and reduced past the antialiasing step, grey and RGB
    models, uint8, uint16, float grey and float RGB arrays; no images gives an empty batch."""
    from kdtoolkit.data.scan import ReadSpec
    from kdtoolkit.data.view import ViewConfig, student_view
    from kdtoolkit.serving.preprocess import InputSpec, prepare

    rng = np.random.default_rng(1)
    images = [
        (rng.random((90, 50)) * 255).astype(np.uint8),
        (rng.random((20, 33, 3)) * 65535).astype(np.uint16),
        rng.random((300, 200)).astype(np.float32),
        rng.random((41, 41, 3)).astype(np.float32),
    ]
    for channels in (1, 3):
        for letterbox in (True, False):
            cfg = ViewConfig(image_size=(48, 64), channels=channels, letterbox=letterbox)
            spec = InputSpec((48, 64), channels, letterbox, cfg.mean, cfg.std)
            got = prepare(images, spec, ReadSpec())
            want = np.stack([student_view(image, cfg).numpy() for image in images])
            assert got.shape == want.shape == (4, channels, 48, 64)
            assert np.abs(got - want).max() < 5e-5, (channels, letterbox)
            assert prepare([], spec, ReadSpec()).shape == (0, channels, 48, 64)


def test_a_model_predicts_no_images_and_float_rgb_arrays(served):
    run, _, _, ensemble = served
    from kdtoolkit.serving.exported import ExportedModel

    for model in (kdtoolkit.KdModel.load(run / "fold_0/student/model.safetensors", "cpu"),
                  ExportedModel(ensemble.path)):  # fmt: skip
        assert model.predict([]) == [] and model.predict_proba([]).shape == (0, 3)
        rgb = np.random.default_rng(0).random((30, 40, 3)).astype(np.float32)
        (p,) = model.predict([rgb])
        assert p.image == "array (30, 40, 3)" and abs(sum(p.probabilities.values()) - 1) < 1e-5


def test_what_an_export_cannot_do_is_one_line(served, tmp_path):
    """Grad-CAM overlays and uncalibrated probabilities need the checkpoint: one line each,
    exit 2, and the --cam folder is not made."""
    from kdtoolkit.testing import kd_in_process

    _, inputs, _, ensemble = served
    cams = tmp_path / "cams"
    cases = [
        (["--cam", str(cams)], "Grad-CAM overlays need the checkpoint"),
        (["--no-calibrated"], "applies its temperature inside the graph"),
    ]
    for extra, says in cases:
        done = kd_in_process("predict", str(ensemble.path), inputs[0], *extra)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    assert not cams.exists()
