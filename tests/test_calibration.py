"""Calibration: ECE against torchmetrics and by hand, temperature scaling fitted on each
fold's validation split only, results.json/report.md, KdModel's temperature, fold ensembles."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from kdtoolkit import KdModel
from kdtoolkit.engine import calibrate as calibrate_module
from kdtoolkit.engine.context import RunContext
from kdtoolkit.models.checkpoint import load_checkpoint, save_checkpoint
from kdtoolkit.models.temperature import T_MAX, T_MIN, fit_temperature, nll, temperature_fit
from kdtoolkit.report.calibration import ece, pooled_calibration, softmax
from kdtoolkit.testing import kd_in_process, run_tiny_recipe


def torchmetrics_ece(p: np.ndarray, labels: np.ndarray) -> float:
    metric = MulticlassCalibrationError(num_classes=p.shape[1], n_bins=15, norm="l1")
    return float(metric(torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(labels)))


def test_ece_matches_torchmetrics() -> None:
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        logits = rng.normal(0, 3, (400, k))
        labels = rng.integers(0, k, 400)
        p = softmax(logits).astype(np.float32).astype(np.float64)
        assert ece(p, labels) == pytest.approx(torchmetrics_ece(p, labels), abs=1e-6)
    # confidences on bin edges and exactly 1 (a bin of its own, as torchmetrics)
    p = np.array([[1.0, 0.0], [0.6, 0.4], [0.8, 0.2], [0.0, 1.0], [0.5, 0.5]])
    labels = np.array([0, 1, 0, 0, 1])
    assert ece(p, labels) == pytest.approx(torchmetrics_ece(p, labels), abs=1e-6)


def test_ece_by_hand() -> None:
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.38, 0.62]])
    labels = np.array([0, 1, 1, 0])
    # bins of width 1/15: {0.9, 0.9} acc 1/2; {0.7} acc 1; {0.62} acc 0
    expected = 0.5 * abs(0.5 - 0.9) + 0.25 * abs(1 - 0.7) + 0.25 * abs(0 - 0.62)
    assert ece(p, labels) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.43)


def test_temperature_is_the_nll_minimum_and_lowers_nll() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3))
    logits[np.arange(300), labels] += 1.0
    overconfident = 3.0 * logits  # a model too sure of itself: T > 1 undoes it
    t = fit_temperature(overconfident, labels)
    grid = np.exp(np.linspace(np.log(0.2), np.log(20), 4001))
    brute = grid[np.argmin([nll(overconfident, labels, g) for g in grid])]
    assert t == pytest.approx(brute, rel=2e-3)
    assert t > 2
    assert nll(overconfident, labels, t) < nll(overconfident, labels) - 0.1
    underconfident = 0.4 * logits
    assert fit_temperature(underconfident, labels) < 0.6
    # beyond the bounds the fit stops at them: at most a fourfold change of the logits
    assert fit_temperature(10.0 * logits, labels) == T_MAX == 4.0
    assert fit_temperature(0.05 * logits, labels) == T_MIN == 0.25
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    right = logits[logits.argmax(1) == labels], labels[logits.argmax(1) == labels]
    assert nll(*right, 0.1) < nll(*right, 1.0)  # no finite minimum: sharper is always better
    assert fit_temperature(*right) == 1.0  # so no temperature is fitted


def calibrated_draws(rng: np.random.Generator, n: int, scale: float = 1.0):
    """Logits of a model calibrated by construction (labels drawn from its softmax), times
    ``scale`` (> 1: overconfident)."""
    logits = rng.normal(0, 2, (n, 4))
    p = softmax(logits)
    labels = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    return scale * logits, labels


def test_a_small_validation_split_leaves_a_calibrated_model_alone() -> None:
    """A calibrated model: 12 validation samples keep T = 1 with its reason, and on 30 to 80
    the likelihood-ratio test keeps T = 1 in most splits, so the held-out ECE does not rise
    on average (fitting T freely raised it by 2 to 3 points here); an overconfident model is
    still fitted on 40 samples and its held-out ECE falls."""
    rng = np.random.default_rng(0)
    val = calibrated_draws(rng, 12)
    t, why = temperature_fit(*val)
    assert (t, why) == (1.0, "12 validation samples (fewer than 30): no temperature fitted, T = 1")
    for n in (30, 40, 80):
        rises, kept = [], 0
        for seed in range(20):
            rng = np.random.default_rng(seed)
            (zv, yv), (zt, yt) = calibrated_draws(rng, n), calibrated_draws(rng, 3000)
            t, why = temperature_fit(zv, yv)
            assert T_MIN <= t <= T_MAX
            kept += t == 1.0 and "likelihood ratio" in why
            rises.append(ece(softmax(zt, t), yt) - ece(softmax(zt), yt))
        assert kept >= 16 and np.mean(rises) < 0.01, (n, kept, np.mean(rises))
    falls = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        (zv, yv), (zt, yt) = calibrated_draws(rng, 40, 2.0), calibrated_draws(rng, 3000, 2.0)
        t = fit_temperature(zv, yv)
        falls.append(ece(softmax(zt), yt) - ece(softmax(zt, t), yt))
    assert np.mean(falls) > 0.05


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory):
    """A tiny two-fold run; every split the folds use and every set of logits a temperature
    is fitted on are recorded, in order."""
    tmp = tmp_path_factory.mktemp("calib")
    events: list[tuple] = []
    real_logits, real_indices = calibrate_module.predict_logits, RunContext.fold_indices

    def spy_logits(*args, **kwargs):
        out = real_logits(*args, **kwargs)
        events.append(("fit", *out))
        return out

    def spy_indices(self, k):
        out = real_indices(self, k)
        events.append(("split", k, *out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibrate_module, "predict_logits", spy_logits)
        mp.setattr(RunContext, "fold_indices", spy_indices)
        result = run_tiny_recipe(tmp, **{"cv.only": [0, 1]})
    return result, events, tmp


def test_temperature_fitted_on_validation_only(spied_run) -> None:
    result, events, _ = spied_run
    run = result.output
    split = None
    fits: dict[int, list] = {0: [], 1: []}
    for event in events:
        if event[0] == "split":
            split = event
        else:
            assert split is not None
            fits[split[1]].append((event, split))
    for k in (0, 1):
        assert len(fits[k]) == 2  # teacher, then student
        held_out = set(
            json.loads((run / f"fold_{k}" / "eval.json").read_text())["predictions"]["index"]
        )
        for role, ((_, logits, labels, indices), (_, _, _train, val, test)) in zip(
            ("teacher", "student"), fits[k], strict=True
        ):
            assert sorted(indices.tolist()) == sorted(val.tolist())  # the validation split
            assert not set(indices.tolist()) & held_out
            assert set(test.tolist()) == held_out
            meta = load_checkpoint(run / f"fold_{k}" / role / "model.safetensors")[1]
            assert meta["temperature"] == pytest.approx(fit_temperature(logits, labels), rel=1e-9)
            assert meta["calibration"]["n"] == len(val)
            assert meta["calibration"]["nll_calibrated"] <= meta["calibration"]["nll"] + 1e-12
            assert meta["read"]["axis"] == "sagittal"


def test_results_and_report_carry_ece(spied_run) -> None:
    result, _, _ = spied_run
    run = result.output
    doc = json.loads((run / "results.json").read_text())
    folds = [json.loads((run / f"fold_{k}" / "eval.json").read_text()) for k in (0, 1)]
    for row in ("teacher_crop", "student"):
        pooled = doc["calibration"][row]
        labels = np.concatenate([f["predictions"]["label"] for f in folds])
        temps = [f["predictions"]["temperature"][row] for f in folds]
        z = [np.array(f["predictions"]["logits"][row]) for f in folds]
        before = np.concatenate([softmax(x) for x in z])
        after = np.concatenate([softmax(x, t) for x, t in zip(z, temps, strict=True)])
        assert pooled["ece"] == pytest.approx(torchmetrics_ece(before, labels), abs=1e-6)
        assert pooled["ece_calibrated"] == pytest.approx(torchmetrics_ece(after, labels), abs=1e-6)
        assert pooled["temperatures"] == temps
        for f, fold_metrics in zip(folds, doc["folds"], strict=True):
            y = np.array(f["predictions"]["label"])
            x = np.array(f["predictions"]["logits"][row])
            assert fold_metrics[row]["ece"] == pytest.approx(
                torchmetrics_ece(softmax(x), y), abs=1e-6
            )
            assert "ece_calibrated" in fold_metrics[row]
        assert set(doc["summary"][row]) >= {"ece", "ece_calibrated"}
    report = (run / "report.md").read_text()
    assert "## Calibration" in report and "figures/reliability.png" in report
    assert (run / "figures" / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert pooled_calibration([{}]) == {}  # old eval.json without logits: no row


def test_kdmodel_applies_the_temperature_and_old_checkpoints_load(spied_run, tmp_path) -> None:
    result, _, tmp = spied_run
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    images = sorted((tmp / "data").glob("*.png"))[:4]
    model = KdModel.load(ckpt, "cpu")
    raw = KdModel.load(ckpt, "cpu", calibrated=False)
    logits = raw.logits(images)
    assert model.temperature == load_checkpoint(ckpt)[1]["temperature"]
    assert raw.temperature == 1.0
    np.testing.assert_allclose(
        model.predict_proba(images), softmax(logits, model.temperature), atol=1e-5
    )
    np.testing.assert_allclose(raw.predict_proba(images), softmax(logits), atol=1e-5)
    # a checkpoint written before calibration: no temperature, no read settings
    weights, meta = load_checkpoint(ckpt)
    for key in ("temperature", "calibration", "read"):
        meta.pop(key)
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, weights, meta)
    loaded = KdModel.load(old, "cpu")
    assert loaded.temperature == 1.0 and loaded.read == model.read
    np.testing.assert_allclose(loaded.predict_proba(images), softmax(logits), atol=1e-5)


def test_kd_predict_run_folder_averages_the_folds(spied_run) -> None:
    result, _, tmp = spied_run
    images = sorted((tmp / "data").glob("*.png"))[:5]
    done = kd_in_process(
        "predict", str(result.output), *map(str, images), "--json", "--device", "cpu"
    )
    assert done.returncode == 0, done.stderr
    got = [json.loads(line) for line in done.stdout.splitlines()]
    folds = [
        KdModel.load(result.output / f"fold_{k}" / "student" / "model.safetensors", "cpu")
        for k in (0, 1)
    ]
    mean = np.mean([m.predict_proba(images) for m in folds], axis=0)
    classes = folds[0].classes
    assert [g["image"] for g in got] == list(map(str, images))
    for g, p in zip(got, mean, strict=True):
        np.testing.assert_allclose([g["probabilities"][c] for c in classes], p, atol=1e-5)
        assert g["class"] == classes[int(np.argmax(p))]
    # the mean differs from each fold alone (the test can tell an ensemble from one fold)
    assert min(np.abs(m.predict_proba(images) - mean).max() for m in folds) > 1e-4
    assert all(g["folds"] == [0, 1] for g in got)  # the output says which folds it averaged
    empty = kd_in_process("predict", str(tmp / "data"), str(images[0]))
    assert empty.returncode == 2 and "no fold_<k>/student/model.safetensors" in empty.stderr


def test_a_fold_ensemble_missing_a_fold_is_an_error_naming_it(spied_run, tmp_path) -> None:
    result, _, tmp = spied_run
    image = sorted((tmp / "data").glob("*.png"))[0]
    run = tmp_path / "run"
    shutil.copytree(result.output, run)
    shutil.rmtree(run / "fold_1" / "student")
    done = kd_in_process("predict", str(run), str(image), "--json", "--device", "cpu")
    assert done.returncode == 2
    assert f"{run}: fold_1/student/model.safetensors missing (1 of 2 folds found)" in done.stderr
    assert "--allow-missing-folds" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
    fewer = kd_in_process(
        "predict", str(run), str(image), "--json", "--device", "cpu", "--allow-missing-folds"
    )
    assert fewer.returncode == 0, fewer.stderr
    (got,) = [json.loads(line) for line in fewer.stdout.splitlines()]
    alone = KdModel.load(run / "fold_0" / "student" / "model.safetensors", "cpu")
    assert got["folds"] == [0]
    np.testing.assert_allclose(
        list(got["probabilities"].values()), alone.predict_proba([image])[0], atol=1e-6
    )
    (run / "fold_0" / "student" / "model.safetensors").write_bytes(b"damaged")
    damaged = kd_in_process(
        "predict", str(run), str(image), "--allow-missing-folds", "--device", "cpu"
    )
    assert damaged.returncode == 2 and "fold_0/student/model.safetensors" in damaged.stderr
    assert "Traceback" not in damaged.stderr


def test_kd_run_final_trains_a_student_on_all_data(tmp_path) -> None:
    """``kd run --final``: the folds, then teacher and student on every sample into
    ``final/``; its validation split is a share of all samples, nothing held out."""
    from kdtoolkit.testing import tiny_manifest

    manifest = tiny_manifest(tmp_path / "data")
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        f'[experiment]\noutput = "{tmp_path / "run"}"\ndevice = "cpu"\n'
        f'[data]\nmanifest = "{manifest}"\nclasses = ["low", "mid", "high"]\n'
        "image_size = 32\ncrop_size = [16, 32]\n"
        "[cv]\nfolds = 2\nval_fraction = 0.2\nonly = [0]\n"
        '[teacher]\nbackbone = "resnet10t"\nepochs = 1\nbatch_size = 8\n'
        '[student]\nbackbone = "resnet10t"\nepochs = 1\nbatch_size = 8\n'
        '[[loss]]\nname = "ce"\n[[loss]]\nname = "kl"\n'
        "[evaluate]\nbaseline = false\ncam_examples = 0\n"
    )
    done = kd_in_process("run", str(toml), "--final", "--quiet")
    assert done.returncode == 0, done.stderr
    final = tmp_path / "run" / "final"
    assert "final model" in done.stdout
    teacher = load_checkpoint(final / "teacher" / "model.safetensors")[1]
    student = load_checkpoint(final / "student" / "model.safetensors")[1]
    assert teacher["calibration"]["n"] == student["calibration"]["n"]
    n_val = student["calibration"]["n"]
    assert 0 < n_val < 12
    # every sample is used: the validation share of all 12, not of a fold's training part
    assert n_val == pytest.approx(12 * 0.2, abs=1.5)
    assert not (final / "eval.json").exists()
    images = sorted((tmp_path / "data").glob("*.png"))[:2]
    served = KdModel.load(final / "student" / "model.safetensors", "cpu").predict(images)
    assert len(served) == 2 and student["temperature"] > 0


def test_non_finite_inputs_are_bad_input_and_the_rest_is_predicted(spied_run, tmp_path) -> None:
    """A float TIFF holding NaN and one holding only inf are skipped as bad input, named on
    stderr (exit 2), while the good image is predicted; the checkpoint is not blamed and no
    library warning reaches the terminal."""
    from PIL import Image

    result, _, tmp = spied_run
    good = sorted((tmp / "data").glob("*.png"))[0]
    pixels = np.asarray(Image.open(good), dtype=np.float32)
    with_nan = pixels.copy()
    with_nan[2:5, 2:5] = np.nan
    Image.fromarray(with_nan, mode="F").save(tmp_path / "nan.tif")
    Image.fromarray(np.full_like(pixels, np.inf), mode="F").save(tmp_path / "inf.tif")
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    args = [str(good), str(tmp_path / "nan.tif"), str(tmp_path / "inf.tif")]
    done = kd_in_process("predict", str(ckpt), *args, "--json", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    (got,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert got["image"] == str(good)
    for name, count in (("nan.tif", 9), ("inf.tif", 1024)):  # the path once, then the reason
        line = f"skipped {tmp_path / name}: holds NaN or infinite values ({count} NaN"
        assert line in done.stderr, done.stderr
    assert "2 of 3 images could not be read" in done.stderr
    assert "diverged" not in done.stderr and "Warning" not in done.stderr
