"""End-to-end: tiny real training runs through the CLI and the library."""

from __future__ import annotations

import csv
import json
import os
import re

import numpy as np
import pytest
import torch

import kdtoolkit
from kdtoolkit.builtin.manual import ManualProvider
from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.engine import stage as engine_stage
from kdtoolkit.engine import train
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.models.checkpoint import load_checkpoint
from kdtoolkit.report.results import read_results
from tests.conftest import kd

METRICS = {"accuracy", "precision", "recall", "f1", "macro_f1"}


def test_cli_run_writes_every_file(tmp_path, tiny_recipe):
    result = kd("run", str(tiny_recipe), "--quiet")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in (
        "recipe.resolved.json",
        "folds.json",
        "run.log",
        "results.json",
        "results.csv",
        "report.md",
        "figures/confusion.png",
        "figures/curves.png",
        "figures/gradcam.png",
        "figures/results_table.png",
    ):
        assert (run / name).is_file(), name
    for k in (0, 1):
        for role in ("teacher", "student", "baseline_full"):
            assert (run / f"fold_{k}" / role / "model.safetensors").is_file()
            meta = json.loads((run / f"fold_{k}" / role / "model.json").read_text())
            assert meta["classes"] == ["low", "mid", "high"]
            assert meta["recipe"]["cv"]["folds"] == 2
        assert not (run / f"fold_{k}" / "student" / "last.pt").exists()
    results = json.loads((run / "results.json").read_text())
    assert set(results["summary"]) == {"teacher_crop", "baseline_full", "student"}
    for row, metrics in results["summary"].items():
        assert set(metrics) >= METRICS, row
        for value in metrics.values():
            assert set(value) == {"mean", "std"}
            assert value["mean"] is None or 0 <= value["mean"] <= 1 or row
    assert len(results["folds"]) == 2
    assert set(results["folds"][0]["student"]) >= METRICS | {"pointing_game", "cam_iou"}
    assert 0 <= results["folds"][0]["student"]["pointing_ceiling"] <= 1
    # dead CAMs per row: each fold's share, and over the folds weighted by held-out counts
    n_test = [
        len(json.loads((run / f"fold_{k}" / "eval.json").read_text())["predictions"]["index"])
        for k in (0, 1)
    ]
    for row in ("student", "baseline_full"):
        shares = [f[row]["dead_cam"] for f in results["folds"]]
        assert all(0 <= v <= 1 for v in shares)
        expected = np.dot(shares, n_test) / sum(n_test)
        assert results["dead_cam"][row] == pytest.approx(expected)
    evaluation = json.loads((run / "fold_0" / "eval.json").read_text())
    pointing = evaluation["predictions"]["pointing"]
    assert set(pointing) == {"student", "baseline_full"}
    for row, row_hits in pointing.items():
        assert len(row_hits) == len(evaluation["predictions"]["index"])
        assert set(row_hits) <= {0, 1}
        assert np.mean(row_hits) == pytest.approx(evaluation["metrics"][row]["pointing_game"])
    history = json.loads((run / "fold_0" / "student" / "model.json").read_text())["history"]
    for record in history:  # the student has three terms: each one's gradient share
        shares = {k: v for k, v in record.items() if k.startswith("grad_share_")}
        assert len(shares) == 3 and sum(shares.values()) == pytest.approx(1)
    acc = [f["student"]["accuracy"] for f in results["folds"]]
    assert results["summary"]["student"]["accuracy"]["mean"] == pytest.approx(np.mean(acc))
    report = (run / "report.md").read_text()
    assert "crops (teacher, upper bound)" in report and "full image, student" in report
    assert "gap" in report and "pointing ceiling" in report and "dead CAMs (%)" in report
    resolved = json.loads((run / "recipe.resolved.json").read_text())
    assert resolved["recipe"]["loss"][2]["name"] == "attention_mse"


def test_no_held_out_sample_reaches_training(tmp_path, tiny_recipe, monkeypatch):
    seen: list[dict] = []
    original_train, original_provide = train.train_stage, ManualProvider.provide

    def spy_train(stage, train_loader, val_loader, *args, **kwargs):
        seen.append(
            {
                "stage": stage.name,
                "train": set(train_loader.dataset.indices),
                "val": set(val_loader.dataset.indices),
            }
        )
        return original_train(stage, train_loader, val_loader, *args, **kwargs)

    def spy_provide(self, request):
        seen.append({"stage": "roi", "train": set(request.train), "val": set()})
        return original_provide(self, request)

    monkeypatch.setattr(engine_stage, "train_stage", spy_train)
    monkeypatch.setattr(ManualProvider, "provide", spy_provide)
    recipe = load_recipe(tiny_recipe, ["teacher.epochs=1", "student.epochs=1"])
    kdtoolkit.run(recipe, quiet=True)
    folds = json.loads((tmp_path / "run" / "folds.json").read_text())["samples"]
    fold_of = np.array([s["fold"] for s in folds])
    # per fold: teacher, roi, student, baseline — in that order
    assert [s["stage"] for s in seen] == ["teacher", "roi", "student", "baseline_full"] * 2
    for k in (0, 1):
        held_out = set(np.flatnonzero(fold_of == k))
        for record in seen[4 * k : 4 * k + 4]:
            assert not (record["train"] | record["val"]) & held_out, record["stage"]
            assert record["train"].isdisjoint(record["val"])
    groups = {}
    for s in folds:
        groups.setdefault(s["group"], set()).add(s["fold"])
    assert all(len(f) == 1 for f in groups.values())


def test_interrupted_run_resumes_with_same_folds(tmp_path, tiny_recipe, monkeypatch):
    recipe = load_recipe(tiny_recipe, ["student.epochs=3"])
    original = train.train_stage

    def interrupt_student(stage, *args, **kwargs):
        if stage.name == "student":
            on_epoch = kwargs["on_epoch"]

            def stop_after_first(epoch, record):
                on_epoch(epoch, record)
                if epoch == 1:
                    raise KeyboardInterrupt

            kwargs["on_epoch"] = stop_after_first
        return original(stage, *args, **kwargs)

    monkeypatch.setattr(engine_stage, "train_stage", interrupt_student)
    run = tmp_path / "run"
    kept = re.escape(f"kept in {run}; rerun the same command to resume")
    with pytest.raises(Interrupted, match=kept):
        kdtoolkit.run(recipe, quiet=True)
    folds_before = (run / "folds.json").read_text()
    assert (run / "fold_0" / "teacher" / "model.safetensors").exists()
    assert (run / "fold_0" / "student" / "last.pt").exists()
    assert not (run / "fold_0" / "student" / "model.safetensors").exists()
    teacher_bytes = (run / "fold_0" / "teacher" / "model.safetensors").read_bytes()

    monkeypatch.setattr(engine_stage, "train_stage", original)
    result = kdtoolkit.run(recipe, quiet=True)
    assert (run / "folds.json").read_text() == folds_before
    assert (run / "fold_0" / "teacher" / "model.safetensors").read_bytes() == teacher_bytes
    meta = json.loads((run / "fold_0" / "student" / "model.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]
    log = (run / "run.log").read_text()
    assert "resuming" in log and "done before" in log
    assert set(result.results["summary"]) == {"teacher_crop", "baseline_full", "student"}


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_predict_reproduces_evaluation(tmp_path, tiny_recipe, loader):
    """Evaluation views, per sample or built on the device a batch at a time, are exactly what
    ``kd predict`` computes from the image files."""
    overrides = ["teacher.epochs=1", "student.epochs=1", "evaluate.baseline=false"]
    recipe = load_recipe(tiny_recipe, [*overrides, f"data.loader='{loader}'"])
    kdtoolkit.run(recipe, quiet=True)
    run = tmp_path / "run"
    assert ("held on cpu" in (run / "run.log").read_text()) == (loader == "device")
    evaluation = json.loads((run / "fold_0" / "eval.json").read_text())
    folds = json.loads((run / "folds.json").read_text())["samples"]
    images = [folds[i]["image"] for i in evaluation["predictions"]["index"]]
    ckpt = run / "fold_0" / "student" / "model.safetensors"
    result = kd(
        "predict",
        str(ckpt),
        *images,
        "--json",
        "--cam",
        str(tmp_path / "cams"),
        "--device",
        "cpu",
        "--no-calibrated",  # eval.json's student_probabilities_raw: the plain softmax
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in lines] == evaluation["predictions"]["student"]
    probs = np.array([[r["probabilities"][c] for c in ("low", "mid", "high")] for r in lines])
    predictions = evaluation["predictions"]
    np.testing.assert_allclose(probs, predictions["student_probabilities_raw"], atol=1e-4)
    # kd predict's default (calibrated) is the other key: softmax(z / T) with the fitted T
    calibrated = kdtoolkit.KdModel.load(ckpt, "cpu").predict_proba(images)
    np.testing.assert_allclose(
        calibrated, predictions["student_probabilities_calibrated"], atol=1e-5
    )
    z = np.array(predictions["logits"]["student"]) / predictions["temperature"]["student"]
    by_hand = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(
        predictions["student_probabilities_calibrated"],
        by_hand / by_hand.sum(1, keepdims=True),
        atol=1e-6,
    )
    assert len(list((tmp_path / "cams").glob("*_cam.png"))) == len(images)
    same = kdtoolkit.KdModel.load(ckpt, "cpu").predict(images[:2])
    assert [p.label for p in same] == [r["class"] for r in lines[:2]]


def test_bad_manifest_keeps_earlier_results(tmp_path, tiny_recipe, tiny_manifest):
    kdtoolkit.run(load_recipe(tiny_recipe, ["teacher.epochs=1", "student.epochs=1"]), quiet=True)
    results = (tmp_path / "run" / "results.json").read_bytes()
    text = tiny_manifest.read_text().splitlines()
    text[2] = text[2].replace("mid", "middle")
    text[5] = text[5].replace(".png", ".gif")
    tiny_manifest.write_text("\n".join(text) + "\n")
    result = kd(
        "run", str(tiny_recipe), "--quiet", "--set", "teacher.epochs=1", "--set", "student.epochs=1"
    )
    assert result.returncode == 2
    assert f"{tiny_manifest}:3:" in result.stderr and "middle" in result.stderr
    assert f"{tiny_manifest}:6:" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "run" / "results.json").read_bytes() == results


def test_other_recipe_in_same_folder_is_refused(tmp_path, tiny_recipe):
    recipe = load_recipe(
        tiny_recipe,
        ["teacher.epochs=1", "student.epochs=1", "cv.only=[0]", "evaluate.baseline=false"],
    )
    kdtoolkit.run(recipe, quiet=True)
    result = kd("run", str(tiny_recipe), "--quiet", "--set", "cv.folds=3")
    assert result.returncode == 2 and "different recipe" in result.stderr
    assert "--force" in result.stderr
    # the same recipe, the other fold: a run in parts; the report covers both folds
    recipe.cv.only = [1]
    result = kdtoolkit.run(recipe, quiet=True)
    assert result.results["folds_run"] == [0, 1] and len(result.results["folds"]) == 2
    assert "earlier run" in (tmp_path / "run" / "run.log").read_text()


def test_seeded_cpu_runs_repeat_exactly(tmp_path, tiny_recipe):
    overrides = ["teacher.epochs=1", "student.epochs=1", "cv.only=[0]", "evaluate.cam_examples=0"]
    first = kdtoolkit.run(load_recipe(tiny_recipe, overrides), quiet=True)
    again = kdtoolkit.run(
        load_recipe(tiny_recipe, [*overrides, f"experiment.output='{tmp_path / 'again'}'"]),
        quiet=True,
    )
    assert first.results["folds"] == again.results["folds"]
    a, _ = load_checkpoint(tmp_path / "run" / "fold_0" / "student" / "model.safetensors")
    b, _ = load_checkpoint(tmp_path / "again" / "fold_0" / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_paired_rows_differ_only_in_their_loss(tmp_path, tiny_recipe):
    """``experiment.paired`` (the default): a student whose loss is the baseline's own
    cross-entropy starts from the baseline's weights and sees its batches and augmentation, so
    the two train to the same weights bit for bit; unpaired, their seeds differ."""
    base = ["teacher.epochs=1", "student.epochs=2", "cv.only=[0]", "evaluate.cam_examples=0"]
    base += ["loss=[{name='ce', weight=1.0}]"]

    def weights(name: str, *overrides: str) -> tuple[dict, dict]:
        out = f"experiment.output='{tmp_path / name}'"
        kdtoolkit.run(load_recipe(tiny_recipe, [*base, out, *overrides]), quiet=True)
        fold = tmp_path / name / "fold_0"
        student = load_checkpoint(fold / "student" / "model.safetensors")[0]
        baseline = load_checkpoint(fold / "baseline_full" / "model.safetensors")[0]
        return student, baseline

    student, baseline = weights("paired")
    assert student.keys() == baseline.keys()
    assert all(torch.equal(student[k], baseline[k]) for k in student)
    student, baseline = weights("unpaired", "experiment.paired=false")
    assert not all(torch.equal(student[k], baseline[k]) for k in student)


def test_cam_names_never_overwrite_each_other(tmp_path):
    from kdtoolkit.serving.predict import cam_name

    used: set[str] = set()
    names = [cam_name(tmp_path / d / "slice.png", used) for d in ("a", "b", "b")]
    assert names == ["slice_cam.png", "b_slice_cam.png", "b_slice_2_cam.png"]


def test_folds_run_on_another_machine_join_the_report(tmp_path, tiny_recipe):
    """A fold run elsewhere (its images at other absolute paths) and brought back without its
    checkpoints (eval.json, model.json, cams.npz) is reported with the folds run here."""
    overrides = ["teacher.epochs=1", "student.epochs=1", "evaluate.cam_examples=2"]
    kdtoolkit.run(load_recipe(tiny_recipe, [*overrides, "cv.only=[0]"]), quiet=True)
    run = tmp_path / "run"
    folds_path = run / "folds.json"
    folds = json.loads(folds_path.read_text())
    root = folds.pop("root")
    folds_path.write_text(json.dumps(folds))  # the older form: absolute paths, no root
    with RunProgress(tmp_path / "check.log", quiet=True) as progress:
        ctx = RunContext.open(load_recipe(tiny_recipe, overrides), progress)
    assert ctx.fold_of.tolist() == [s["fold"] for s in folds["samples"]]
    folds["root"] = "/gpu/box/data"
    for s in folds["samples"]:
        s["image"] = s["image"].replace(root, "/gpu/box/data")
    folds_path.write_text(json.dumps(folds))
    for heavy in [*run.rglob("*.safetensors"), *run.rglob("last.pt")]:
        heavy.unlink()
    fold0 = json.loads((run / "fold_0" / "eval.json").read_text())

    result = kdtoolkit.run(load_recipe(tiny_recipe, [*overrides, "cv.only=[1]"]), quiet=True)
    assert result.results["folds_run"] == [0, 1]
    assert result.results["folds"][0] == fold0["metrics"]
    assert all((run / "figures" / f).is_file() for f in ("curves.png", "gradcam.png"))

    folds["samples"][0]["image"] = "/gpu/box/data/another.png"
    folds_path.write_text(json.dumps(folds))
    with pytest.raises(KdError, match="fold assignment was made for other data"):
        kdtoolkit.run(load_recipe(tiny_recipe, [*overrides, "cv.only=[1]"]), quiet=True)


def test_fold_ids_are_real_in_results_and_report(tmp_path, tiny_recipe):
    """A run of ``cv.only=[1]`` names its fold 1 in results.json, results.csv and report.md."""
    overrides = ["teacher.epochs=1", "student.epochs=1", "cv.only=[1]", "evaluate.cam_examples=0"]
    recipe = load_recipe(tiny_recipe, [*overrides, "evaluate.baseline=false"])
    result = kdtoolkit.run(recipe, quiet=True)
    run = tmp_path / "run"
    assert result.results["folds_run"] == [1]
    with open(run / "results.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert {line["fold"] for line in lines} == {"1", "mean", "std"}
    per_fold = (run / "report.md").read_text().split("## Accuracy per fold (%)")[1]
    fold_lines = [line for line in per_fold.split("##")[0].splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in fold_lines] == ["fold", "1"]
    again = read_results(run)
    assert again.fold_ids == [1] and again.summary == result.run.summary
    assert json.loads((run / "fold_1" / "eval.json").read_text())["fold"] == 1


def test_engine_cross_entropy_is_the_builtin_ce():
    """Teacher and baselines train with the engine's own cross-entropy; it gives the numbers
    of the built-in ``ce`` term (no label smoothing), with and without class weights."""
    from kdtoolkit.engine.loss import cross_entropy
    from kdtoolkit.plugins.loss import CompositeLoss, LossContext
    from kdtoolkit.plugins.manager import collect_registries, make_plugin_manager

    builtin = collect_registries(make_plugin_manager(load_entry_points=False)).losses.get("ce")
    reference = CompositeLoss([("ce", 1.0, builtin())])
    torch.manual_seed(0)
    logits = torch.randn(8, 3, requires_grad=True)
    labels = torch.randint(0, 3, (8,))
    for weights in (None, torch.tensor([0.5, 1.0, 2.0])):
        ctx = LossContext(
            student=torch.nn.Identity(),
            images=torch.zeros(8, 1, 4, 4),
            features=torch.zeros(8, 2, 1, 1),
            logits=logits,
            labels=labels,
            boxes=None,
            masks=None,
            class_weights=weights,
        )
        (mine, parts), (theirs, their_parts) = cross_entropy()(ctx), reference(ctx)
        assert torch.equal(mine, theirs) and parts == their_parts
        (grad,) = torch.autograd.grad(mine, logits)
        (their_grad,) = torch.autograd.grad(theirs, logits)
        assert torch.equal(grad, their_grad)


PLAIN_CE_PLUGIN = """
import torch.nn.functional as F

from kdtoolkit import hookimpl
from kdtoolkit.plugins.loss import LossTerm


class PlainCE(LossTerm):
    def forward(self, ctx):
        return F.cross_entropy(ctx.logits.float(), ctx.labels)


@hookimpl
def kd_register_losses(registry):
    registry.register("plain_ce", PlainCE)
"""


def test_builtin_losses_disabled_a_plugin_loss_still_trains_teacher_and_baseline(
    tmp_path, tiny_recipe
):
    """``KD_DISABLE_PLUGINS=kdtoolkit.builtin.losses``: a recipe using only a plugin's loss
    runs; teacher and baseline do not need the built-in ``ce``."""
    site = tmp_path / "site"
    (site / "kd_plain").mkdir(parents=True)
    (site / "kd_plain" / "__init__.py").write_text(PLAIN_CE_PLUGIN)
    info = site / "kd_plain-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-plain\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdtoolkit]\nplain = kd_plain\n")
    text = tiny_recipe.read_text().split("[[loss]]")[0]
    text += '[[loss]]\nname = "plain_ce"\n\n[evaluate]\ncam_examples = 0\n'
    tiny_recipe.write_text(text)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "KD_DISABLE_PLUGINS": "kdtoolkit.builtin.losses",
    }
    listed = kd("plugins", env=env)
    assert "plain_ce" in listed.stdout and " ce " not in listed.stdout
    result = kd(
        "run", str(tiny_recipe), "--quiet", "--set", "teacher.epochs=1", "--set",
        "student.epochs=1", "--set", "cv.only=[0]", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for role in ("teacher", "student", "baseline_full"):
        meta = json.loads((run / "fold_0" / role / "model.json").read_text())
        key = "train_plain_ce" if role == "student" else "train_ce"
        assert key in meta["history"][0], role
    results = json.loads((run / "results.json").read_text())
    assert set(results["summary"]) == {"teacher_crop", "baseline_full", "student"}
