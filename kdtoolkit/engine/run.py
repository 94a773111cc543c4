"""The run: per fold teacher → ROI provider → student (+ baselines) → evaluation → report.

Every stage writes its outputs into the run folder; a rerun of the same recipe skips finished
stages and resumes an interrupted one from its last epoch.
"""

from __future__ import annotations

import functools
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdtoolkit.config.recipe import ModelConfig, Recipe
from kdtoolkit.data import fold as folds_mod
from kdtoolkit.data.bank import BankDataset, BankLoader, ImageBank, bank_bytes
from kdtoolkit.data.manifest import Manifest, read_manifest
from kdtoolkit.data.view import KdDataset, ViewConfig
from kdtoolkit.engine.device import resolve_device, seed_everything
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.train import Stage, train_stage
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.checkpoint import load_model, save_checkpoint
from kdtoolkit.plugins.loss import CompositeLoss
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.roi import RoiRequest, RoiResult
from kdtoolkit.plugins.task import Task

#: ``data.loader = "auto"`` holds the images on the GPU when they take under this share of its
#: free memory.
BANK_SHARE = 0.5


@dataclass
class RunResult:
    """Where a run's outputs are, and its results."""

    output: Path
    report: Path
    results: dict[str, Any]


def task_of(recipe: Recipe) -> Task | None:
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
    manifest = read_manifest(path, classes, require_boxes=True)
    if recipe.data.limit and recipe.data.limit < len(manifest.samples):
        manifest = Manifest(manifest.path, manifest.classes, manifest.samples[: recipe.data.limit])
    return manifest


def view_config(recipe: Recipe) -> ViewConfig:
    a = recipe.augment
    return ViewConfig(
        image_size=recipe.size("image"),
        crop_size=recipe.size("crop"),
        channels=recipe.data.channels,
        letterbox=recipe.data.letterbox,
        mask=recipe.roi.mask,
        flip_p=a.flip_p,
        degrees=a.degrees,
        scale=(1 - a.scale, 1 + a.scale),
        translate=a.translate,
        brightness=a.brightness,
        contrast=a.contrast,
    )


def build_loss(recipe: Recipe, specs: list[tuple[str, float, dict]] | None = None) -> CompositeLoss:
    """The composite loss of the recipe's ``[[loss]]`` tables (or of ``specs``)."""
    regs = registries()
    if specs is None:
        specs = [(lc.name, lc.weight, lc.options) for lc in recipe.loss]
    return CompositeLoss([(n, w, regs.losses.get(n)(**opts)) for n, w, opts in specs])


def model_metadata(
    recipe: Recipe,
    role: str,
    config: ModelConfig,
    classes: tuple[str, ...],
    cfg: ViewConfig,
    view: str,
) -> dict[str, Any]:
    """What ``kd predict`` and a user need to use a checkpoint on their own."""
    size = cfg.crop_size if view == "crop" else cfg.image_size
    return {
        "role": role,
        "classes": list(classes),
        "backbone": config.backbone,
        "backbone_options": config.backbone_options,
        "input_size": list(size),
        "view": view,
        "channels": cfg.channels,
        "letterbox": cfg.letterbox,
        "normalisation": {"mean": cfg.mean, "std": cfg.std},
        "recipe_digest": recipe.digest(),
        "recipe": recipe.to_dict(),
    }


class Runner:
    """Runs one recipe into its run folder."""

    def __init__(self, recipe: Recipe, progress: RunProgress) -> None:
        self.recipe = recipe
        self.out = recipe.output_dir
        self.progress = progress
        self.device = resolve_device(recipe.experiment.device)
        self.cfg = view_config(recipe)
        self.task = task_of(recipe)
        self.manifest = load_data(recipe, progress)
        self.samples = self.manifest.samples
        self.classes = self.manifest.classes
        self.num_classes = len(self.classes)
        self.labels = np.array([s.label for s in self.samples])
        self.ordinal = bool(self.task.ordinal) if self.task else False
        self.fold_of = self._folds()
        self.image_cache: dict = {}

    # ----- folds -------------------------------------------------------------------------
    def _folds(self) -> np.ndarray:
        path = self.out / "folds.json"
        root = self.manifest.path.parent
        if path.exists():
            saved = json.loads(path.read_text())
            # images relative to their manifest: a run folder moved to another machine stays valid
            before = Path(saved.get("root", root))  # older files: absolute paths, here
            names = [os.path.relpath(s["image"], before) for s in saved["samples"]]
            if names == [os.path.relpath(s.image, root) for s in self.samples]:
                return np.array([s["fold"] for s in saved["samples"]])
            raise KdError(f"{path}: the fold assignment was made for other data; use a new output")
        groups = [s.group for s in self.samples]
        predefined = [s.fold for s in self.samples]
        assignment = folds_mod.assign_folds(
            self.labels,
            groups if all(g is not None for g in groups) else None,
            predefined if all(f is not None for f in predefined) else None,
            self.recipe.cv.folds,
            self.recipe.experiment.seed,
        )
        atomic_write_text(
            path,
            json.dumps(
                {
                    "folds": self.recipe.cv.folds,
                    "seed": self.recipe.experiment.seed,
                    "root": str(root),
                    "samples": [
                        {
                            "index": s.index,
                            "image": str(s.image),
                            "group": s.group,
                            "label": int(s.label),
                            "fold": int(f),
                        }
                        for s, f in zip(self.samples, assignment, strict=False)
                    ],
                },
                indent=1,
            ),
        )
        return np.asarray(assignment)

    def fold_indices(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) sample indices of fold ``k``; test is the held-out fold."""
        all_idx = np.arange(len(self.samples))
        test = all_idx[self.fold_of == k]
        rest = all_idx[self.fold_of != k]
        groups = [s.group for s in self.samples]
        train, val = folds_mod.split_validation(
            rest,
            self.labels,
            groups if all(g is not None for g in groups) else None,
            self.recipe.cv.val_fraction,
            self.recipe.experiment.seed + k,
        )
        return np.asarray(train), np.asarray(val), test

    # ----- data ---------------------------------------------------------------------------
    def loader(
        self,
        indices: np.ndarray,
        train: bool,
        batch_size: int,
        seed: int,
        mask_rois: dict[int, tuple] | None = None,
        views: tuple[str, ...] = ("image", "crop"),
    ) -> DataLoader | BankLoader:
        """Batches of ``views`` ("image" with its mask and box, and/or "crop") of ``indices``;
        decoded images are shared by every loader of the run (``data.loader``)."""
        generator = torch.Generator().manual_seed(seed)
        drop_last = train and len(indices) > batch_size
        args = (self.samples, indices, self.cfg, train, seed, mask_rois)
        if self.banks is not None:
            dataset = BankDataset(*self.banks, *args, views=views)
            return BankLoader(dataset, batch_size, train, drop_last, generator)
        dataset = KdDataset(*args, views=views, cache=self.image_cache)
        workers = self.workers()
        if workers:
            dataset.preload()  # decode once here; forked workers share it
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=drop_last,
            generator=generator,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )

    @functools.cached_property
    def banks(self) -> tuple[ImageBank, ImageBank | None] | None:
        """Every image (and expert crop file) decoded once onto the device, when
        ``data.loader`` is ``device`` (or ``auto`` on CUDA with room to spare); None:
        per-sample loading."""
        choice = self.recipe.data.loader
        if choice == "workers" or (choice == "auto" and self.device.type != "cuda"):
            return None
        channels = self.cfg.channels
        need = bank_bytes([(s.height, s.width) for s in self.samples], channels)
        if choice == "auto":
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > free * BANK_SHARE:
                self.progress.log(
                    f"data: the images need {need / 2**30:.1f} GiB, more than "
                    f"{BANK_SHARE:.0%} of the free GPU memory; views are built per sample "
                    "on the CPU (data.loader)"
                )
                return None
        started = time.perf_counter()
        images = ImageBank([s.image for s in self.samples], channels, self.device)
        crop_files = [s.crop for s in self.samples if s.crop is not None]
        crops = ImageBank(crop_files, channels, self.device) if crop_files else None
        self.progress.log(
            f"data: {len(images.sizes)} images ({images.stack.numel() * 4 / 2**20:.0f} MiB) "
            f"held on {self.device} in {time.perf_counter() - started:.1f}s; views are built "
            "there a batch at a time"
        )
        return images, crops

    def workers(self) -> int:
        """Data-loader processes of per-sample loading: ``data.workers``, or (-1) none on
        CPU, up to 16 on CUDA."""
        if self.recipe.data.workers >= 0:
            return self.recipe.data.workers
        return min(16, os.cpu_count() or 1) if self.device.type == "cuda" else 0

    def class_weights(self, indices: np.ndarray, config: ModelConfig) -> torch.Tensor | None:
        if not config.class_weights:
            return None
        counts = np.bincount(self.labels[indices], minlength=self.num_classes).astype(float)
        weights = counts.sum() / np.maximum(counts, 1) / self.num_classes
        return torch.tensor(weights, dtype=torch.float32, device=self.device)

    # ----- models -------------------------------------------------------------------------
    def new_model(self, config: ModelConfig) -> torch.nn.Module:
        return build_backbone(
            config.backbone, self.num_classes, self.cfg.channels, dict(config.backbone_options)
        )

    def load_model(self, path: Path) -> torch.nn.Module:
        """A trained stage's model, rebuilt from its checkpoint's own metadata."""
        return load_model(path, self.device)[0]

    def train(
        self,
        fold: int,
        role: str,
        view: str,
        config: ModelConfig,
        loss: CompositeLoss,
        split: tuple[np.ndarray, np.ndarray],
        teacher: torch.nn.Module | None = None,
        mask_rois: dict[int, tuple] | None = None,
    ) -> Path:
        """Train one stage unless its checkpoint exists; return the checkpoint path."""
        stage_dir = self.out / f"fold_{fold}" / role
        ckpt = stage_dir / "model.safetensors"
        if ckpt.exists():
            self.progress.log(f"fold {fold} {role}: done before, reusing {ckpt}")
            self.progress.advance_run()
            return ckpt
        stage_dir.mkdir(parents=True, exist_ok=True)
        seed = self.recipe.experiment.seed * 1000 + fold * 10 + role_seed(role)
        seed_everything(seed)
        model = self.new_model(config)
        self._check_input_size(model, role, config, view)
        if teacher is not None and config.init_from_teacher:
            init_from_teacher(model, teacher, role)
        teacher_channels = teacher.num_features if teacher is not None else None
        loss.setup(model.num_features, teacher_channels)
        train_idx, val_idx = split
        views = ("image", "crop") if view == "image" and teacher is not None else (view,)
        stage = Stage(
            name=role,
            model=model,
            view=view,
            loss=loss,
            config=config,
            teacher=teacher,
            class_weights=self.class_weights(train_idx, config),
        )
        description = f"fold {fold} {role}"
        self.progress.start_stage(description, config.epochs)
        state_path = stage_dir / "last.pt"
        if state_path.exists():
            self.progress.log(f"{description}: resuming from {state_path}")
        started = time.perf_counter()
        best = train_stage(
            stage,
            self.loader(train_idx, True, config.batch_size, seed, mask_rois, views),
            self.loader(val_idx, False, config.batch_size, seed, views=(view,)),
            self.device,
            state_path,
            self.num_classes,
            on_epoch=lambda e, r: self.progress.epoch(e, r, description),
        )
        seconds = time.perf_counter() - started
        meta = model_metadata(self.recipe, role, config, self.classes, self.cfg, view)
        meta.update({"fold": fold, "history": stage.history, "train_seconds": seconds})
        save_checkpoint(ckpt, best, meta)
        state_path.unlink(missing_ok=True)
        self.progress.end_stage()
        self.progress.log(f"{description}: trained in {seconds:.1f}s -> {ckpt}")
        return ckpt

    def _check_input_size(
        self, model: torch.nn.Module, role: str, config: ModelConfig, view: str
    ) -> None:
        """A one-line error when the input is too small for the backbone's downsampling."""
        size = self._size(view)
        key = "data.crop_size" if view == "crop" else "data.image_size"
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(2, self.cfg.channels, *size))
        except RuntimeError as e:
            raise KdError(
                f"{role}: backbone {config.backbone!r} cannot take {size[0]}×{size[1]} inputs "
                f"({str(e).splitlines()[0]}); raise {key}"
            ) from None
        model.train()

    def _size(self, view: str) -> tuple[int, int]:
        return self.cfg.crop_size if view == "crop" else self.cfg.image_size

    # ----- ROI ----------------------------------------------------------------------------
    def rois(self, fold: int, train_idx: np.ndarray) -> tuple[RoiResult, bool]:
        """The ROI provider's boxes for every sample (cached per fold)."""
        regs = registries()
        provider_cls = regs.roi_providers.get(self.recipe.roi.provider)
        workdir = self.out / f"fold_{fold}" / "roi"
        cache = workdir / "rois.json"
        if cache.exists():
            saved = json.loads(cache.read_text())
            self.progress.advance_run()
            return RoiResult(
                boxes=np.array(saved["boxes"]),
                angles=np.array(saved["angles"]),
                found=np.array(saved["found"], dtype=bool),
                metrics=saved["metrics"],
            ), provider_cls.learned
        workdir.mkdir(parents=True, exist_ok=True)
        provider = provider_cls(**self.recipe.roi.options)
        self.progress.start_stage(f"fold {fold} roi ({self.recipe.roi.provider})", 1)
        result = provider.provide(
            RoiRequest(
                fold=fold,
                samples=self.samples,
                train=train_idx,
                predict=np.arange(len(self.samples)),
                workdir=workdir,
                device=str(self.device),
                seed=self.recipe.experiment.seed + fold,
                log=self.progress.log,
            )
        )
        atomic_write_text(
            cache,
            json.dumps(
                {
                    "boxes": result.boxes.tolist(),
                    "angles": result.angles.tolist(),
                    "found": result.found.tolist(),
                    "metrics": result.metrics,
                }
            ),
        )
        self.progress.end_stage()
        return result, provider_cls.learned

    # ----- one fold -----------------------------------------------------------------------
    def run_fold(self, k: int) -> dict[str, Any]:
        fold_dir = self.out / f"fold_{k}"
        done = fold_dir / "eval.json"
        if done.exists():
            self.progress.log(f"fold {k}: evaluated before, reusing {done}")
            for _ in range(self.stages_per_fold()):
                self.progress.advance_run()
            return json.loads(done.read_text())
        r = self.recipe
        train_idx, val_idx, test_idx = self.fold_indices(k)
        self.progress.log(
            f"fold {k}: {len(train_idx)} train, {len(val_idx)} validation, {len(test_idx)} held out"
        )
        split = (train_idx, val_idx)
        ce_only = [("ce", 1.0, {})]
        teacher_ckpt = self.train(k, "teacher", "crop", r.teacher, build_loss(r, ce_only), split)
        teacher = self.load_model(teacher_ckpt)
        rois, learned = self.rois(k, train_idx)
        mask_rois = {
            int(i): (tuple(rois.boxes[i]), float(rois.angles[i])) for i in range(len(self.samples))
        }
        student_loss = build_loss(r)
        student_ckpt = self.train(
            k,
            "student",
            "image",
            r.student,
            student_loss,
            split,
            teacher=teacher if student_loss.needs_teacher else None,
            mask_rois=mask_rois,
        )
        baseline_ckpt = None
        if r.evaluate.baseline:
            baseline_ckpt = self.train(
                k, "baseline_full", "image", r.student, build_loss(r, ce_only), split
            )
        from kdtoolkit.engine.evaluate import evaluate_fold

        result = evaluate_fold(
            self,
            k,
            test_idx,
            teacher,
            teacher_ckpt,
            student_ckpt,
            baseline_ckpt,
            rois if (learned and r.evaluate.two_stage) else None,
        )
        result["roi"] = rois.metrics
        atomic_write_text(done, json.dumps(result, indent=1))
        self.progress.advance_run()
        return result

    def stages_per_fold(self) -> int:
        return 4 + int(self.recipe.evaluate.baseline)

    def folds_to_run(self) -> list[int]:
        only = self.recipe.cv.only
        bad = [k for k in only if not 0 <= k < self.recipe.cv.folds]
        if bad:
            raise KdError(f"cv.only: folds {bad} do not exist (0..{self.recipe.cv.folds - 1})")
        return list(only) or list(range(self.recipe.cv.folds))


ROLE_SEEDS = {"teacher": 1, "student": 2, "baseline_full": 3}


def role_seed(role: str) -> int:
    """A stage's seed offset: ``ROLE_SEEDS[role]``; a variant ``<role>_<name>`` of a known role
    (``student_kl``) shares that role's offset, so variants start from the same weights and
    batch order and differ only in what they change; any other role, a stable hash of its name."""
    if role in ROLE_SEEDS:
        return ROLE_SEEDS[role]
    base = role.split("_", 1)[0]
    if base in ROLE_SEEDS:
        return ROLE_SEEDS[base]
    return 10 + zlib.crc32(role.encode()) % 1000


def init_from_teacher(model: torch.nn.Module, teacher: torch.nn.Module, role: str) -> None:
    """Start ``model`` from the teacher's weights (``student.init_from_teacher``): a model with
    a ``load_teacher`` method decides what to copy (``roi_zoom``: its classifier); any other
    must have the teacher's architecture."""
    state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    loader = getattr(model, "load_teacher", None)
    try:
        if loader is not None:
            loader(state)
        else:
            model.load_state_dict(state)
    except RuntimeError as e:
        raise KdError(
            f"{role}.init_from_teacher: the teacher's weights do not fit the {role} "
            f"({str(e).splitlines()[0]}); use the same backbone for both or set it false"
        ) from None


def check_run_folder(recipe: Recipe, force: bool) -> None:
    """Refuse a run folder made by another recipe, unless ``force``."""
    path = recipe.output_dir / "recipe.resolved.json"
    if path.exists() and not force:
        try:
            saved = json.loads(path.read_text()).get("digest")
        except json.JSONDecodeError:
            saved = None
        if saved != recipe.digest():
            raise KdError(
                f"{recipe.output_dir}: this run folder belongs to a different recipe; choose "
                f"another experiment.output (--output) or pass --force to reuse it"
            )


def prepare_run_folder(recipe: Recipe, force: bool) -> Path:
    """Check (``check_run_folder``), create and stamp the run folder with the resolved recipe."""
    check_run_folder(recipe, force)
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "recipe.resolved.json",
        json.dumps({"digest": recipe.digest(), "recipe": recipe.to_dict()}, indent=2),
    )
    return out


def run(recipe: Recipe, force: bool = False, quiet: bool = False) -> RunResult:
    """Run ``recipe`` into its run folder and write results, report and figures."""
    from kdtoolkit.engine.evaluate import finish_run

    out = prepare_run_folder(recipe, force)
    with RunProgress(out / "run.log", quiet=quiet) as progress:
        progress.log(f"run {recipe.experiment.name} -> {out} (recipe {recipe.source})")
        runner = Runner(recipe, progress)
        progress.log(
            f"device {runner.device}; {len(runner.samples)} samples, {runner.num_classes} classes"
        )
        folds = runner.folds_to_run()
        progress.start_run(len(folds) * runner.stages_per_fold())
        per_fold = {k: runner.run_fold(k) for k in folds}
        for k in range(recipe.cv.folds):  # folds run earlier into this folder (runs in parts)
            done = out / f"fold_{k}" / "eval.json"
            if k not in per_fold and done.exists():
                progress.log(f"fold {k}: evaluated in an earlier run, included in the results")
                per_fold[k] = json.loads(done.read_text())
        return finish_run(runner, dict(sorted(per_fold.items())))
