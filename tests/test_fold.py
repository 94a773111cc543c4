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
