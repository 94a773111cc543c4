"""Statistics of the pooled held-out predictions: bootstrap intervals, paired comparisons,
McNemar, verdicts, gap-closure interval, repeated cross-validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score, f1_score

from kdtoolkit.errors import KdError
from kdtoolkit.report.markdown import write_report
from kdtoolkit.report.results import FoldResult, RunResults, read_results, write_results
from kdtoolkit.report.stats import (
    LEVEL,
    compute,
    interval,
    macro_f1_of,
    mcnemar_p,
    pool,
    qwk_of,
    resample_units,
    unit_counts,
    verdict,
)
from kdtoolkit.report.verdicts import statistics_lines
from kdtoolkit.testing import kd_in_process, run_tiny_recipe

ROWS = {"teacher_crop": 0.9, "baseline_full": 0.55, "student": 0.75, "two_stage": 0.8}


def fold_predictions(
    k: int, n: int = 30, seed: int = 0, groups: bool = True, pointing: bool = False
) -> dict:
    """Hand-made ``eval.json`` predictions of fold ``k``: samples ``k·n..`` in groups of 3."""
    rng = np.random.default_rng(seed + k)
    y = rng.integers(0, 3, n)
    out: dict = {"index": list(range(k * n, (k + 1) * n)), "label": y.tolist()}
    if groups:
        out["group"] = [f"patient {i // 3}" for i in out["index"]]
    for row, acc in ROWS.items():
        out[row] = np.where(rng.random(n) < acc, y, (y + 1) % 3).tolist()
    out["student_probabilities"] = [[1 / 3] * 3] * n
    if pointing:
        out["pointing"] = {r: rng.integers(0, 2, n).tolist() for r in ("student", "baseline_full")}
    return out


def brute_force(folds: list[dict], resamples: int, seed: int) -> dict:
    """The same statistics by a loop over resamples: each resample's entries concatenated."""
    pooled = pool(folds)
    draws = resample_units(pooled.n_units, resamples, seed)
    members = [np.flatnonzero(pooled.units == u) for u in range(pooled.n_units)]
    acc = {r: [] for r in ROWS}
    f1, qwk, diff, gap = [], [], [], []
    for b in range(resamples):
        chosen = np.concatenate([members[u] for u in draws[b]])
        y = pooled.labels[chosen]
        for r in ROWS:
            acc[r].append(np.mean(pooled.predicted[r][chosen] == y))
        p = pooled.predicted["student"][chosen]
        f1.append(f1_score(y, p, labels=[0, 1, 2], average="macro", zero_division=0))
        qwk.append(cohen_kappa_score(y, p, labels=[0, 1, 2], weights="quadratic"))
        diff.append(acc["student"][-1] - acc["baseline_full"][-1])
        t, s, base = acc["teacher_crop"][-1], acc["student"][-1], acc["baseline_full"][-1]
        if t > base:
            gap.append((s - base) / (t - base))

    def q(values: list[float]) -> list[float]:
        return np.quantile(values, [0.025, 0.975]).tolist()

    return {
        "student": q(acc["student"]),
        "f1": q(f1),
        "qwk": q(qwk),
        "diff": q(diff),
        "gap": q(gap),
        "gap_undefined": 1 - len(gap) / resamples,
    }


def test_bootstrap_intervals_equal_a_brute_force_loop() -> None:
    folds = [fold_predictions(0), fold_predictions(1)]
    stats = compute(folds, 3, ordinal=True, resamples=300, seed=7)
    want = brute_force(folds, 300, 7)
    assert stats.bootstrap == {
        "resamples": 300,
        "seed": 7,
        "unit": "group",
        "ci": 0.95,
        "n_units": 20,
        "n_predictions": 60,
    }
    student = stats.pooled["student"]
    np.testing.assert_allclose(student["ci95"], want["student"])
    np.testing.assert_allclose(student["macro_f1_ci95"], want["f1"])
    np.testing.assert_allclose(student["qwk_ci95"], want["qwk"])
    first = stats.comparisons[0]
    assert (first["a"], first["b"], first["metric"]) == ("student", "baseline_full", "accuracy")
    np.testing.assert_allclose(first["ci95"], want["diff"], atol=1e-12)
    gap = stats.gap_closure["student"]
    assert gap["undefined"] == pytest.approx(want["gap_undefined"])
    np.testing.assert_allclose(gap["ci95"], want["gap"])
    # the point estimates are the pooled ones
    y = np.concatenate([f["label"] for f in folds])
    s = np.concatenate([f["student"] for f in folds])
    b = np.concatenate([f["baseline_full"] for f in folds])
    t = np.concatenate([f["teacher_crop"] for f in folds])
    assert student["accuracy"] == pytest.approx(np.mean(s == y))
    assert first["diff"] == pytest.approx(np.mean(s == y) - np.mean(b == y))
    pooled_gap = (np.mean(s == y) - np.mean(b == y)) / (np.mean(t == y) - np.mean(b == y))
    assert gap["value"] == pytest.approx(pooled_gap)


def test_confusion_formulas_equal_sklearn() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        y, p = rng.integers(0, 4, 25), rng.integers(0, 4, 25)
        conf = np.zeros((4, 4))
        np.add.at(conf, (y, p), 1)
        f1 = f1_score(y, p, labels=range(4), average="macro", zero_division=0)
        assert macro_f1_of(conf) == pytest.approx(f1)
        qwk = cohen_kappa_score(y, p, labels=range(4), weights="quadratic")
        assert qwk_of(conf) == pytest.approx(qwk)
    assert qwk_of(np.diag([5.0, 0, 0])) == 1.0  # one class everywhere, as in metrics


def test_qwk_of_tiny_counts_equals_sklearn() -> None:
    """Every labelling of one to three samples into two or three classes: the expected
    disagreement is then at most 1, where a wrong threshold on it would show."""
    for k in (2, 3):
        for n in (1, 2, 3):
            for codes in np.ndindex(*([k * k] * n)):
                y, p = np.array(codes) // k, np.array(codes) % k
                conf = np.zeros((k, k))
                np.add.at(conf, (y, p), 1)
                if len(set(y) | set(p)) == 1:
                    assert qwk_of(conf) == 1.0  # one class everywhere
                    continue
                want = cohen_kappa_score(y, p, labels=range(k), weights="quadratic")
                assert qwk_of(conf) == pytest.approx(want, abs=1e-12), conf


def test_interval_is_the_percentile_interval_of_the_finite_values() -> None:
    values = np.array([0.4, np.nan, 0.1, np.inf, 0.3, 0.2, -np.inf])
    finite = np.array([0.1, 0.2, 0.3, 0.4])
    lo, hi = (1 - LEVEL) / 2, (1 + LEVEL) / 2
    assert interval(values) == pytest.approx(list(np.quantile(finite, [lo, hi])))
    assert interval(np.array([0.25, np.nan])) == [0.25, 0.25]  # one finite value
    assert interval(np.array([np.nan, np.inf])) is None


def test_pool_keeps_each_pointing_hit_on_its_own_sample() -> None:
    folds = [
        {
            "index": [0, 1, 2],
            "label": [0, 1, 1],
            "student": [0, 0, 1],
            "pointing": {"student": [1, 0, 0]},
        },
        {"index": [3, 4], "label": [1, 0], "student": [1, 1], "pointing": {"student": [0, 1]}},
    ]
    pooled = pool(folds, [0, 1])
    assert pooled is not None and pooled.unit == "sample" and pooled.n_units == 5
    assert pooled.outcomes["pointing_game"]["student"].tolist() == [1, 0, 0, 0, 1]
    assert pooled.outcomes["accuracy"]["student"].tolist() == [1, 0, 1, 1, 0]
    assert pooled.predicted["student"].tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("fold", "key"),
    [
        ({"index": 3, "label": [0]}, "predictions.index has int entries"),
        ({"index": [0, 1], "label": [0]}, "predictions.label has 1 entries for 2"),
        ({"index": [0], "label": [0], "group": ["a", "b"]}, "predictions.group has 2 entries"),
        ({"index": [0], "label": [0], "pointing": [1]}, "predictions.pointing must map rows"),
        ({"index": [0], "label": [0], "pointing": {"s": [1, 0]}}, "predictions.pointing.s has 2"),
    ],
)
def test_pool_names_the_fold_and_the_damaged_column(fold, key) -> None:
    with pytest.raises(KdError, match=f"^fold 7 eval.json: {key}"):
        pool([{"index": [5], "label": [1]}, fold], [3, 7])


def test_mcnemar_equals_binomtest_on_counts_made_by_hand() -> None:
    folds = [fold_predictions(0), fold_predictions(1)]
    stats = compute(folds, 3, resamples=50)
    y = np.concatenate([f["label"] for f in folds])
    for c in stats.comparisons:
        a = np.concatenate([f[c["a"]] for f in folds]) == y
        b = np.concatenate([f[c["b"]] for f in folds]) == y
        right, wrong = int(np.sum(a & ~b)), int(np.sum(b & ~a))
        assert c["discordant"] == [right, wrong] and c["n"] == len(y)
        assert c["p"] == pytest.approx(binomtest(min(right, wrong), right + wrong, 0.5).pvalue)
        assert c["test"] == "mcnemar-exact"
    assert mcnemar_p(0, 0) == 1.0
    pairs = [(c["a"], c["b"]) for c in stats.comparisons]
    assert pairs == [
        ("student", "baseline_full"),
        ("student", "two_stage"),
        ("two_stage", "baseline_full"),
    ]


def test_groups_are_resampled_whole() -> None:
    """All samples of a patient share their correctness: resampling patients gives a wider
    interval than resampling samples, and each resample holds whole patients."""
    n = 60
    right = np.repeat(np.random.default_rng(0).random(n // 6) < 0.6, 6)
    y = np.zeros(n, dtype=int)
    fold = {"index": list(range(n)), "label": y.tolist(), "student": np.where(right, 0, 1).tolist()}
    grouped = {**fold, "group": [f"p{i // 6}" for i in range(n)]}
    by_group = compute([grouped], 2, resamples=1000).pooled["student"]["ci95"]
    by_sample = compute([fold], 2, resamples=1000).pooled["student"]["ci95"]
    assert by_group[1] - by_group[0] > 1.5 * (by_sample[1] - by_sample[0])
    pooled = pool([grouped])
    assert pooled.unit == "group" and pooled.n_units == 10
    counts = unit_counts(resample_units(10, 5, 0), 10)
    per_entry = counts[:, pooled.units]  # every member of a group drawn as often as the group
    for g in range(10):
        members = per_entry[:, pooled.units == g]
        assert (members == members[:, :1]).all()
    assert (counts.sum(1) == 10).all()


@pytest.mark.parametrize(
    ("ci", "word"),
    [
        ([1e-9, 0.2], "better"),
        ([0.0, 0.2], "not distinguishable"),
        ([-0.2, 0.0], "not distinguishable"),
        ([-0.2, -1e-9], "worse"),
        ([-0.1, 0.1], "not distinguishable"),
        (None, "not distinguishable"),
    ],
)
def test_verdict_reads_only_the_interval(ci, word) -> None:
    assert verdict(ci) == word


def test_pointing_game_is_compared_when_the_folds_have_it() -> None:
    folds = [fold_predictions(k, pointing=True) for k in (0, 1)]
    stats = compute(folds, 3, resamples=100)
    pointing = [c for c in stats.comparisons if c["metric"] == "pointing_game"]
    assert [(c["a"], c["b"]) for c in pointing] == [("student", "baseline_full")]
    hits = {
        r: np.concatenate([f["pointing"][r] for f in folds]) for r in ("student", "baseline_full")
    }
    assert pointing[0]["diff"] == pytest.approx(
        hits["student"].mean() - hits["baseline_full"].mean()
    )
    right = int(np.sum((hits["student"] == 1) & (hits["baseline_full"] == 0)))
    assert pointing[0]["discordant"][0] == right
    assert stats.pooled["student"]["pointing_game"] == pytest.approx(hits["student"].mean())
    lo, hi = stats.pooled["student"]["pointing_game_ci95"]
    assert lo <= hits["student"].mean() <= hi
    assert "pointing_game" not in stats.pooled["teacher_crop"]


def test_variants_are_compared_with_baseline_and_student() -> None:
    folds = [fold_predictions(0)]
    folds[0]["student_roi"] = folds[0]["student"][::-1]
    del folds[0]["two_stage"]
    stats = compute(folds, 3, resamples=50)
    pairs = [(c["a"], c["b"]) for c in stats.comparisons]
    assert pairs == [
        ("student", "baseline_full"),
        ("student_roi", "baseline_full"),
        ("student_roi", "student"),
    ]
    assert set(stats.gap_closure) == {"student", "student_roi"}


def test_older_folds_and_bad_input() -> None:
    fold = fold_predictions(0, groups=False)
    assert compute([fold], 3, resamples=20).bootstrap["unit"] == "sample"
    assert compute([{}], 3) is None  # results read from results.json keep no predictions
    fold["student"] = fold["student"][:-1]
    fold["pointing"] = {"student": [1, 0]}
    with pytest.raises(KdError, match=r"predictions.pointing.student has 2 entries"):
        compute([fold], 3, folds=[4])


def test_gap_interval_is_null_when_the_gap_is_often_absent() -> None:
    fold = fold_predictions(0)
    fold["teacher_crop"] = fold["baseline_full"]  # no gap at all
    gap = compute([fold], 3, resamples=100).gap_closure["student"]
    assert gap["value"] is None and gap["ci95"] is None and gap["undefined"] == 1.0


def test_results_json_and_report_carry_the_statistics(tmp_path: Path) -> None:
    folds = []
    for k in (0, 1):
        p = fold_predictions(k)
        metrics = {r: {"accuracy": 0.5} for r in ROWS}
        folds.append(FoldResult(fold=k, n_test=30, metrics=metrics, predictions=p))
    results = RunResults(folds=folds, classes=["a", "b", "c"])
    write_results(tmp_path, results)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["bootstrap"]["unit"] == "group" and doc["bootstrap"]["resamples"] == 2000
    assert len(doc["pooled"]["student"]["ci95"]) == 2 and len(doc["gap_closure_ci95"]) == 2
    assert {"a", "b", "metric", "diff", "ci95", "discordant", "p", "test", "n"} <= set(
        doc["comparisons"][0]
    )
    again = read_results(tmp_path)  # predictions are not in results.json: the saved statistics
    assert again.statistics().comparisons == doc["comparisons"]
    assert json.loads(json.dumps(again.to_json()))["pooled"] == doc["pooled"]
    report = write_report(tmp_path, results).read_text()
    assert "## Is the student better?" in report
    line = next(x for x in report.splitlines() if x.startswith("| student | two_stage |"))
    assert line.rstrip(" |").endswith(verdict(doc["comparisons"][1]["ci95"]))
    assert "Gap closure of student, pooled accuracy:" in report
    old = {k: v for k, v in doc.items() if k not in ("bootstrap", "pooled", "comparisons")}
    assert RunResults.from_json(old).statistics() is None
    assert statistics_lines(None) == []


@pytest.fixture(scope="module")
def repeated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run: 2 folds × 2 repeats, with the baseline."""
    tmp = tmp_path_factory.mktemp("repeats")
    overrides = {"cv.repeats": 2, "cv.only": [], "evaluate.baseline": True}
    return run_tiny_recipe(tmp, **overrides).output


def test_repeated_cv_runs_every_fold_of_every_repeat(repeated_run: Path) -> None:
    assert sorted(p.name for p in repeated_run.glob("fold_*")) == [f"fold_{k}" for k in range(4)]
    held = [json.loads((repeated_run / f"fold_{k}" / "eval.json").read_text()) for k in range(4)]
    index = [sorted(e["predictions"]["index"]) for e in held]
    for repeat in (0, 1):  # every sample held out once per repeat
        assert sorted(index[2 * repeat] + index[2 * repeat + 1]) == list(range(12))
    assert index[0] != index[2] and index[0] != index[3]  # another assignment
    saved = json.loads((repeated_run / "folds.json").read_text())
    assert saved["repeats"] == 2
    assert [s["repeat_folds"][0] for s in saved["samples"]] == [s["fold"] for s in saved["samples"]]
    assert all(
        e["predictions"]["group"] == [f"p{i}" for i in e["predictions"]["index"]] for e in held
    )
    doc = json.loads((repeated_run / "results.json").read_text())
    assert doc["folds_run"] == [0, 1, 2, 3]
    assert doc["bootstrap"]["n_predictions"] == 24 and doc["bootstrap"]["n_units"] == 12
    assert doc["bootstrap"]["unit"] == "group"
    for row in ("teacher_crop", "baseline_full", "student"):
        assert len(doc["pooled"][row]["ci95"]) == 2
    pairs = [(c["a"], c["b"], c["metric"]) for c in doc["comparisons"]]
    assert pairs == [("student", "baseline_full", m) for m in ("accuracy", "pointing_game")]
    assert sum(doc["comparisons"][0]["discordant"]) <= doc["comparisons"][0]["n"] == 24
    assert "gap_closure_ci95" in doc
    assert "## Is the student better?" in (repeated_run / "report.md").read_text()


def test_kd_report_prints_the_verdict_table(repeated_run: Path) -> None:
    result = kd_in_process("report", str(repeated_run))
    assert result.returncode == 0, result.stderr
    assert "Is the student better?" in result.stdout
    comparison = json.loads((repeated_run / "results.json").read_text())["comparisons"][0]
    assert verdict(comparison["ci95"]) in result.stdout
    assert "mcnemar" not in result.stderr.lower()


def _recipe(*overrides: str):
    from kdtoolkit.config.recipe import load_recipe

    return load_recipe({"data": {"manifest": "/data/m.csv"}, "loss": [{"name": "ce"}]}, overrides)


def test_cv_repeats_in_the_recipe_and_its_digest() -> None:
    from kdtoolkit.config.recipe import RecipeError

    assert _recipe().cv.repeats == 1
    unpaired = "experiment.paired=false"  # as every run was made before these keys existed
    # (the digest literal changed once since, with select_by's default "last")
    assert _recipe("cv.repeats=1", unpaired).digest() == "fc9417f4f952e38e"
    assert _recipe("cv.repeats=1").digest() == _recipe().digest()
    assert _recipe("cv.repeats=2").digest() != _recipe().digest()
    assert _recipe("cv.repeats=2", "cv.only=[9]").cv.only == [9]  # fold 4 of repeat 1
    with pytest.raises(RecipeError, match=r"cv.only: folds \[10\] do not exist \(0..9\)"):
        _recipe("cv.repeats=2", "cv.only=[10]")
    with pytest.raises(RecipeError, match="cv.repeats"):
        _recipe("cv.repeats=0")


def test_one_repeat_writes_folds_json_as_before(tmp_path: Path) -> None:
    from kdtoolkit.data.manifest import read_manifest
    from kdtoolkit.engine.context import assign_run_folds
    from kdtoolkit.testing import tiny_manifest

    manifest = read_manifest(tiny_manifest(tmp_path / "data", n=12))
    recipe = _recipe("cv.folds=2")
    one = assign_run_folds(tmp_path / "one.json", manifest, recipe)
    doc = json.loads((tmp_path / "one.json").read_text())
    assert list(doc) == ["folds", "seed", "root", "samples"]
    assert list(doc["samples"][0]) == ["index", "image", "group", "label", "fold"]
    two = assign_run_folds(tmp_path / "two.json", manifest, _recipe("cv.folds=2", "cv.repeats=2"))
    assert two.shape == (2, 12) and (two[0] == one).all() and (two[1] != one).any()
    assert (
        assign_run_folds(tmp_path / "two.json", manifest, _recipe("cv.folds=2", "cv.repeats=2"))
        == two
    ).all()
    with pytest.raises(KdError, match="made for cv.repeats = 2, not 1"):
        assign_run_folds(tmp_path / "two.json", manifest, recipe)


# -- edge cases found by mutation testing (docs/testing.md) ----------------------------------


def test_macro_f1_counts_an_absent_class_as_zero_like_sklearn() -> None:
    """Class 2 has no label and no prediction: its F1 is 0 and still divides the mean."""
    from kdtoolkit.report.stats import macro_f1_of

    labels, predicted = [0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 0]
    conf = np.zeros((3, 3))
    for t, p in zip(labels, predicted, strict=True):
        conf[t, p] += 1
    want = f1_score(labels, predicted, labels=[0, 1, 2], average="macro", zero_division=0)
    assert macro_f1_of(conf[None])[0] == pytest.approx(want)
    assert want == pytest.approx((0.75 + 2 / 3 + 0.0) / 3)


def test_resamples_draw_every_unit_the_first_included() -> None:
    from kdtoolkit.report.stats import resample_units

    draws = resample_units(3, 200, seed=0)
    assert draws.shape == (200, 3) and set(np.unique(draws)) == {0, 1, 2}
    assert resample_units(1, 5, seed=0).tolist() == [[0]] * 5  # one unit: always it


def test_paired_uses_only_the_entries_both_rows_have() -> None:
    """Row b has no outcome (NaN) for entries 1 and 4: the difference, its interval and the
    discordant pairs are those of the four other entries, by hand."""
    from kdtoolkit.report.stats import Pooled, paired, resample_units, unit_counts

    nan = float("nan")
    a = np.array([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, nan, 0.0, 1.0, nan, 0.0])
    units = np.arange(6)
    pooled = Pooled(
        labels=np.zeros(6, dtype=int),
        units=units,
        n_units=6,
        unit="sample",
        predicted={},
        outcomes={"accuracy": {"a": a, "b": b}},
    )
    weights = unit_counts(resample_units(6, 300, seed=1), 6)
    got = paired(pooled, weights, "a", "b", "accuracy")
    keep = np.isfinite(b)
    assert got["n"] == 4 and got["diff"] == pytest.approx((a - b)[keep].mean())  # 2 / 4
    assert got["discordant"] == [2, 0]
    d = np.where(keep, a - np.nan_to_num(b), 0.0)
    by_hand = [(w @ d) / (w @ keep) for w in weights]
    finite = np.array(by_hand)[np.isfinite(by_hand)]
    assert got["ci95"] == pytest.approx(list(np.quantile(finite, [0.025, 0.975])))


def test_too_few_classes_given_are_raised_to_what_the_labels_hold() -> None:
    """``num_classes`` below the labels' (1 for labels 0..2) gives the statistics of 3 classes;
    resamples below 1 are refused with a message saying so."""
    folds = [fold_predictions(0), fold_predictions(1)]
    want = compute(folds, 3, ordinal=True, resamples=50, seed=3)
    for given in (0, 1, 2):
        got = compute(folds, given, ordinal=True, resamples=50, seed=3)
        assert got.pooled == want.pooled, given
    with pytest.raises(KdError, match="^bootstrap resamples must be at least 1, got 0$"):
        compute(folds, 3, resamples=0)
    assert compute(folds, 3, resamples=1).bootstrap["resamples"] == 1
