"""One stage of a fold into the run folder: a trained model (checkpoint with its metadata,
reused when present, resumed from its last epoch when interrupted) or the ROI provider's boxes
(cached)."""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.config.recipe import ModelConfig, Recipe
from kdtoolkit.data.geometry import enclosing_box
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.scan import read_spec
from kdtoolkit.data.view import ViewConfig
from kdtoolkit.engine.calibrate import calibrate
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.distributed import barrier, check_batch_size, is_main, main_first, world
from kdtoolkit.engine.plan import RoiSpec, TrainSpec
from kdtoolkit.engine.train import Stage, train_stage
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_text, read_json, reading
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.checkpoint import model_from_weights, read_metadata, save_checkpoint
from kdtoolkit.models.device import compile_trunk, seed_everything
from kdtoolkit.plugins.loss import CompositeLoss
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.roi import RoiRequest, RoiResult, run_provider
from kdtoolkit.report.results import BASELINE_FULL, STUDENT

ROLE_SEEDS = {"teacher": 1, "student": 2, "baseline_full": 3}


def role_seed(role: str, paired: bool = False) -> int:
    """A stage's seed offset: ``ROLE_SEEDS[role]``; a variant ``<role>_<name>`` of a known role
    (``student_kl``) shares that role's offset, so variants start from the same weights and
    batch order and differ only in what they change; any other role, a stable hash of its name.
    ``paired``: the full-image baseline shares the student's offset too, so student, variants
    and baseline differ only in their loss (``experiment.paired``)."""
    if paired and role == BASELINE_FULL:
        return ROLE_SEEDS[STUDENT]
    if role in ROLE_SEEDS:
        return ROLE_SEEDS[role]
    base = role.split("_", 1)[0]
    if base in ROLE_SEEDS:
        return ROLE_SEEDS[base]
    return 10 + zlib.crc32(role.encode()) % 1000


def stage_seed(recipe: Recipe, fold: int, role: str) -> int:
    """The seed of stage ``role`` on ``fold``: model initialisation, batch order, augmentation."""
    return recipe.experiment.seed * 1000 + fold * 10 + role_seed(role, recipe.experiment.paired)


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
        "read": read_settings(recipe),
        "recipe_digest": recipe.digest(),
        "recipe": recipe.to_dict(),
    }


def read_settings(recipe: Recipe) -> dict[str, Any]:
    """How the recipe reads scans (``ReadSpec`` fields: axis, slice, slab, projection, window,
    percentiles, spacing_mm), for a checkpoint's metadata."""
    return dataclasses.asdict(read_spec(recipe))


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


def check_input_size(
    model: torch.nn.Module, role: str, config: ModelConfig, view: str, cfg: ViewConfig
) -> None:
    """A one-line error when the input is too small for the backbone's downsampling."""
    size = cfg.crop_size if view == "crop" else cfg.image_size
    key = "data.crop_size" if view == "crop" else "data.image_size"
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, cfg.channels, *size))
    except RuntimeError as e:
        raise KdError(
            f"{role}: backbone {config.backbone!r} cannot take {size[0]}×{size[1]} inputs "
            f"({str(e).splitlines()[0]}); raise {key}"
        ) from None
    model.train()


def reusable(
    ctx: RunContext,
    what: str,
    path: Path,
    digest: str | None,
    want: str,
    data: str | None = None,
    quiet: bool = False,
) -> bool:
    """Whether a finished stage output (``path``, made by the recipe of ``digest`` from the
    data of ``data``, the run's ``data_digest`` then) may be reused by this run (recipe digest
    ``want``): yes when both digests match; when only the data changed, no (it is remade, and
    the log says why unless ``quiet``); made by another recipe: with ``--force``, no (it is
    remade), otherwise an error saying how to proceed."""
    if digest == want:
        have = getattr(ctx, "data_digest", "")
        if data is None or not have or data == have:  # outputs older than data digests: kept
            return True
        if not quiet:
            ctx.log(
                f"{what}: the data changed since {path} was made (the manifest or its images; "
                f"data digest {data[:12]}, now {have[:12]}); remaking it"
            )
        return False
    if digest == DAMAGED:
        return False  # named by ``checkpoint_digest`` (only --force gets here)
    if ctx.force:
        ctx.log(f"{what}: {path} was made by another recipe; remaking it (--force)")
        return False
    raise KdError(
        f"{what}: {path} was made by another recipe (digest {str(digest)[:12]}, this run "
        f"{want[:12]}); pass --force to retrain it, or choose another output folder"
    )


#: ``checkpoint_digest`` of a damaged checkpoint that ``--force`` remakes.
DAMAGED = "<damaged>"


def checkpoint_digest(ctx: RunContext, what: str, path: Path) -> tuple[str | None, str | None]:
    """The recipe and data digests stored with a checkpoint (None: none). A damaged
    checkpoint is an error naming it; with ``--force``, ``DAMAGED`` (it is remade, and the log
    says why)."""
    try:
        meta = read_metadata(path)
    except KdError as e:
        if ctx.force:
            ctx.log(f"{what}: {e}; remaking it (--force)")
            return DAMAGED, None
        raise KdError(f"{what}: {e}; delete it or pass --force to retrain it") from None
    digest, data = meta.get("recipe_digest"), meta.get("data_digest")
    return None if digest is None else str(digest), None if data is None else str(data)


def enclosure_samples(samples: Sequence[Sample]) -> list[Sample]:
    """``samples`` with each expert ROI replaced by its axis-aligned enclosure (clipped to the
    image, angle 0) and no crop file: the crops an axis-aligned detector's boxes cut."""
    out = []
    for s in samples:
        box = s.box
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in enclosing_box(box, s.angle))
            box = (max(x0, 0.0), max(y0, 0.0), min(x1, s.width), min(y1, s.height))
        out.append(replace(s, box=box, angle=0.0, crop=None))
    return out


def stage_samples(samples: Sequence[Sample], spec: TrainSpec) -> list[Sample] | None:
    """The samples a crop stage trains on, None: the run's. Enclosure crops:
    ``enclosure_samples``; jittered expert crops: cut from the full image (no crop file, which
    holds nothing around the ROI to move into), as a detector's crops are."""
    if spec.crops == "enclosure":
        return enclosure_samples(samples)
    if spec.jitter:
        return [replace(s, crop=None) for s in samples]
    return None


def train_model(
    ctx: RunContext,
    fold: int,
    spec: TrainSpec,
    loss: CompositeLoss,
    split: tuple[np.ndarray, np.ndarray],
    teacher: torch.nn.Module | None = None,
    mask_rois: dict[int, tuple] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
) -> Path:
    """Train ``spec`` on ``split`` (train, validation) unless its checkpoint exists; return the
    checkpoint path. ``teacher``: the frozen model of the terms that need one. ``on_epoch``:
    called with each finished epoch and its record (validation metrics included) after the
    epoch's state is saved; what it raises stops the training. Launched as
    several processes, every rank trains and rank 0 writes the checkpoint (the others wait for
    it)."""
    ckpt = ctx.paths.checkpoint(fold, spec.role)
    description = f"fold {fold} {spec.role}"
    recipe = spec.recipe or ctx.recipe
    digest = recipe.digest()
    stored = checkpoint_digest(ctx, description, ckpt) if ckpt.exists() else None
    if stored is not None and reusable(ctx, description, ckpt, stored[0], digest, stored[1]):
        ctx.log(f"{description}: done before, reusing {ckpt}")
        ctx.progress.advance_run()
        return ckpt
    stage_dir = ckpt.parent
    stage_dir.mkdir(parents=True, exist_ok=True)
    config, view, cfg = spec.config, spec.view, ctx.view
    seed = stage_seed(ctx.recipe, fold, spec.role)
    seed_everything(seed)
    model = build_backbone(
        config.backbone, ctx.num_classes, cfg.channels, dict(config.backbone_options)
    )
    check_input_size(model, spec.role, config, view, cfg)
    if teacher is not None and config.init_from_teacher:
        init_from_teacher(model, teacher, spec.role)
    loss.setup(model.num_features, teacher.num_features if teacher is not None else None)
    if ctx.recipe.experiment.compile:
        compile_trunk(model, ctx.device)
    train_idx, val_idx = split
    size = world().size
    if size > 1:
        section = "teacher" if view == "crop" else "student"
        check_batch_size(config.batch_size, f"{section}.batch_size")
        if len(train_idx) < size:
            raise KdError(
                f"{description}: {len(train_idx)} training samples cannot be shared by {size} "
                "processes; run fewer processes"
            )
    views = ("image", "crop") if view == "image" and teacher is not None else (view,)
    samples = stage_samples(ctx.samples, spec)
    stage = Stage(
        name=spec.role,
        model=model,
        view=view,
        loss=loss,
        config=config,
        teacher=teacher,
        class_weights=ctx.class_weights(train_idx, config),
        label=description,
        digest=digest,
    )
    ctx.progress.start_stage(description, config.epochs)
    state_path = stage_dir / "last.pt"

    def epoch_done(epoch: int, record: dict[str, Any], description: str) -> None:
        ctx.progress.epoch(epoch, record, description)
        ctx.loggers.epoch(fold, spec.role, epoch, record)
        if on_epoch is not None:
            on_epoch(epoch, record)

    started = time.perf_counter()
    val_loader = ctx.loaders(
        val_idx, False, config.batch_size, seed, views=(view,), samples=samples
    )
    best = train_stage(
        stage,
        ctx.loaders(
            train_idx, True, config.batch_size, seed, mask_rois, views, samples, spec.jitter
        ),
        val_loader,
        ctx.device,
        state_path,
        ctx.num_classes,
        on_epoch=lambda e, r: epoch_done(e, r, description),
        log=ctx.log,
    )
    seconds = time.perf_counter() - started
    if is_main():
        meta = model_metadata(recipe, spec.role, config, ctx.classes, cfg, view)
        meta.update({"fold": fold, "history": stage.history, "train_seconds": seconds})
        if ctx.data_digest:
            meta["data_digest"] = ctx.data_digest
        if view == "crop":  # which crops it learned from (the report names them)
            meta.update({"crops": spec.crops, "crop_jitter": spec.jitter})
        selected = model_from_weights(best, meta, ckpt).to(ctx.device)
        meta.update(calibrate(selected, val_loader, view, ctx.device))
        if note := meta["calibration"].get("note"):
            ctx.log(f"{description}: calibration: {note}")
        save_checkpoint(ckpt, best, meta)
        state_path.unlink(missing_ok=True)
    barrier()  # the checkpoint is there for every rank
    ctx.progress.end_stage()
    ctx.log(f"{description}: trained in {seconds:.1f}s -> {ckpt}")
    return ckpt


def provide_rois(
    ctx: RunContext, fold: int, spec: RoiSpec, train_idx: np.ndarray
) -> tuple[RoiResult, bool]:
    """The ROI provider's boxes for every sample, fitted on ``train_idx`` (cached per fold),
    and whether the provider learns (a detector: its boxes make the two-stage row). Launched
    as several processes, rank 0 runs the provider and the others read its cache."""
    with main_first():
        return provider_rois(ctx, fold, spec, train_idx)


def provider_rois(
    ctx: RunContext, fold: int, spec: RoiSpec, train_idx: np.ndarray
) -> tuple[RoiResult, bool]:
    """``provide_rois`` in one process: the cache when it holds this recipe's boxes, else
    the provider run (and cached)."""
    providers = registries().roi_providers
    provider_cls = providers.get(spec.provider)
    workdir = ctx.paths.stage(fold, spec.role)
    cache = workdir / "rois.json"
    want = ctx.recipe.digest()
    what = f"fold {fold} {spec.role}"
    saved = read_rois(cache, ctx.force, ctx.log) if cache.exists() else None
    if saved is not None and reusable(ctx, what, cache, saved[1] or want, want, saved[2]):
        ctx.progress.advance_run()
        return saved[0], provider_cls.learned
    workdir.mkdir(parents=True, exist_ok=True)
    provider = provider_cls(**spec.options)
    ctx.progress.start_stage(f"fold {fold} roi ({spec.provider})", 1)
    result = run_provider(
        provider,
        RoiRequest(
            fold=fold,
            samples=ctx.samples,
            train=train_idx,
            predict=np.arange(len(ctx.samples)),
            workdir=workdir,
            device=str(ctx.device),
            seed=ctx.recipe.experiment.seed + fold,
            log=ctx.log,
        ),
        spec.provider,
        providers.owner(spec.provider),
    )
    saved = {
        "boxes": result.boxes.tolist(),
        "angles": result.angles.tolist(),
        "found": result.found.tolist(),
        "metrics": result.metrics,
        "recipe_digest": want,
        **({"data_digest": ctx.data_digest} if ctx.data_digest else {}),
    }
    atomic_write_text(cache, json.dumps(saved))
    ctx.progress.end_stage()
    return result, provider_cls.learned


def read_rois(
    cache: Path, force: bool, log: Callable[[str], None]
) -> tuple[RoiResult, str | None, str | None] | None:
    """(boxes, recipe digest, data digest) of a ROI cache; damaged: an error naming it
    (``force``: None, so the provider runs again)."""
    fix = "delete it (or pass --force) to run the ROI provider again"
    try:
        saved = read_json(cache, "ROI cache", fix)
        with reading(cache, "ROI cache", fix):
            n = len(saved["boxes"])
            result = RoiResult(
                boxes=np.array(saved["boxes"], dtype=np.float64).reshape(n, 4),
                angles=np.array(saved["angles"], dtype=np.float64).reshape(n),
                found=np.array(saved["found"], dtype=bool).reshape(n),
                metrics=dict(saved["metrics"]),
            )
            digest, data = saved.get("recipe_digest"), saved.get("data_digest")
    except KdError as e:
        if not force:
            raise
        log(f"{e} (--force: running it again)")
        return None
    return result, None if digest is None else str(digest), None if data is None else str(data)


def mask_rois_of(rois: RoiResult) -> dict[int, tuple]:
    """``{sample index: (box, angle)}``: the boxes the views' ROI masks are drawn from."""
    return {int(i): (tuple(rois.boxes[i]), float(rois.angles[i])) for i in range(len(rois.boxes))}
