"""``kd export``: a tiny trained student exported to ONNX, TorchScript and ``torch.export`` gives
``KdModel.predict``'s probabilities in each format's own runtime; its metadata round-trips; a
tampered model or a preprocessing mismatch fails the parity check (exit 2); the feature map
output gives the product's Grad-CAM with numpy alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kdtoolkit
from kdtoolkit import export_model, prepare_inputs, read_export_metadata, verify_export
from kdtoolkit.engine import export as export_module
from kdtoolkit.engine.export_digest import file_sha256
from kdtoolkit.engine.export_module import ServingModule
from kdtoolkit.models.checkpoint import load_checkpoint, save_checkpoint
from kdtoolkit.serving.parity import held_out_images
from kdtoolkit.serving.runtimes import private_caches
from kdtoolkit.testing import kd_cli, kd_in_process, run_tiny_recipe

onnx = pytest.importorskip("onnx")
with private_caches():  # onnxruntime writes a device id when imported
    ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A finished tiny run (64-pixel student: a 2×2 feature map), its student checkpoint and
    fold 0's held-out images."""
    root = tmp_path_factory.mktemp("export")
    result = run_tiny_recipe(root, **{"data.image_size": 64})
    folds = json.loads((result.output / "folds.json").read_text())
    held_out = [Path(s["image"]) for s in folds["samples"] if s["fold"] == 0]
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    return result.output, ckpt, held_out


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
    run, ckpt, _ = trained
    out = tmp_path_factory.mktemp("onnx") / "student.onnx"
    return export_model(ckpt, out, "onnx", features=True, run=run)


def reference(ckpt: Path, images) -> tuple[kdtoolkit.KdModel, np.ndarray]:
    model = kdtoolkit.KdModel.load(ckpt, device="cpu")
    probs = np.array([list(p.probabilities.values()) for p in model.predict(images)])
    return model, probs


def test_onnxruntime_matches_kdmodel_predict_and_metadata_round_trips(trained, onnx_export):
    _, ckpt, held_out = trained
    model, expected = reference(ckpt, held_out)
    session = ort.InferenceSession(str(onnx_export.path), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.name == "image" and isinstance(image.shape[0], str)  # a dynamic batch axis
    assert image.shape[1:] == [1, 64, 64]
    # as a server would: preprocess.json beside the file says how inputs are made
    served = json.loads((onnx_export.path.parent / "preprocess.json").read_text())
    probs, features = session.run(None, {"image": prepare_inputs(held_out, served)})
    assert np.abs(probs - expected).max() < 1e-4
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and features.shape[1:] == (512, 2, 2)
    # and for images of other shapes (letterboxed) prepare_inputs is KdModel.preprocess
    odd = [np.full((40, 64), 200, np.uint8), np.eye(70, 30, dtype=np.float32)]
    assert np.array_equal(prepare_inputs(odd, served), model.preprocess(odd).numpy())
    # the metadata inside the file, read with onnx itself, and preprocess.json beside it
    proto = onnx.load(str(onnx_export.path))
    inside = json.loads({p.key: p.value for p in proto.metadata_props}["kdtoolkit"])
    assert inside == onnx_export.metadata == read_export_metadata(onnx_export.path)
    assert inside["opset"] == next(o.version for o in proto.opset_import if o.domain == "")
    assert inside["classes"] == ["low", "mid", "high"]
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    pre = inside["preprocess"]
    assert pre["input_size"] == meta["input_size"] == [64, 64]
    assert (pre["channels"], pre["letterbox"]) == (meta["channels"], meta["letterbox"])
    assert pre["normalisation"] == meta["normalisation"]
    assert inside["scan"] == meta["read"]  # how KdModel reads scans, as it reads it back
    sidecar = json.loads((onnx_export.path.parent / "preprocess.json").read_text())
    assert sidecar == {k: inside[k] for k in ("classes", "inputs", "preprocess", "scan")}
    assert onnx_export.parity.ok and onnx_export.parity.n == len(held_out[:8])
    assert onnx_export.parity.inputs == "held-out images of fold 0"


def test_gradcam_from_the_exported_feature_map_with_numpy(trained, onnx_export):
    """The docs' recipe (pooling + linear head: the CAM weights are the head's rows) gives
    ``KdModel.cam``, which differentiates the head with autograd."""
    from PIL import Image

    _, ckpt, held_out = trained
    model = kdtoolkit.KdModel.load(ckpt, device="cpu")
    meta = onnx_export.metadata
    assert meta["cam"]["head"] == "pooling+linear"
    weight = np.array(meta["cam"]["weight"], dtype=np.float32)
    session = ort.InferenceSession(str(onnx_export.path), providers=["CPUExecutionProvider"])
    probs, features = session.run(None, {"image": model.preprocess(held_out).numpy()})

    def minmax(m):
        m = m - m.min()
        return m / (1e-7 + m.max())

    h, w = meta["preprocess"]["input_size"]
    cams = []
    for p, f in zip(probs, features, strict=True):
        cam = minmax(np.maximum(np.einsum("c,chw->hw", weight[p.argmax()], f), 0))
        big = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((w, h), Image.BILINEAR))
        cams.append(minmax(big))
    assert np.abs(np.stack(cams) - model.cam(held_out)).max() < 1e-4


def test_torchscript_and_exported_program_match(trained, tmp_path):
    run, ckpt, held_out = trained
    model, expected = reference(ckpt, held_out)
    x = model.preprocess(held_out)
    ts = kd_in_process("export", str(ckpt), "-f", "torchscript", "-o", str(tmp_path / "ts/s.pt"))
    assert ts.returncode == 0, ts.stderr
    assert "parity ok" in ts.stdout and "synthetic images" in ts.stdout
    extra = {"kdtoolkit.json": ""}
    scripted = torch.jit.load(str(tmp_path / "ts/s.pt"), _extra_files=extra)
    assert json.loads(extra["kdtoolkit.json"])["preprocess"]["input_size"] == [64, 64]
    with torch.no_grad():
        assert np.abs(scripted(x).numpy() - expected).max() < 1e-4
    result = export_model(ckpt, tmp_path / "ep/s.pt2", "exported", run=run)
    program = torch.export.load(str(result.path), extra_files=extra)
    assert json.loads(extra["kdtoolkit.json"]) == result.metadata
    with torch.no_grad():
        assert np.abs(program.module()(x).numpy() - expected).max() < 1e-4
    # the digests recorded at export are found again in the saved files, and a changed
    # weight in either format fails --verify whatever the probabilities do
    for path, fmt in ((tmp_path / "ts/s.pt", "torchscript"), (result.path, "exported")):
        assert verify_export(ckpt, path, run=run).ok
        meta = read_export_metadata(path)
        assert file_sha256(path, fmt) == meta["graph_sha256"]
    flip_lowest_bit(tmp_path / "ts/s.pt")  # one weight's last mantissa bit, in the archive
    with pytest.raises(kdtoolkit.KdError, match="its weights or program changed"):
        verify_export(ckpt, tmp_path / "ts/s.pt", run=run)


def flip_lowest_bit(path: Path) -> None:
    """Rewrite a TorchScript archive with the first byte of its largest tensor record XORed
    with 1 (the lowest mantissa bit of a little-endian float32)."""
    with zipfile.ZipFile(path) as z:
        items = [(info, z.read(info.filename)) for info in z.infolist()]
    largest = max(
        (i for i, (info, _) in enumerate(items) if "/data/" in info.filename),
        key=lambda i: len(items[i][1]),
    )
    info, data = items[largest]
    items[largest] = (info, bytes([data[0] ^ 1]) + data[1:])
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            z.writestr(info, data)


def test_export_applies_the_checkpoints_temperature(trained, tmp_path):
    """A checkpoint calibrated with T = 2 exports softmax(logits / 2), computed here from the
    logits by hand; ``--no-calibrated`` predictions differ from it."""
    _, ckpt, held_out = trained
    tensors, meta = load_checkpoint(ckpt)
    calibrated = tmp_path / "calibrated" / "model.safetensors"
    calibrated.parent.mkdir()
    save_checkpoint(calibrated, tensors, {**meta, "temperature": 2.0})
    result = export_model(calibrated, tmp_path / "t.pt", "torchscript")
    model = kdtoolkit.KdModel.load(calibrated, device="cpu", calibrated=False)
    logits = model.logits(held_out)
    by_hand = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    scripted = torch.jit.load(str(result.path))
    assert float(scripted.temperature) == 2.0  # a buffer of the exported module itself
    with torch.no_grad():
        out = scripted(model.preprocess(held_out)).numpy()
    assert np.abs(out - by_hand).max() < 1e-5
    assert np.abs(by_hand - torch.softmax(torch.from_numpy(logits), 1).numpy()).max() > 1e-3
    assert result.metadata["temperature"] == 2.0


def test_scans_are_read_with_the_checkpoints_read_settings(trained, tmp_path):
    """A checkpoint that reads scans axially with a percentile clip: its export's ``scan``
    says so, and ``prepare_inputs`` on the export's metadata reads a NIfTI volume as
    ``KdModel.preprocess`` does, not as the default read settings would."""
    import nibabel as nib

    _, ckpt, _ = trained
    tensors, meta = load_checkpoint(ckpt)
    read = {**meta["read"], "axis": "axial", "percentiles": [10.0, 90.0]}
    scans = tmp_path / "scans" / "model.safetensors"
    scans.parent.mkdir()
    save_checkpoint(scans, tensors, {**meta, "read": read})
    result = export_model(scans, tmp_path / "s.pt", "torchscript")
    assert result.metadata["scan"] == read
    assert json.loads(result.preprocess.read_text())["scan"] == read
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 20, (24, 20, 16)).astype(np.float32)
    volume[0, 0, :] = 5000  # an outlier the percentile clip removes
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    model = kdtoolkit.KdModel.load(scans, device="cpu")
    got = prepare_inputs([path, str(path)], result.metadata)
    assert np.array_equal(got, model.preprocess([path, str(path)]).numpy())
    default = prepare_inputs([path], {**result.metadata, "scan": {}})
    assert np.abs(got[:1] - default).max() > 0.5


def test_a_graph_that_differs_is_not_written(trained, tmp_path, monkeypatch):
    _, ckpt, _ = trained
    forward = ServingModule.forward
    monkeypatch.setattr(ServingModule, "forward", lambda self, x: forward(self, x) + 0.01)
    with pytest.raises(kdtoolkit.KdError, match=r"parity check failed: largest difference 0\.01"):
        export_model(ckpt, tmp_path / "bad.pt", "torchscript")
    assert not list(tmp_path.iterdir())


def test_tampered_model_and_preprocessing_mismatch_fail_with_exit_2(trained, onnx_export, tmp_path):
    run, ckpt, _ = trained
    folder = tmp_path / "served"
    shutil.copytree(onnx_export.path.parent, folder)
    path = folder / "student.onnx"
    assert verify_export(ckpt, path, run=run).ok  # the untouched copy passes

    def failed(result, *words: str) -> None:
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert all(w in lines[0] for w in words), lines[0]

    def tampered_copy(name: str, change) -> Path:
        proto = onnx.load(str(path))
        bias = next(t for t in proto.graph.initializer if tuple(t.dims) == (3,))
        value = onnx.numpy_helper.to_array(bias).copy()
        change(value)
        bias.CopyFrom(onnx.numpy_helper.from_array(value, bias.name))
        onnx.save_model(proto, str(folder / name))
        return folder / name

    # 1. a tampered initializer: the classifier's bias moved by 3 (parity fails too)
    moved = tampered_copy("tampered.onnx", lambda v: v.__setitem__(0, v[0] + 3.0))
    digest = "digest check failed: its weights or program changed since it was exported"
    failed(kd_in_process("export", str(ckpt), "-o", str(moved), "--verify"), digest)
    # 2. a change far below the parity tolerance: one bias nudged by 1e-6 still fails
    nudged = tampered_copy("nudged.onnx", lambda v: v.__setitem__(0, v[0] + 1e-6))
    with pytest.raises(kdtoolkit.KdError, match=re.escape(digest)):
        verify_export(ckpt, nudged, run=run)
    # 3. another checkpoint (its weights changed) against the untouched export
    weights, meta = load_checkpoint(ckpt)
    other = tmp_path / "other.safetensors"
    save_checkpoint(
        other, {k: v + 1e-6 if v.is_floating_point() else v for k, v in weights.items()}, meta
    )
    with pytest.raises(kdtoolkit.KdError, match="the checkpoint's weights are not those"):
        verify_export(other, path, run=run)

    # 4. preprocess.json edited (a server normalising differently): named, and measured
    sidecar = json.loads((folder / "preprocess.json").read_text())
    sidecar["preprocess"]["normalisation"]["mean"] = [0.1]
    (folder / "preprocess.json").write_text(json.dumps(sidecar))
    failed(
        kd_in_process("export", str(ckpt), "-o", str(path), "--verify"),
        "parity check failed: largest difference",
        "normalisation.mean",
    )

    # 5. the same mismatch inside the file too: its recorded digest names the edit
    proto = onnx.load(str(path))
    inside = json.loads(proto.metadata_props[0].value)
    inside["preprocess"] = sidecar["preprocess"]
    onnx.helper.set_model_props(proto, {"kdtoolkit": json.dumps(inside)})
    onnx.save_model(proto, str(path))
    with pytest.raises(kdtoolkit.KdError, match="its recorded preprocessing was edited"):
        verify_export(ckpt, path)


def test_bad_requests_are_one_line(trained, tmp_path):
    """Without the ``export`` extra: one line naming it (a subprocess where onnxscript cannot
    be imported); a wrong suffix or format: one line, nothing written."""
    run, ckpt, _ = trained
    fake = tmp_path / "site" / "onnxscript"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    result = kd_cli(
        "export", str(ckpt), "-o", str(tmp_path / "m.onnx"), env={**os.environ, "PYTHONPATH": path}
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert 'pip install "kdtoolkit[export]"' in lines[0] and "onnxscript" in lines[0]
    with pytest.raises(kdtoolkit.KdError, match=r"written as \*\.pt; rename"):
        export_model(ckpt, tmp_path / "m.onnx", "torchscript")
    with pytest.raises(kdtoolkit.KdError, match="use one of onnx, torchscript, exported"):
        export_model(ckpt, tmp_path / "m.tflite", "tflite")
    assert not list(tmp_path.glob("m.*"))
    # a run folder instead of a checkpoint: one line naming a checkpoint inside it
    result = kd_in_process("export", str(run), "-f", "torchscript")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    expected = f"{run} is a run folder; export one checkpoint, e.g. {run}/fold_0/student/"
    assert expected + "model.safetensors, or all its folds as one graph with --ensemble" in lines[0]
    assert not list(run.glob("*.pt")) and not list(run.parent.glob("*.pt"))


def test_run_without_held_out_images_is_named(trained, tmp_path):
    """``--run`` with the final model (fold id = the number of folds): it has no held-out
    images, said in one line; with ``cv.repeats`` 2, fold id 3 of 2 folds is repeat 1's fold 1
    (each sample's ``repeat_folds``), not the samples' first-repeat ``fold``."""
    run, ckpt, _ = trained
    tensors, meta = load_checkpoint(ckpt)
    final = tmp_path / "final" / "model.safetensors"
    final.parent.mkdir()
    save_checkpoint(final, tensors, {**meta, "fold": 2})
    with pytest.raises(kdtoolkit.KdError) as error:
        export_model(final, tmp_path / "f.pt", "torchscript", run=run)
    message = str(error.value)
    assert "final model" in message and "no held-out images" in message, message
    assert "omit --run" in message and "\n" not in message
    assert not list(tmp_path.glob("f.*"))

    images = [tmp_path / f"{i}.png" for i in range(4)]
    for image in images:
        image.write_bytes(b"")
    repeat_folds = [[0, 1], [1, 1], [0, 0], [1, 0]]
    doc = {
        "folds": 2,
        "repeats": 2,
        "samples": [
            {"image": str(p), "fold": r[0], "repeat_folds": r}
            for p, r in zip(images, repeat_folds, strict=True)
        ],
    }
    repeated = tmp_path / "repeated"
    repeated.mkdir()
    (repeated / "folds.json").write_text(json.dumps(doc))

    def held_out(fold: int) -> tuple[list, str]:
        model = SimpleNamespace(metadata={"fold": fold})
        return held_out_images(model, repeated, 8)  # type: ignore[arg-type]

    assert held_out(3) == ([images[0], images[1]], "held-out images of fold 1 of repeat 1")
    assert held_out(1) == ([images[1], images[3]], "held-out images of fold 1 of repeat 0")
    with pytest.raises(kdtoolkit.KdError, match="final model"):
        held_out(4)


def test_options_and_the_output_are_checked_before_any_work(trained, tmp_path, monkeypatch):
    """Bad --samples, --tolerance, --opset and an unwritable -o: one line each, before the
    checkpoint is even loaded (the loader is replaced by one that fails the test)."""
    _, ckpt, _ = trained

    def no_work(*args, **kwargs):
        raise AssertionError("the export started before its options were checked")

    monkeypatch.setattr(export_module, "load_checkpoint_model", no_work)
    out = tmp_path / "m.onnx"
    cases = [
        ({"samples": 0}, "--samples 0: the parity check needs at least 1 image"),
        ({"samples": -3}, "--samples -3: the parity check needs at least 1 image"),
        ({"tolerance": -1.0}, "--tolerance -1.0: give a finite difference ≥ 0"),
        ({"tolerance": float("nan")}, "--tolerance nan: give a finite difference ≥ 0"),
        ({"tolerance": float("inf")}, "--tolerance inf: give a finite difference ≥ 0"),
        ({"opset": 3}, "--opset 3: the exporter writes opsets 18 to"),
    ]
    for options, message in cases:
        with pytest.raises(kdtoolkit.KdError) as error:
            export_model(ckpt, out, "onnx", **options)
        assert str(error.value).startswith(message), str(error.value)
        if "opset" not in options:
            with pytest.raises(kdtoolkit.KdError, match=re.escape(message)):
                verify_export(ckpt, out, **options)
    # permissions as a non-root user sees them (root may write anywhere, so os.access is set)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "m.onnx").write_bytes(b"old")
    denied = {locked, locked / "m.onnx"}
    monkeypatch.setattr(export_module.os, "access", lambda p, mode: Path(p) not in denied)
    with pytest.raises(kdtoolkit.KdError, match="m.onnx: the file is read-only"):
        export_model(ckpt, locked / "m.onnx", "onnx")
    with pytest.raises(
        kdtoolkit.KdError, match=r"cannot write into .*locked \(permission denied\)"
    ):
        export_model(ckpt, locked / "sub" / "m.onnx", "onnx")
    assert not out.exists()


def test_a_failed_export_names_the_output_not_its_temporary_file(trained, tmp_path, monkeypatch):
    _, ckpt, _ = trained

    def fail(module, example, path, meta):
        raise RuntimeError(f"cannot write {path}")

    monkeypatch.setattr(export_module, "write_torchscript", fail)
    out = tmp_path / "named.pt"
    with pytest.raises(kdtoolkit.KdError) as error:
        export_model(ckpt, out, "torchscript")
    assert f"cannot write {out})" in str(error.value) and ".tmp" not in str(error.value)
    assert not list(tmp_path.iterdir())


def test_parity_names_a_non_finite_input_not_the_model(trained, onnx_export):
    """A parity image holding NaN is bad input, named (the model is not blamed)."""
    from kdtoolkit.serving.parity import check_parity

    _, ckpt, held_out = trained
    model = kdtoolkit.KdModel.load(ckpt, device="cpu")
    bad = np.full((40, 40), np.nan, np.float32)
    images = [held_out[0], bad]
    with pytest.raises(kdtoolkit.KdError) as error:
        check_parity(model, onnx_export.path, onnx_export.metadata, images, "held-out images", 1e-4)
    assert str(error.value).startswith("array (40, 40): holds NaN or infinite values (1 of the")
    assert "diverged" not in str(error.value)
