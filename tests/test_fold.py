"""Folds: stratified, grouped, predefined, seeded; validation carved from the training part."""

from __future__ import annotations

import numpy as np
import pytest

from kdtoolkit.data.fold import assign_folds, split_validation
from kdtoolkit.errors import KdError

LABELS = np.repeat(np.arange(4), [30, 20, 25, 45])  # 120 samples, imbalanced
GROUPS = [f"patient{i // 3}" for i in range(len(LABELS))]  # 3 slices per patient, one class


def _groups_per_fold(folds: np.ndarray, groups) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = {}
    for fold, group in zip(folds, groups, strict=True):
        seen.setdefault(group, set()).add(int(fold))
    return seen


def test_stratified_folds() -> None:
    folds = assign_folds(LABELS, None, None, k=5, seed=0)
    assert folds.shape == LABELS.shape and set(folds.tolist()) == set(range(5))
    for label, total in enumerate([30, 20, 25, 45]):
        counts = np.bincount(folds[np.equal(LABELS, label)], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == total


def test_grouped_folds_never_split_a_group() -> None:
    folds = assign_folds(LABELS, GROUPS, None, k=5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    assert all(len(f) == 1 for f in _groups_per_fold(folds, GROUPS).values())
    for label in range(4):  # still roughly stratified
        counts = np.bincount(folds[np.equal(LABELS, label)], minlength=5)
        assert counts.min() > 0 and counts.max() - counts.min() <= 6


def test_samples_without_group_are_their_own_group() -> None:
    groups = [g if i % 2 else None for i, g in enumerate(GROUPS)]
    folds = assign_folds(LABELS, groups, None, k=4, seed=1)
    named = [g for g in groups if g is not None]
    per = _groups_per_fold(folds[[i for i, g in enumerate(groups) if g is not None]], named)
    assert all(len(f) == 1 for f in per.values())


def test_seeded_determinism() -> None:
    for groups in (None, GROUPS):
        a = assign_folds(LABELS, groups, None, k=5, seed=3)
        np.testing.assert_array_equal(a, assign_folds(LABELS, groups, None, k=5, seed=3))
        assert not np.array_equal(a, assign_folds(LABELS, groups, None, k=5, seed=4))


def test_predefined_folds_are_honoured() -> None:
    predefined = [i % 3 for i in range(len(LABELS))]
    folds = assign_folds(LABELS, None, predefined, k=3, seed=0)
    np.testing.assert_array_equal(folds, predefined)
    with pytest.raises(KdError, match=r"predefined folds are \[0, 1, 2\] but k = 5"):
        assign_folds(LABELS, None, predefined, k=5, seed=0)
    with pytest.raises(KdError, match="1 of 120 samples have no fold"):
        assign_folds(LABELS, None, [None, *predefined[1:]], k=3, seed=0)
    with pytest.raises(KdError, match="split group 'patient0'"):
        assign_folds(LABELS, GROUPS, predefined, k=3, seed=0)
    by_group = [int(g.removeprefix("patient")) % 3 for g in GROUPS]
    np.testing.assert_array_equal(assign_folds(LABELS, GROUPS, by_group, 3, 0), by_group)


def test_small_class_is_named() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(KdError, match="class 'rare' has 3 samples, fewer than k = 5"):
        assign_folds(labels, None, None, k=5, seed=0, classes=["common", "rare", "other"])
    groups = [f"p{i // 5}" for i in range(10)] + ["q"] * 3 + [f"r{i}" for i in range(10)]
    labels = np.array([0] * 10 + [2] * 3 + [2] * 10)
    with pytest.raises(KdError, match="class 0 is in only 2 groups"):
        assign_folds(labels, groups, None, k=3, seed=0)


def test_validation_split_is_grouped_and_inside_the_training_part() -> None:
    folds = assign_folds(LABELS, GROUPS, None, k=5, seed=0)
    for fold in range(5):
        train, test = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        fit, val = split_validation(train, LABELS, GROUPS, fraction=0.2, seed=0)
        assert len(val) > 0 and not set(val) & set(test) and not set(fit) & set(test)
        assert not set(fit) & set(val)
        np.testing.assert_array_equal(np.sort(np.concatenate([fit, val])), train)
        assert 0.1 < len(val) / len(train) < 0.3
        fit_groups = {GROUPS[i] for i in fit}
        assert not fit_groups & {GROUPS[i] for i in val}
        again = split_validation(train, LABELS, GROUPS, fraction=0.2, seed=0)
        np.testing.assert_array_equal(again[1], val)


def test_validation_split_stratified_without_groups() -> None:
    train = np.arange(0, 120, 2)  # a training part: every other sample
    fit, val = split_validation(train, LABELS, None, fraction=0.25, seed=5)
    assert set(val) <= set(train) and len(val) == 15
    assert np.bincount(LABELS[val], minlength=4).min() >= 2
    empty_fit, empty_val = split_validation(train, LABELS, None, fraction=0.0, seed=5)
    assert len(empty_val) == 0 and np.array_equal(empty_fit, train)
    with pytest.raises(KdError):
        split_validation(train, LABELS, ["one"] * 120, fraction=0.2, seed=0)
    with pytest.raises(KdError):
        split_validation(train, LABELS, None, fraction=1.0, seed=0)


def test_validation_split_with_classes_smaller_than_the_splits():
    labels = np.array([0, 1, 2, 3, 4] * 3)
    train, val = split_validation(np.arange(15), labels, None, fraction=0.15, seed=0)
    assert len(val) > 0 and len(train) > 0
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(15))


# -- against sklearn's splitters, boundaries and full messages -------------------------------


def _reference_folds(splitter, labels, groups=None) -> np.ndarray:
    folds = np.full(len(labels), -1)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[test] = fold
    return folds


def _codes(groups) -> np.ndarray:
    """Integer group ids in order of first appearance."""
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(g, len(seen)) for g in groups])


def test_folds_are_sklearns_seeded_splits_with_the_documented_defaults() -> None:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    want = _reference_folds(StratifiedKFold(n_splits=5, shuffle=True, random_state=0), LABELS)
    got = assign_folds(LABELS)
    assert got.dtype == np.int64 and (got == want).all()
    assert (assign_folds(LABELS[:, None]) == want).all()  # a column of labels is flattened
    three = StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=7)
    codes = _codes(GROUPS)
    want = _reference_folds(three, LABELS, codes)
    assert (assign_folds(LABELS, GROUPS, k=3, seed=7) == want).all()


def test_fold_counts_at_their_limits_are_accepted() -> None:
    # k = 2; n = k samples; each class with exactly k members in exactly k groups; k groups.
    assert sorted(assign_folds([0, 1, 0, 1], k=2)) == [0, 0, 1, 1]
    assert sorted(assign_folds([0, 0, 0], k=3)) == [0, 1, 2]  # n = k: a sample a fold
    row = np.array([[0, 1, 0, 1, 0, 1]])  # labels in a row are flattened too
    assert (assign_folds(row, k=3, seed=4) == assign_folds([0, 1] * 3, k=3, seed=4)).all()
    grouped = assign_folds([0, 0, 1, 1], ["a", "b", "a", "b"], k=2)
    assert grouped[0] == grouped[2] and grouped[1] == grouped[3] and grouped[0] != grouped[1]
    # Samples without a group are groups of their own: class 0 lies in a, s2, s4 (3 groups).
    labels, groups = [0, 1, 0, 1, 0, 1], ["a", "a", None, None, None, None]
    folds = assign_folds(labels, groups, k=3)
    assert set(folds) == {0, 1, 2} and folds[0] == folds[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": [0, 1, 0, 1], "k": 1}, "k = 1 folds — cross-validation needs k >= 2"),
        ({"labels": [0, 1], "k": 3}, "2 samples cannot fill k = 3 folds — add samples or lower k"),
        (
            {"labels": [0, 0, 1, 1, 2, 2], "k": 3, "classes": ["x", "y"]},
            "cannot stratify 3 folds: class 'x' has 2 samples; class 'y' has 2 samples; class 2 "
            "has 2 samples, fewer than k = 3 — add samples of those classes or lower k",
        ),
        (
            {"labels": [0, 0, 0, 1, 1, 1], "groups": list("aabccc"), "k": 3, "classes": ["x"]},
            "cannot stratify 3 folds: class 'x' is in only 2 groups; class 1 is in only 1 groups,"
            " fewer than k = 3 — add samples of those classes or lower k",
        ),
        (
            {"labels": [0, 0], "predefined": [0, None], "k": 2},
            "predefined folds: 1 of 2 samples have no fold — give every sample a fold or none",
        ),
        (
            {"labels": [0, 0, 0], "predefined": [0, 2, 2], "k": 3},
            "predefined folds are [0, 2] but k = 3 — number the folds 0..2 or set k to 2 with "
            "folds 0..1",
        ),
        (
            {"labels": [0, 0, 0, 0], "groups": list("aabb"), "predefined": [0, 1, 0, 1], "k": 2},
            "predefined folds split group 'a' over folds [0, 1] — put each group's samples in one "
            "fold",
        ),
    ],
)
def test_fold_errors_name_the_problem_in_full(kwargs, message) -> None:
    with pytest.raises(KdError) as err:
        assign_folds(**kwargs)
    assert str(err.value) == message


def test_fold_inputs_of_the_wrong_length_are_named() -> None:
    with pytest.raises(ValueError, match=r"^groups has 1 entries for 2 labels$"):
        assign_folds([0, 1], ["a"], k=2)
    with pytest.raises(ValueError, match=r"^predefined has 1 entries for 2 labels$"):
        assign_folds([0, 1], None, [0], k=2)
    folds = assign_folds([0, 1], None, np.array([1, 0], dtype=np.int32), k=2)
    assert folds.dtype == np.int64 and folds.tolist() == [1, 0]


def test_validation_split_is_sklearns_first_fold() -> None:
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    idx = np.arange(0, 120, 2)
    codes = _codes([GROUPS[i] for i in idx])
    for fraction, splits, seed in ((0.1, 10, 0), (0.5, 2, 3), (0.3, 3, 1)):
        ref = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
        _, val = next(ref.split(np.zeros(len(idx)), LABELS[idx], codes))
        kwargs = {} if fraction == 0.1 and seed == 0 else {"fraction": fraction, "seed": seed}
        train, got = split_validation(idx[:, None], LABELS, GROUPS, **kwargs)
        assert (got == np.sort(idx[val])).all()
        assert sorted([*train, *got]) == idx.tolist()
    # Every class smaller than the splits: the group-only split of GroupKFold.
    labels = np.array([0, 1, 2, 3, 4] * 3)
    ref = GroupKFold(n_splits=6, shuffle=True, random_state=5)
    _, val = next(ref.split(np.zeros(15), labels, np.arange(15)))
    assert (split_validation(np.arange(15), labels, None, 0.15, seed=5)[1] == np.sort(val)).all()
    # Two groups are enough; an empty validation set is int64.
    train, val = split_validation([0, 1], [0, 1], ["a", "b"], fraction=0.5)
    assert sorted([*train, *val]) == [0, 1] and len(val) == 1
    assert split_validation([3, 1], [0, 0, 0, 0], fraction=0.0)[1].dtype == np.int64


def test_validation_split_errors_in_full() -> None:
    with pytest.raises(KdError) as err:
        split_validation([4], [0] * 5)
    assert str(err.value) == (
        "cannot carve a validation set from 1 group — add samples or set the validation "
        "fraction to 0"
    )
    with pytest.raises(KdError) as err:
        split_validation([0, 1], [0, 1], fraction=1.0)
    assert str(err.value) == "validation fraction must be in [0, 1), got 1.0"
