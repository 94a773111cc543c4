"""What every stage of a run works with: the recipe, the device, the samples and classes, the
view config, the run folder's paths, the fold assignment and the loaders."""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdtoolkit.config.recipe import ModelConfig, Recipe
from kdtoolkit.data import fold as folds_mod
from kdtoolkit.data.manifest import Manifest, Sample, read_manifest
from kdtoolkit.data.scan import read_spec
from kdtoolkit.data.view import ViewConfig, view_config
from kdtoolkit.engine.distributed import is_main, main_first, start
from kdtoolkit.engine.loaders import Loaders
from kdtoolkit.engine.loggers import RunLoggers
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_text, read_json, reading
from kdtoolkit.models.device import resolve_device
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.task import Task


@dataclass(frozen=True)
class RunPaths:
    """The files and folders of a run folder."""

    root: Path

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.json"

    @property
    def folds(self) -> Path:
        return self.root / "folds.json"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def fold(self, k: int) -> Path:
        return self.root / f"fold_{k}"

    def stage(self, k: int, role: str) -> Path:
        """``fold_<k>/<role>/``: a stage's checkpoint, metadata and resume state."""
        return self.fold(k) / role

    def checkpoint(self, k: int, role: str) -> Path:
        return self.stage(k, role) / "model.safetensors"

    def evaluation(self, k: int) -> Path:
        return self.fold(k) / "eval.json"

    def cams(self, k: int) -> Path:
        return self.fold(k) / "cams.npz"


def task_of(recipe: Recipe) -> Task | None:
    """The recipe's task (``task.name``), or None."""
    return registries().tasks.get(recipe.task.name) if recipe.task.name else None


def load_data(recipe: Recipe, progress: RunProgress | None = None) -> Manifest:
    """The recipe's manifest (or the task's built-in data source), checked and limited."""
    task = task_of(recipe)
    if recipe.data.manifest:
        path = Path(recipe.data.manifest)
    else:
        assert task is not None and task.make_data is not None
        cache = Path(recipe.data.cache) / task.name
        if progress:
            progress.log(f"data: built-in {task.name} data source into {cache}")
        path = task.make_data(out_dir=cache, **recipe.task.options)
    classes = recipe.data.classes or (list(task.classes) if task else None)
    manifest = read_manifest(path, classes, require_boxes=True, read=read_spec(recipe))
    if recipe.data.limit and recipe.data.limit < len(manifest.samples):
        manifest = Manifest(manifest.path, manifest.classes, manifest.samples[: recipe.data.limit])
    return manifest


def data_digest(manifest: Path, pixels: str) -> str:
    """What the run's outputs were made from: the manifest file's bytes (labels, boxes, paths)
    and the digest of every decoded image and crop (``pixels``); 16 hex digits."""
    h = hashlib.sha256()
    with reading(manifest, "manifest", "check the file"):
        h.update(manifest.read_bytes())
    h.update(pixels.encode())
    return h.hexdigest()[:16]


def groups_of(samples: list[Sample]) -> list | None:
    """Every sample's group, or None when any lacks one."""
    groups = [s.group for s in samples]
    return groups if all(g is not None for g in groups) else None


def duplicate_sets(samples: list[Sample], content: list[str]) -> list[list[int]]:
    """Sets (of sample indices, two or more) of the same image: the same file, or the same
    decoded pixels (``content``: each sample's pixel digest, '' unknown)."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    for i, s in enumerate(samples):
        keys: list[object] = [("file", str(s.image.resolve()), getattr(s, "read", None))]
        if i < len(content) and content[i]:
            keys.append(("pixels", content[i]))
        for key in keys:
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    sets: dict[int, list[int]] = {}
    for i in range(len(samples)):
        sets.setdefault(find(i), []).append(i)
    return [members for members in sets.values() if len(members) > 1]


def fold_groups(
    samples: list[Sample], content: list[str], log: Callable[[str], None]
) -> list | None:
    """The groups folds keep whole: the manifest's ``group`` column; without it, duplicate
    images (same file or same pixels) share a group so they never straddle folds (None when
    there are no groups and no duplicates). Duplicates are reported."""
    groups = groups_of(samples)
    dups = duplicate_sets(samples, content)
    for members in dups[:10]:
        rows = ", ".join(f"row {samples[i].row} ({samples[i].image.name})" for i in members)
        log(f"data: duplicate images: {rows}")
    if len(dups) > 10:
        log(f"data: {len(dups) - 10} more sets of duplicate images")
    if groups is not None:
        for members in dups:
            if len({groups[i] for i in members}) > 1:
                rows = ", ".join(str(samples[i].row) for i in members)
                log(f"data: duplicate images in different groups (rows {rows}) may leak")
        return groups
    if not dups:
        return None
    out: list = [f"sample {i}" for i in range(len(samples))]
    for members in dups:
        for i in members:
            out[i] = f"duplicates of sample {members[0]}"
    log(f"data: {len(dups)} sets of duplicate images are kept within one fold each")
    return out


def fold_count(recipe: Recipe) -> int:
    """The folds of every repeat: ids 0..``cv.folds · cv.repeats`` − 1 (repeat r's fold k is
    r · ``cv.folds`` + k)."""
    return recipe.cv.folds * recipe.cv.repeats


def saved_folds(
    path: Path, saved: dict, names: list[str], root: Path, repeats: int, slices: list | None = None
) -> np.ndarray:
    """The fold assignment of ``folds.json`` (``saved``) for samples ``names`` (relative to the
    manifest's folder ``root``) and ``slices`` (each row's scan slice, None for 2D files;
    matched when the file records them); an error when it was made for other data or repeats."""
    # images relative to their manifest: a run folder moved to another machine stays valid
    before = Path(saved.get("root", root))  # older files: absolute paths, here
    stored = [os.path.relpath(s["image"], before) for s in saved["samples"]]
    if slices is not None and any("slice" in s for s in saved["samples"]):
        stored = [f"{n}#{s.get('slice')}" for n, s in zip(stored, saved["samples"], strict=True)]
        names = [f"{n}#{k}" for n, k in zip(names, slices, strict=True)]
    if sorted(stored) != sorted(names):
        raise KdError(f"{path}: the fold assignment was made for other data; use a new output")
    if int(saved.get("repeats", 1)) != repeats:
        raise KdError(
            f"{path}: the fold assignment was made for cv.repeats = "
            f"{saved.get('repeats', 1)}, not {repeats}; use a new output"
        )
    key = "repeat_folds" if repeats > 1 else "fold"
    # rows reordered: each row takes the fold of the saved row of its image, rows of one image
    # (slices of a volume) in their saved order
    by_name: dict[str, list] = defaultdict(list)
    for name, s in zip(stored, saved["samples"], strict=True):
        by_name[name].append(s[key])
    folds = np.array([by_name[name].pop(0) for name in names], dtype=np.int64)
    return folds.T if repeats > 1 else folds


def assign_run_folds(
    path: Path,
    manifest: Manifest,
    recipe: Recipe,
    groups: list | None = None,
    pending: list[str] | None = None,
) -> np.ndarray:
    """Each sample's fold: read from ``folds.json`` (``path``) when the run folder has it (a
    resumed run, or one run in parts), else assigned (keeping ``groups`` whole; default the
    manifest's) and written there. With ``cv.repeats`` R > 1, an ``R × samples`` array: repeat
    r is assigned with seed ``experiment.seed + r`` (repeat 0 is the one-repeat assignment),
    and ``folds.json`` keeps every repeat's folds (``repeats``, each sample's ``repeat_folds``).
    ``pending``: a new assignment's file text is appended there instead of written (a run
    writes it once every refusal check has passed)."""
    samples = manifest.samples
    groups = groups if groups is not None else groups_of(samples)
    root = manifest.path.parent
    repeats = recipe.cv.repeats
    if path.exists():
        fix = "delete the run folder's fold outputs and folds.json, or use a new output"
        saved = read_json(path, "fold assignment", fix)
        with reading(path, "fold assignment", fix):
            names = [os.path.relpath(s.image, root) for s in samples]
            slices = [s.slice for s in samples]
            return saved_folds(path, saved, names, root, repeats, slices)
    predefined = [s.fold for s in samples]
    if repeats > 1 and all(f is not None for f in predefined):
        raise KdError(
            f"cv.repeats = {repeats}: the manifest's fold column fixes one assignment; "
            "set cv.repeats = 1 or drop the fold column"
        )
    assignments = [
        folds_mod.assign_folds(
            np.array([s.label for s in samples]),
            groups,
            predefined if all(f is not None for f in predefined) else None,
            recipe.cv.folds,
            recipe.experiment.seed + r,
            classes=manifest.classes,
        )
        for r in range(repeats)
    ]
    records = [
        {
            "index": s.index,
            "image": str(s.image),
            **({"slice": s.slice} if s.slice is not None else {}),
            "group": s.group if groups is None else groups[s.index],
            "label": int(s.label),
            "fold": int(assignments[0][s.index]),
            **({"repeat_folds": [int(a[s.index]) for a in assignments]} if repeats > 1 else {}),
        }
        for s in samples
    ]
    document = {
        "folds": recipe.cv.folds,
        **({"repeats": repeats} if repeats > 1 else {}),
        "seed": recipe.experiment.seed,
        "root": str(root),
        "samples": records,
    }
    if pending is None:
        atomic_write_text(path, json.dumps(document, indent=1))
    else:
        pending.append(json.dumps(document, indent=1))
    return np.asarray(assignments[0]) if repeats == 1 else np.array(assignments)


@dataclass
class RunContext:
    """One recipe's run: its data, device, view config, run folder and fold assignment."""

    recipe: Recipe
    device: torch.device
    manifest: Manifest
    classes: tuple[str, ...]
    view: ViewConfig
    paths: RunPaths
    fold_of: np.ndarray  # each sample's fold (of repeat 0)
    ordinal: bool
    loaders: Loaders
    progress: RunProgress
    groups: list | None = None  # what folds and validation splits keep whole
    force: bool = False  # retrain stages made by another recipe (else an error)
    repeat_folds: np.ndarray | None = None  # cv.repeats > 1: repeats × samples
    data_digest: str = ""  # the manifest's bytes and every image's pixels (``data_digest``)
    pending_folds: str | None = None  # a new folds.json, written by ``write_folds``
    loggers: RunLoggers = field(default_factory=RunLoggers)  # ``engine.loggers.run_loggers``

    @classmethod
    def open(cls, recipe: Recipe, progress: RunProgress, force: bool = False) -> RunContext:
        """Resolve the device, load the data, decode every image once (a broken file fails
        here), and read (or make) the fold assignment, duplicates kept within one fold.
        Launched as several processes: this rank's device; rank 0 makes a task's data and the
        assignment before the others read them."""
        device = start(resolve_device(recipe.experiment.device))
        cfg = view_config(recipe)
        task = task_of(recipe)
        with main_first():  # a task's data source writes its cache once
            manifest = load_data(recipe, progress)
        paths = RunPaths(recipe.output_dir)
        loaders = Loaders(manifest.samples, cfg, device, recipe.data, progress.log)
        progress.start_stage("decoding images", len(manifest.samples))
        loaders.decode_all(manifest.path, progress.advance_stage)
        progress.end_stage()
        groups = fold_groups(manifest.samples, loaders.content, progress.log)
        pending: list[str] = []
        assigned = assign_run_folds(paths.folds, manifest, recipe, groups, pending)
        fold_of = assigned if assigned.ndim == 1 else assigned[0]
        return cls(
            recipe=recipe,
            device=device,
            manifest=manifest,
            classes=tuple(manifest.classes),
            view=cfg,
            paths=paths,
            fold_of=fold_of,
            ordinal=bool(task.ordinal) if task else False,
            loaders=loaders,
            progress=progress,
            groups=groups,
            force=force,
            repeat_folds=assigned if assigned.ndim == 2 else None,
            data_digest=data_digest(manifest.path, loaders.pixels.hexdigest()),
            pending_folds=pending[0] if pending else None,
        )

    def write_folds(self) -> None:
        """Write a new fold assignment into ``folds.json`` (rank 0; the others wait)."""
        with main_first():
            if self.pending_folds is not None and is_main():
                atomic_write_text(self.paths.folds, self.pending_folds)
        self.pending_folds = None

    @property
    def samples(self) -> list[Sample]:
        return self.manifest.samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    def log(self, message: str) -> None:
        self.progress.log(message)

    def fold_indices(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) sample indices of fold ``k``; test is the held-out fold (fold
        ``k mod cv.folds`` of repeat ``k // cv.folds``)."""
        repeat, fold = divmod(k, self.recipe.cv.folds)
        folds = self.fold_of if self.repeat_folds is None else self.repeat_folds[repeat]
        all_idx = np.arange(len(self.samples))
        test = all_idx[folds == fold]
        rest = all_idx[folds != fold]
        train, val = folds_mod.split_validation(
            rest,
            self.labels,
            self.groups,
            self.recipe.cv.val_fraction,
            self.recipe.experiment.seed + k,
        )
        return np.asarray(train), np.asarray(val), test

    def folds_to_run(self) -> list[int]:
        """``cv.only``, or every fold (of every repeat)."""
        only, total = self.recipe.cv.only, fold_count(self.recipe)
        bad = [k for k in only if not 0 <= k < total]
        if bad:
            raise KdError(f"cv.only: folds {bad} do not exist (0..{total - 1})")
        return list(only) or list(range(total))

    def class_weights(self, indices: np.ndarray, config: ModelConfig) -> torch.Tensor | None:
        """Inverse-frequency class weights of ``indices`` when ``config.class_weights``."""
        if not config.class_weights:
            return None
        counts = np.bincount(self.labels[indices], minlength=self.num_classes).astype(float)
        weights = counts.sum() / np.maximum(counts, 1) / self.num_classes
        return torch.tensor(weights, dtype=torch.float32, device=self.device)
