"""The two-stage baseline (ROI provider box → teacher crop → teacher) and the ``yolo`` provider
in a whole run: crop geometry, offline end-to-end run, report, and detector-config errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.font_manager  # noqa: F401  (its font cache is built before HOME is emptied)
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdtoolkit
from kdtoolkit.config.recipe import RecipeError, load_recipe
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.imageio import load_image
from kdtoolkit.data.manifest import read_manifest
from kdtoolkit.data.view import crop_roi, normalise, view_config
from kdtoolkit.engine.evaluate import two_stage_logits
from kdtoolkit.engine.outputs import rebuild_report
from kdtoolkit.engine.plan import fold_plan, two_stage_crops
from kdtoolkit.engine.stage import enclosure_samples, stage_samples
from kdtoolkit.engine.train import predict_logits
from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.plugins import manager as plugin
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.roi import RoiProvider, RoiResult
from kdtoolkit.testing import TINY_RECIPE, run_tiny_recipe, tiny_manifest
from tests.conftest import CLASSES, kd
from tests.test_yolo import empty_home, offline  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
YOLO = ['roi.provider="yolo"', "roi.epochs=1", "roi.imgsz=64", "roi.batch=4"]


def tiny_samples(tiny_recipe: Path) -> tuple[list, object]:
    """The tiny manifest's samples, some with a rotated ROI, and the run's view config."""
    recipe = load_recipe(tiny_recipe)
    samples = read_manifest(recipe.data.manifest, CLASSES).samples
    angles = [0.0, 17.5, -30.0, 90.0]
    samples = [
        dataclasses.replace(s, angle=angles[s.index % len(angles)], box=tuple(np.add(s.box, 0.3)))
        for s in samples
    ]
    return samples, view_config(recipe)


# --------------------------------------------------------------------------- geometry


def test_two_stage_crop_is_the_teacher_crop(tiny_recipe):
    samples, cfg = tiny_samples(tiny_recipe)
    dataset = KdDataset(samples, np.arange(len(samples)), cfg, train=False, seed=0)
    for s in samples[:8]:
        teacher_view = dataset[s.index]["crop"]
        image = load_image(s.image, cfg.channels)
        two_stage_view = normalise(crop_roi(image, s.box, s.angle, cfg.crop_size), cfg)
        assert teacher_view.shape == (cfg.channels, *cfg.crop_size)
        assert torch.equal(teacher_view, two_stage_view), (s.index, s.angle)


def test_two_stage_on_expert_boxes_reproduces_the_teacher_crop_row(tiny_recipe):
    samples, cfg = tiny_samples(tiny_recipe)
    torch.manual_seed(0)
    teacher = build_backbone("resnet10t", len(CLASSES), cfg.channels, {}).eval()
    test_idx = np.arange(1, len(samples), 2)
    loader = DataLoader(KdDataset(samples, test_idx, cfg, train=False, seed=0), batch_size=8)
    expected, _, indices = predict_logits(teacher, loader, "crop", torch.device("cpu"))
    assert indices.tolist() == test_idx.tolist()

    rois = RoiResult(
        boxes=np.array([s.box for s in samples]),
        angles=np.array([s.angle for s in samples]),
        found=np.ones(len(samples), dtype=bool),
    )
    logits, crop_ms = two_stage_logits(teacher, samples, test_idx, rois, cfg, torch.device("cpu"))
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    assert crop_ms > 0


# --------------------------------------------------------------------------- whole run


@pytest.mark.slow
def test_yolo_run_offline_writes_two_stage_results_inside_the_run_folder(
    tmp_path,
    tiny_recipe,
    offline,  # noqa: F811  (the imported fixture)
    empty_home,  # noqa: F811
    capfd,
):
    home, cwd = empty_home
    before = {p for p in tmp_path.rglob("*")}
    recipe = load_recipe(tiny_recipe, ["teacher.epochs=1", "student.epochs=1", *YOLO])
    result = kdtoolkit.run(recipe, quiet=True)

    run = tmp_path / "run"
    assert offline == [], f"network attempted: {offline}"
    assert list(home.iterdir()) == [], "something was written to the home folder"
    assert list(cwd.iterdir()) == [], "something was written to the working folder (runs/?)"
    outside = {p for p in tmp_path.rglob("*") if run not in p.parents and p != run} - before
    assert not outside, f"written outside the run folder: {sorted(outside)}"
    assert "Ultralytics" not in capfd.readouterr().out

    results = json.loads((run / "results.json").read_text())
    assert result.results == results
    assert set(results["summary"]) == {"teacher_crop", "baseline_full", "two_stage", "student"}
    assert 0 <= results["summary"]["two_stage"]["accuracy"]["mean"] <= 1
    assert all("two_stage" in fold for fold in results["folds"]) and len(results["folds"]) == 2
    assert set(results["roi"]) == {"0", "1"}
    for k, metrics in results["roi"].items():
        assert {"map50", "map50_95", "n_fallback", "latency_ms"} <= set(metrics), k
        assert 0 <= metrics["map50_95"] <= metrics["map50"] <= 1
        assert metrics["n_fallback"] == int(metrics["n_fallback"]) >= 0
        assert metrics["latency_ms"] > 0
        roi = run / f"fold_{k}" / "roi"
        assert (roi / "train" / "weights" / "best.pt").is_file()
        assert (roi / "config" / "Ultralytics" / "settings.json").is_file()
        evaluation = json.loads((run / f"fold_{k}" / "eval.json").read_text())
        assert len(evaluation["predictions"]["two_stage"]) == evaluation["n_test"]
        latency = evaluation["latency_ms"]
        assert latency["two_stage_detector"] == pytest.approx(metrics["latency_ms"])
        assert latency["two_stage"] == pytest.approx(
            latency["two_stage_detector"] + latency["two_stage_crop"]
        )
    assert {"student", "two_stage", "two_stage_detector"} <= set(results["latency_ms"])
    assert results["models"]["two_stage"] == "yolo → teacher on expert crops (resnet10t)"

    report = (run / "report.md").read_text()
    row = "| two-stage: ROI crop → classifier | yolo → teacher on expert crops (resnet10t) |"
    assert row in report
    assert "## ROI provider (held-out folds)" in report
    assert "| metric | mean ± std | fold 0 | fold 1 | meaning |" in report
    assert "detection mAP@0.5, held-out images |" in report
    assert "detection mAP@0.5:0.95, held-out images |" in report
    assert "images without a detection (fallback box used) |" in report
    assert "| two-stage: ROI provider + crop + teacher |" in report
    assert "| two-stage: ROI provider only |" in report
    assert "| student alone, full image |" in report
    log = (run / "run.log").read_text()
    assert "yolo fold 0: epoch 1/1" in log and "detector latency" in log


# --------------------------------------------------------------------------- configuration


def test_bad_detector_model_fails_validation_with_one_line(tmp_path, tiny_recipe):
    result = kd(
        "validate",
        str(tiny_recipe),
        "--set",
        'roi.provider="yolo"',
        "--set",
        'roi.model="yolo11q.yaml"',
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip().startswith("roi")]
    assert len(lines) == 1, result.stderr
    assert "roi: yolo model 'yolo11q.yaml': no such ultralytics model YAML" in lines[0]
    assert "did you mean" in lines[0]


def test_missing_detector_weights_stop_the_run_before_it_starts(tmp_path, tiny_recipe):
    missing = tmp_path / "missing.pt"
    result = kd(
        "run",
        str(tiny_recipe),
        "--quiet",
        "--set",
        'roi.provider="yolo"',
        "--set",
        f"roi.weights={json.dumps(str(missing))}",
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip().startswith("roi")]
    assert len(lines) == 1, result.stderr
    assert f"roi: yolo weights '{missing}': no such file" in lines[0]
    assert not (tmp_path / "run").exists()


def test_any_provider_construction_error_is_a_recipe_problem(tiny_recipe, monkeypatch):
    class FussyProvider(RoiProvider):
        def __init__(self, licence: str = "none") -> None:
            raise KdError(f"fussy: licence file {licence!r} not found")

    regs = plugin.collect_registries(plugin.make_plugin_manager(load_entry_points=False))
    regs.roi_providers.register("fussy", FussyProvider)
    monkeypatch.setattr(plugin, "registries", lambda: regs)
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe, ['roi.provider="fussy"', "roi.licence=x.lic"])
    assert info.value.problems == ["roi: fussy: licence file 'x.lic' not found"]
    with pytest.raises(RecipeError) as info:  # bad options: reported without constructing
        load_recipe(tiny_recipe, ['roi.provider="fussy"', "roi.licence=3"])
    assert [p.split(":")[0] for p in info.value.problems] == ["roi.licence"]


# --------------------------------------------------------------------------- recipes


def test_reference_recipe_uses_yolo_and_quick_start_manual():
    sos = load_recipe(ROOT / "recipes" / "sos.toml")
    assert sos.roi.provider == "yolo"
    assert sos.roi.options["epochs"] >= 30 and sos.roi.options["imgsz"] in (512, 640)
    assert load_recipe(ROOT / "recipes" / "sos-quick.toml").roi.provider == "manual"
    # switching the provider drops the file's yolo options; options given with --set stay
    manual = load_recipe(ROOT / "recipes" / "sos.toml", ['roi.provider="manual"'])
    assert manual.roi.provider == "manual" and manual.roi.options == {}
    assert manual.roi.mask == sos.roi.mask
    tuned = load_recipe(ROOT / "recipes" / "sos.toml", ["roi.epochs=5", 'roi.provider="yolo"'])
    assert tuned.roi.options["epochs"] == 5 and tuned.roi.options["imgsz"] == 512


# --------------------------------------------------------------------------- axis-aligned provider


class AxisBoxes(RoiProvider):
    """A perfect axis-aligned detector: the enclosure of each expert ROI, angle 0."""

    learned = True

    def provide(self, request):
        rows = enclosure_samples([request.samples[i] for i in request.predict])
        return RoiResult(
            boxes=np.array([s.box for s in rows]),
            angles=np.zeros(len(rows)),
            found=np.ones(len(rows), dtype=bool),
        )


class OrientedBoxes(AxisBoxes):
    """A perfect oriented detector: the expert ROIs themselves."""

    oriented = True

    def provide(self, request):
        rows = [request.samples[i] for i in request.predict]
        return RoiResult(
            boxes=np.array([s.box for s in rows]),
            angles=np.array([s.angle for s in rows]),
            found=np.ones(len(rows), dtype=bool),
        )


class AxisPlugin:
    __name__ = "kd_axis"

    @hookimpl
    def kd_register_roi_providers(self, registry):
        registry.register("axis_box", AxisBoxes)


class OrientedPlugin:
    __name__ = "kd_oriented"

    @hookimpl
    def kd_register_roi_providers(self, registry):
        registry.register("oriented_box", OrientedBoxes)


def rotated_manifest(folder: Path, angle: float) -> Path:
    """``tiny_manifest`` with every ROI rotated by ``angle`` degrees."""
    path = tiny_manifest(folder)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [[*rows[0], "angle"]] + [[*r, str(angle)] for r in rows[1:]]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_enclosure_samples_are_the_clipped_axis_aligned_box_around_the_roi(tiny_recipe):
    samples, cfg = tiny_samples(tiny_recipe)
    for s, e in zip(samples, enclosure_samples(samples), strict=True):
        corners = roi_corners(s.box, s.angle)  # by hand: min/max of the four corners, clipped
        x0, y0 = np.maximum(corners.min(0), 0)
        x1, y1 = np.minimum(corners.max(0), [s.width, s.height])
        np.testing.assert_allclose(e.box, (x0, y0, x1, y1), atol=1e-9)
        assert e.angle == 0 and e.crop is None and e.image == s.image and e.label == s.label
    # the classifier's views are what the provider's boxes cut: crop_roi at angle 0
    aligned = enclosure_samples(samples)
    dataset = KdDataset(aligned, np.arange(4), cfg, train=False, seed=0)
    for s in aligned[:4]:
        image = load_image(s.image, cfg.channels)
        expected = normalise(crop_roi(image, s.box, 0.0, cfg.crop_size), cfg)
        assert torch.equal(dataset[s.index]["crop"], expected)


JITTER = ["augment.roi_shift=[0.25, 0.05]", "augment.roi_scale=0.1", "augment.roi_degrees=5"]


def test_the_two_stage_row_has_its_own_classifier_only_when_the_teacher_crops_do_not_fit(
    tiny_recipe,
):
    samples, _ = tiny_samples(tiny_recipe)  # some rotated
    flat = [dataclasses.replace(s, angle=0.0) for s in samples]
    plain, jitter = load_recipe(tiny_recipe), load_recipe(tiny_recipe, JITTER)
    # an axis-aligned detector on rotated ROIs: enclosure crops, jitter or not
    assert two_stage_crops(plain, AxisBoxes, samples) == "enclosure"
    assert two_stage_crops(jitter, AxisBoxes, samples) == "enclosure"
    # its crops fit the teacher's (oriented, or no rotated ROI): the teacher, unless jittered
    assert two_stage_crops(plain, OrientedBoxes, samples) is None
    assert two_stage_crops(plain, AxisBoxes, flat) is None
    assert two_stage_crops(jitter, OrientedBoxes, samples) == "expert"
    assert two_stage_crops(jitter, AxisBoxes, flat) == "expert"
    # no learned provider, or no two-stage row: no classifier, whatever the jitter
    assert two_stage_crops(jitter, RoiProvider, samples) is None
    off = load_recipe(tiny_recipe, [*JITTER, "evaluate.two_stage=false"])
    assert two_stage_crops(off, OrientedBoxes, samples) is None


def test_the_plan_trains_the_teacher_on_exact_crops_and_the_classifier_on_its_crops(tiny_recipe):
    plain, jitter = load_recipe(tiny_recipe), load_recipe(tiny_recipe, JITTER)
    roles = ["teacher", "roi", "two_stage_classifier", "student", "baseline_full"]
    for recipe in (plain, jitter):
        for crops in ("enclosure", "expert"):
            plan = fold_plan(recipe, crops)
            assert [s.role for s in plan.stages[:-1]] == roles
            teacher, classifier = plan.stages[0], plan.stages[2]
            assert (teacher.crops, teacher.jitter) == ("expert", False)
            assert (classifier.crops, classifier.jitter) == (crops, recipe is jitter)
            assert plan.evaluation.two_stage_model == "two_stage_classifier"
        plan = fold_plan(recipe)  # the teacher reads the detector's crops: no extra stage
        assert [s.role for s in plan.stages[:-1]] == ["teacher", "roi", "student", "baseline_full"]
        assert (plan.stages[0].crops, plan.stages[0].jitter) == ("expert", False)
        assert plan.evaluation.two_stage_model == "teacher"
    assert all(not getattr(s, "jitter", False) for s in fold_plan(jitter).stages)


def test_jittered_expert_crops_are_cut_from_the_full_image(tiny_recipe):
    samples, _ = tiny_samples(tiny_recipe)
    samples = [dataclasses.replace(s, crop=s.image) for s in samples]  # as if a crop file
    jitter = load_recipe(tiny_recipe, JITTER)
    teacher = fold_plan(jitter).stages[0]
    expert = fold_plan(jitter, "expert").stages[2]
    enclosure = fold_plan(jitter, "enclosure").stages[2]
    assert stage_samples(samples, teacher) is None  # the run's, crop files included
    moved = stage_samples(samples, expert)
    assert [s.crop for s in moved] == [None] * len(samples)
    assert [(s.box, s.angle) for s in moved] == [(s.box, s.angle) for s in samples]
    assert stage_samples(samples, enclosure) == enclosure_samples(samples)


@pytest.mark.slow
def test_an_axis_aligned_provider_gets_a_classifier_trained_on_axis_aligned_crops(tmp_path):
    manifest = rotated_manifest(tmp_path / "rotated", 8.0)
    result = run_tiny_recipe(
        tmp_path, AxisPlugin(), roi={"provider": "axis_box"}, **{"data.manifest": str(manifest)}
    )
    run = result.output
    assert result.results["models"]["two_stage"] == (
        "axis_box → two-stage classifier on axis-aligned enclosure crops (resnet10t)"
    )
    report = (run / "report.md").read_text()
    assert "two-stage classifier on axis-aligned enclosure crops" in report
    # the row's predictions are the classifier's on the provider's crops, recomputed here
    cfg = view_config(load_recipe(TINY_RECIPE, **{"data.manifest": str(manifest)}))
    samples = read_manifest(manifest, CLASSES).samples
    for fold in result.results["folds_run"]:
        ckpt = run / f"fold_{fold}" / "two_stage_classifier" / "model.safetensors"
        classifier = load_model(ckpt, torch.device("cpu"))[0]
        evaluation = json.loads((run / f"fold_{fold}" / "eval.json").read_text())
        test_idx = np.array(evaluation["predictions"]["index"])
        everything = SimpleNamespace(samples=samples, predict=np.arange(len(samples)))
        rois = AxisBoxes().provide(everything)
        logits, _ = two_stage_logits(classifier, samples, test_idx, rois, cfg, torch.device("cpu"))
        assert logits.argmax(1).tolist() == evaluation["predictions"]["two_stage"]


def two_stage_predictions(run: Path, manifest: Path, provider: RoiProvider, fold: int) -> tuple:
    """(the row's saved predictions, the two-stage classifier's on ``provider``'s crops)."""
    cfg = view_config(load_recipe(TINY_RECIPE, **{"data.manifest": str(manifest)}))
    samples = read_manifest(manifest, CLASSES).samples
    ckpt = run / f"fold_{fold}" / "two_stage_classifier" / "model.safetensors"
    classifier = load_model(ckpt, torch.device("cpu"))[0]
    evaluation = json.loads((run / f"fold_{fold}" / "eval.json").read_text())
    test_idx = np.array(evaluation["predictions"]["index"])
    rois = provider.provide(SimpleNamespace(samples=samples, predict=np.arange(len(samples))))
    logits, _ = two_stage_logits(classifier, samples, test_idx, rois, cfg, torch.device("cpu"))
    return evaluation["predictions"]["two_stage"], logits.argmax(1).tolist()


@pytest.mark.slow
def test_an_oriented_provider_with_the_jitter_gets_a_classifier_on_jittered_expert_crops(
    tmp_path,
):
    manifest = rotated_manifest(tmp_path / "rotated", 8.0)
    jitter = {"augment.roi_shift": [0.25, 0.05], "augment.roi_degrees": 5.0}
    result = run_tiny_recipe(
        tmp_path,
        OrientedPlugin(),
        roi={"provider": "oriented_box"},
        **{"data.manifest": str(manifest)},
        **jitter,
    )
    run = result.output
    models = result.results["models"]
    assert models["two_stage"] == (
        "oriented_box → two-stage classifier on jittered expert crops (resnet10t)"
    )
    assert models["teacher_crop"] == "resnet10t on exact expert crops"
    report = (run / "report.md").read_text()
    assert "| oriented_box → two-stage classifier on jittered expert crops (resnet10t) |" in report
    assert "| resnet10t on exact expert crops |" in report
    for role, crops, jittered in (
        ("teacher", "expert", False),
        ("two_stage_classifier", "expert", True),
    ):
        meta = json.loads((run / "fold_0" / role / "model.json").read_text())
        assert (meta["crops"], meta["crop_jitter"]) == (crops, jittered), role
    saved, recomputed = two_stage_predictions(run, manifest, OrientedBoxes(), 0)
    assert saved == recomputed  # the row is the classifier's, not the teacher's
    assert rebuild_report(run).results.models == models  # kd report names them alike
