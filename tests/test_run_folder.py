"""The run folder is stamped only after every refusal check; a refused run leaves it as it was;
a changed manifest remakes what depends on it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.engine.run import run
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.loss import CompositeLoss
from tests.conftest import kd

SMALL = ["cv.only=[0]", "teacher.epochs=1", "student.epochs=1"]


def folder_hash(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) with the digest of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_refused_run_on_an_unstamped_folder_leaves_it_byte_identical(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    run(load_recipe(tiny_recipe, SMALL), quiet=True)
    (out / "recipe.resolved.json").unlink()  # fold folders copied in from another machine
    (out / "run.log").unlink()
    before = folder_hash(out)
    result = kd(
        "run",
        str(tiny_recipe),
        "--quiet",
        *(f"--set={s}" for s in [*SMALL[:1], "teacher.epochs=2"]),
    )
    assert result.returncode == 2 and "another recipe" in result.stderr, result.stderr
    assert folder_hash(out) == before
    again = kd("run", str(tiny_recipe), "--quiet", *(f"--set={s}" for s in SMALL))
    assert again.returncode == 0, again.stderr
    assert "evaluated before, reusing" in (out / "run.log").read_text()
    report = kd("report", str(out))
    assert report.returncode == 0, report.stderr


def test_failed_run_takes_back_the_stamp_it_made_and_logs_why(tmp_path, tiny_recipe, monkeypatch):
    original = CompositeLoss.forward

    def poisoned(self, ctx):
        total, parts = original(self, ctx)
        return total * float("nan"), parts

    monkeypatch.setattr(CompositeLoss, "forward", poisoned)
    with pytest.raises(KdError, match="nan"):
        run(load_recipe(tiny_recipe, SMALL), quiet=True)
    out = tmp_path / "run"
    assert not (out / "recipe.resolved.json").exists()
    assert "stopped: fold 0 teacher epoch 1" in (out / "run.log").read_text().splitlines()[-1]
    monkeypatch.setattr(CompositeLoss, "forward", original)
    run(load_recipe(tiny_recipe, [*SMALL, "teacher.lr=0.0005"]), quiet=True)  # no --force


def test_editing_one_label_retrains_what_depends_on_it(tmp_path, tiny_recipe, tiny_manifest):
    recipe = load_recipe(tiny_recipe, SMALL)
    first = run(recipe, quiet=True)
    teacher = tmp_path / "run" / "fold_0" / "teacher" / "model.safetensors"
    trained = teacher.read_bytes()
    rows = tiny_manifest.read_text().splitlines()
    header = rows[0].split(",")
    label = header.index("label")
    cells = rows[1].split(",")
    cells[label] = "high" if cells[label] != "high" else "low"
    rows[1] = ",".join(cells)
    tiny_manifest.write_text("\n".join(rows) + "\n")
    second = run(recipe, quiet=True)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "fold 0 teacher: the data changed since" in log
    assert log.count("evaluated before, reusing") == 0
    assert teacher.read_bytes() != trained
    assert second.run.folds[0].to_dict() != first.run.folds[0].to_dict()
    third = run(recipe, quiet=True)  # unchanged data: reused
    assert "evaluated before, reusing" in (tmp_path / "run" / "run.log").read_text()
    assert third.run.folds[0].to_dict() == second.run.folds[0].to_dict()
    shutil.rmtree(tmp_path / "run")


def test_report_waits_for_no_run_it_refuses_a_locked_folder(tmp_path):
    from kdtoolkit.engine.lock import RunLock
    from kdtoolkit.engine.outputs import rebuild_report

    out = tmp_path / "run"
    out.mkdir()
    recipe = {"cv": {"folds": 2}, "teacher": {"backbone": "a"}, "student": {"backbone": "b"}}
    (out / "recipe.resolved.json").write_text(json.dumps({"digest": "x", "recipe": recipe}))
    with RunLock(out), pytest.raises(KdError, match="in use"):
        rebuild_report(out)
    with pytest.raises(KdError, match="no finished fold"):
        rebuild_report(out)


def test_validate_refuses_what_run_refuses(tiny_recipe):
    result = kd("validate", str(tiny_recipe), "--set", "experiment.device=cuda:7")
    assert result.returncode == 2 and "experiment.device" in result.stderr, result.stderr
    with pytest.raises(KdError, match="temperature"):
        load_recipe(tiny_recipe, ["loss.1.temperature=1e-30"])


def test_a_fold_evaluated_on_other_data_is_left_out(tmp_path, tiny_recipe, tiny_manifest):
    run(load_recipe(tiny_recipe, SMALL), quiet=True)  # fold 0
    tiny_manifest.write_text(tiny_manifest.read_text().replace(",mid,", ",low,", 1))
    other = [s.replace("cv.only=[0]", "cv.only=[1]") for s in SMALL]
    result = run(load_recipe(tiny_recipe, other), quiet=True)
    assert result.run.fold_ids == [1]
    assert "fold 0: evaluated on other data" in (tmp_path / "run" / "run.log").read_text()


def test_refused_compare_leaves_its_folder_byte_identical(tmp_path, tiny_recipe):
    """kd compare checks every cached output before it stamps its folder or starts its log."""
    out = tmp_path / "gap"
    args = ["compare", str(tiny_recipe), "--output", str(out), "--quiet", "--variant", "paper:"]
    first = kd(*args, "--set=cv.only=[0]", "--set=teacher.epochs=1", "--set=student.epochs=1")
    assert first.returncode == 0, first.stderr
    (out / "recipe.resolved.json").unlink()  # fold folders copied in from another machine
    (out / "gap_closure.log").unlink()
    before = folder_hash(out)
    refused = kd(*args, "--set=cv.only=[0]", "--set=teacher.epochs=2", "--set=student.epochs=1")
    assert refused.returncode == 2 and "another definition" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert folder_hash(out) == before


def test_reordered_manifest_keeps_each_images_fold(tmp_path, tiny_recipe, tiny_manifest):
    recipe = load_recipe(tiny_recipe, SMALL)
    evaluation = tmp_path / "run" / "fold_0" / "eval.json"

    def held_out() -> list[str]:
        """Fold 0's held-out images, by the manifest's current row order."""
        header, *rows = tiny_manifest.read_text().splitlines()
        image = header.split(",").index("image")
        index = json.loads(evaluation.read_text())["predictions"]["index"]
        return sorted(rows[i].split(",")[image] for i in index)

    run(recipe, quiet=True)
    before = held_out()
    header, *rows = tiny_manifest.read_text().splitlines()
    tiny_manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")
    run(recipe, quiet=True)  # not refused: the same images, in another order
    log = (tmp_path / "run" / "run.log").read_text()
    assert "fold 0 teacher: the data changed since" in log  # the batches' order changed
    assert held_out() == before and len(before) < len(rows)


def test_saved_folds_keep_each_rows_fold_when_rows_share_an_image(tmp_path):
    """Two slices of one volume in different folds keep them, reordered or not; slices match
    by value when the file records them, else in their saved order."""
    from kdtoolkit.engine.context import saved_folds

    root = tmp_path
    records = [("a.dcm", 3, 0), ("a.dcm", 7, 1), ("b.png", None, 0)]
    with_slices = {
        "root": str(root),
        "samples": [
            {"image": str(root / n), "fold": f, **({"slice": k} if k is not None else {})}
            for n, k, f in records
        ],
    }
    path = tmp_path / "folds.json"
    names, slices = ["a.dcm", "a.dcm", "b.png"], [3, 7, None]
    assert list(saved_folds(path, with_slices, names, root, 1, slices)) == [0, 1, 0]
    assert list(saved_folds(path, with_slices, names[::-1], root, 1, slices[::-1])) == [0, 1, 0]
    assert list(saved_folds(path, with_slices, names[1:] + names[:1], root, 1, [7, None, 3])) == [
        1,
        0,
        0,
    ]
    older = {
        "root": str(root),
        "samples": [{k: v for k, v in s.items() if k != "slice"} for s in with_slices["samples"]],
    }
    assert list(saved_folds(path, older, names, root, 1, slices)) == [0, 1, 0]
    assert list(saved_folds(path, older, ["b.png", "a.dcm", "a.dcm"], root, 1)) == [0, 0, 1]
    with pytest.raises(KdError, match="other data"):
        saved_folds(path, with_slices, ["a.dcm", "b.png", "b.png"], root, 1, [3, None, None])


def test_a_bad_compare_variant_is_named_by_validate_and_compare(tmp_path, tiny_recipe):
    text = (
        tiny_recipe.read_text()
        + '\n[compare]\nvariants.good = []\nvariants.bad = ["loss.0.weigth=0.3"]\n'
    )
    tiny_recipe.write_text(text)
    for command in ("validate", "compare"):
        result = kd(command, str(tiny_recipe), "--quiet" if command == "compare" else "--show")
        assert result.returncode == 2, result.stderr
        assert "compare.variants.bad: loss[0].weigth: unknown option" in result.stderr
    assert not (tmp_path / "run-gap_closure").exists()


def test_validate_refuses_the_variants_compare_refuses(tmp_path, tiny_recipe):
    tiny_recipe.write_text(
        tiny_recipe.read_text() + '\n[compare]\nvariants.longer = ["teacher.epochs=5"]\n'
    )
    for command in ("validate", "compare"):
        result = kd(command, str(tiny_recipe), "--quiet" if command == "compare" else "--show")
        assert result.returncode == 2, result.stderr
        assert "variant 'longer' changes teacher.epochs; a variant may change only" in (
            result.stderr
        )
    assert not (tmp_path / "run-gap_closure").exists()
