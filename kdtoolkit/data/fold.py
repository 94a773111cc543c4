"""Cross-validation folds and validation splits (stratified by class, grouped by patient).

Samples without a group count as their own group. Nothing here ever moves a sample out of
its held-out fold: :func:`split_validation` only splits the indices it is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

from kdtoolkit.errors import KdError


def _group_ids(groups: Sequence[str | None] | None, n: int) -> np.ndarray | None:
    """Integer group id per sample, or None when no sample has a group. Samples without a
    group get a group of their own."""
    if groups is None or all(g is None for g in groups):
        return None
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} labels")
    keys = [("g", g) if g is not None else ("s", i) for i, g in enumerate(groups)]
    lookup: dict[tuple[str, object], int] = {}
    return np.array([lookup.setdefault(key, len(lookup)) for key in keys], dtype=np.int64)


def _name(label: int, classes: Sequence[str] | None) -> str:
    return f"'{classes[label]}'" if classes is not None and label < len(classes) else str(label)


def assign_folds(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str | None] | None = None,
    predefined: Sequence[int | None] | None = None,
    k: int = 5,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """Fold index (0..k-1) for every sample.

    ``predefined`` folds are used as-is when every sample has one (they must be exactly
    0..k-1 and must not split a group); otherwise folds are drawn with a seeded
    ``StratifiedGroupKFold`` when any sample has a group, else ``StratifiedKFold``.
    Raises ``KdError`` when a fold cannot hold every class: a class with fewer than ``k``
    members (or, grouped, spread over fewer than ``k`` groups), named via ``classes``.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(y)
    gid = _group_ids(groups, n)

    if predefined is not None and any(f is not None for f in predefined):
        if len(predefined) != n:
            raise ValueError(f"predefined has {len(predefined)} entries for {n} labels")
        missing = sum(f is None for f in predefined)
        if missing:
            raise KdError(
                f"predefined folds: {missing} of {n} samples have no fold — give every sample "
                "a fold or none"
            )
        folds = np.asarray(predefined, dtype=np.int64)
        present = sorted(set(folds.tolist()))
        if present != list(range(k)):
            raise KdError(
                f"predefined folds are {present} but k = {k} — number the folds 0..{k - 1} "
                f"or set k to {len(present)} with folds 0..{len(present) - 1}"
            )
        if gid is not None:
            for g in np.unique(gid):
                spread = np.unique(folds[gid == g])
                if len(spread) > 1:
                    name = groups[int(np.flatnonzero(gid == g)[0])]
                    raise KdError(
                        f"predefined folds split group '{name}' over folds "
                        f"{spread.tolist()} — put each group's samples in one fold"
                    )
        return folds

    if k < 2:
        raise KdError(f"k = {k} folds — cross-validation needs k >= 2")
    if n < k:
        raise KdError(f"{n} samples cannot fill k = {k} folds — add samples or lower k")
    short = []
    for label in np.unique(y):
        members = int((y == label).sum())
        if members < k:
            short.append(f"class {_name(int(label), classes)} has {members} samples")
        elif gid is not None and len(np.unique(gid[y == label])) < k:
            spread = len(np.unique(gid[y == label]))
            short.append(f"class {_name(int(label), classes)} is in only {spread} groups")
    if short:
        raise KdError(
            f"cannot stratify {k} folds: {'; '.join(short)}, fewer than k = {k} — add "
            "samples of those classes or lower k"
        )
    folds = np.full(n, -1, dtype=np.int64)
    if gid is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), y)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), y, gid)
    for fold, (_, test) in enumerate(splits):
        folds[test] = fold
    return folds


def split_validation(
    indices: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[str | None] | None = None,
    fraction: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation set out of ``indices`` (a fold's training part).

    ``labels``/``groups`` are indexed by sample (the whole manifest, like ``indices``).
    The split keeps groups whole and is stratified where the classes allow: it is the first
    fold of a seeded ``StratifiedGroupKFold`` with ``round(1 / fraction)`` splits, so the
    validation share is about ``fraction``. Returns sorted ``(train, val)``; ``fraction = 0``
    gives an empty validation set. Only ``indices`` are split, never the held-out fold.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0.0 <= fraction < 1.0:
        raise KdError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(idx) == 0:
        return np.sort(idx), np.empty(0, dtype=np.int64)
    y = np.asarray(labels, dtype=np.int64)[idx]
    all_groups = None if groups is None else [groups[i] for i in idx]
    gid = _group_ids(all_groups, len(idx))
    if gid is None:
        gid = np.arange(len(idx))
    n_groups = len(np.unique(gid))
    if n_groups < 2:
        raise KdError(
            f"cannot carve a validation set from {n_groups} group — add samples or set the "
            "validation fraction to 0"
        )
    splits = min(max(2, round(1.0 / fraction)), n_groups)
    splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # classes too small to stratify fully
        try:
            train, val = next(splitter.split(np.zeros(len(idx)), y, gid))
        except ValueError:  # every class smaller than the number of splits: group-only split
            plain = GroupKFold(n_splits=splits, shuffle=True, random_state=seed)
            train, val = next(plain.split(np.zeros(len(idx)), y, gid))
    return np.sort(idx[train]), np.sort(idx[val])
