"""The epoch loop: training one model (teacher, student or baseline) with resume, and its
validation; data-parallel when launched as several processes (``engine.distributed``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from kdtoolkit.config.recipe import ModelConfig
from kdtoolkit.engine.distributed import (
    all_sum,
    broadcast,
    data_parallel,
    is_main,
    main_first,
    world,
)
from kdtoolkit.engine.loaders import Loader
from kdtoolkit.engine.resume import read_state, restore_rng, rng_states, set_aside
from kdtoolkit.engine.selection import best_score_of, select, weight_average
from kdtoolkit.errors import KdError
from kdtoolkit.models.checkpoint import save_state, weights_of
from kdtoolkit.models.device import autocast, channels_last
from kdtoolkit.plugins.loss import CompositeLoss, LossContext
from kdtoolkit.report.metrics import classification_metrics

View = Literal["crop", "image"]


@dataclass
class Stage:
    """What to train: ``model`` on ``view`` ("crop" teacher view or "image" student view)
    with ``loss``; ``teacher`` (frozen) feeds terms that need it."""

    name: str
    model: nn.Module
    view: View
    loss: CompositeLoss
    config: ModelConfig
    teacher: nn.Module | None = None
    class_weights: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""  # how errors name the stage ("fold 0 teacher"); default its name
    digest: str = ""  # the recipe's: a resume state of another recipe is set aside


class DivergedError(KdError):
    """A non-finite loss, gradient or validation loss: training diverged."""


def check_finite(
    stage: Stage, epoch: int, total: torch.Tensor, parts: dict[str, float], params: list
) -> None:
    """Stop at once when the loss or the gradients are not finite, naming the term."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    if bool(torch.isfinite(total.detach()).all() and torch.isfinite(norm)):
        return
    bad = [k for k, v in parts.items() if not math.isfinite(v)]
    if not math.isfinite(float(total.detach())):
        what = f"loss term {bad[0]!r}" if bad else "the total loss"
        value = parts[bad[0]] if bad else float(total.detach())
    else:
        what, value = "the gradients", float(norm)
    raise DivergedError(
        f"{stage.label or stage.name} epoch {epoch}: {what} is {value} (training diverged); "
        f"the last finished epoch is kept; lower {stage.name.split('_')[0]}.lr or loss weights"
    )


def check_inputs(stage: Stage, epoch: int, batch: dict[str, Any]) -> None:
    """Stop when a batch's images or crops hold NaN or infinite values (the data, not a loss
    term, is at fault), naming the samples."""
    for key in ("image", "crop"):
        x = batch.get(key)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            continue
        finite = torch.isfinite(x).flatten(1).all(1)
        if bool(finite.all()):
            continue
        index = batch.get("index")
        which = (index[~finite.cpu()] if index is not None else (~finite).nonzero()[:, 0]).tolist()
        raise KdError(
            f"{stage.label or stage.name} epoch {epoch}: the input batch holds NaN or infinite "
            f"values ({key} of sample index {', '.join(str(i) for i in which[:5])}); the data is "
            "at fault, not a loss term: kd data check MANIFEST names the rows"
        )


def gradient_shares(weighted: dict[str, torch.Tensor], params: list) -> dict[str, float]:
    """Each weighted term's share of the gradient: ``‖∂(w_i·L_i)/∂θ‖ / Σ_j ‖∂(w_j·L_j)/∂θ‖``
    over the trainable parameters θ (L2 norm over all of them; a term that does not reach θ
    has norm 0), as ``{"grad_share_<term>": share}``; empty when all norms are 0. The graph
    is retained for the step's own backward."""
    norms = {}
    for key, value in weighted.items():
        if not value.requires_grad:
            norms[key] = 0.0
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        squares = sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None)
        norms[key] = math.sqrt(squares)
    total = sum(norms.values())
    if not total > 0 or not math.isfinite(total):
        return {}
    return {f"grad_share_{key}": norm / total for key, norm in norms.items()}


def lr_lambda(config: ModelConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up for ``warmup_epochs`` then cosine decay to 0 (or constant)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_context(
    stage: Stage,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    net: nn.Module | None = None,
) -> LossContext:
    """Forward the student (and teacher when needed) and build the loss context. ``net``:
    the student's ``FeaturesAndLogits`` (DistributedDataParallel-wrapped when launched);
    default the model's own methods."""
    x = channels_last(batch[stage.view].to(device, non_blocking=True), device)
    if stage.loss.needs_input_grad and torch.is_grad_enabled():
        x.requires_grad_(True)
    if net is not None:
        features, logits = net(x)
    else:
        features = stage.model.forward_features(x)
        logits = stage.model.forward_head(features)
    teacher_logits = teacher_features = None
    if stage.loss.needs_teacher and stage.teacher is not None:
        with torch.no_grad():
            crop = channels_last(batch["crop"].to(device, non_blocking=True), device)
            teacher_features = stage.teacher.forward_features(crop)
            teacher_logits = stage.teacher.forward_head(teacher_features)
    return LossContext(
        student=stage.model,
        images=x,
        features=features,
        logits=logits,
        labels=batch["label"].to(device),
        boxes=batch["box"].to(device) if "box" in batch else None,
        masks=batch["mask"].to(device) if "mask" in batch else None,
        teacher_logits=teacher_logits,
        teacher_features=teacher_features,
        class_weights=stage.class_weights,
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: Loader, view: View, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, labels, indices) over a loader, in eval mode."""
    model.eval()
    out, labels, indices = [], [], []
    for batch in loader:
        with autocast(device):
            logits = model(channels_last(batch[view].to(device), device))
        out.append(logits.float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    return torch.cat(out).numpy(), torch.cat(labels).numpy(), torch.cat(indices).numpy()


def evaluate(
    model: nn.Module, loader: Loader, view: View, device: torch.device, num_classes: int
) -> dict[str, float]:
    logits, labels, _ = predict_logits(model, loader, view, device)
    metrics = classification_metrics(labels, logits.argmax(1), num_classes, ordinal=False)
    metrics["loss"] = float(
        nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    )
    return metrics


def misfit_of(state: dict[str, Any], model: nn.Module, loss: nn.Module) -> str:
    """Why a resume state's weights do not fit ``model`` and ``loss`` ('' when they do)."""
    for name, module in (("model", model), ("loss", loss)):
        mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        saved = state[name]
        theirs = {k: tuple(v.shape) for k, v in saved.items()} if isinstance(saved, dict) else {}
        if mine != theirs:
            diff = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k] != theirs[k]]
            return f"{name} weights differ ({', '.join(diff[:3])})"
    return ""


def resume_state(
    stage: Stage, path: Path, model: nn.Module, loss: nn.Module, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The resume state at ``path`` when it is this stage's (same recipe, weights that fit);
    a damaged or foreign one is set aside (None)."""
    state = read_state(path, log)
    if state is not None and state.get("recipe_digest", stage.digest) != stage.digest:
        set_aside(path, "made by another recipe", log)
        state = None
    if state is not None and (misfit := misfit_of(state, model, loss)):
        set_aside(path, f"made for another model: {misfit}", log)
        state = None
    if state is not None and stage.config.ema and "ema" not in state:
        set_aside(path, "made without the weight average (ema)", log)
        state = None
    return state


def train_stage(
    stage: Stage,
    train_loader: Loader,
    val_loader: Loader,
    device: torch.device,
    state_path: Path,
    num_classes: int,
    on_epoch: Callable[[int, dict[str, Any]], None] = lambda e, m: None,
    on_step: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, torch.Tensor]:
    """Train ``stage``; resume from ``state_path`` when it holds an interrupted run (exactly:
    the random states of Python, NumPy, torch and the loaders are saved with it; a damaged
    state is set aside and the stage restarts). A non-finite loss or gradient raises
    ``DivergedError`` before the epoch's state is written.

    Model selection on ``val_loader`` by ``config.select_by`` (``select``); returns the
    selected weights (model and loss-term parameters, the latter prefixed ``loss.``). With
    ``config.ema`` the model validated, selected and returned is the exponential moving average
    of the weights (timm's ``ModelEmaV3``, decay warmed up). The state file is rewritten
    atomically after every epoch.

    Launched as several processes, each trains on its part of every batch (``train_loader``
    gives it) under DistributedDataParallel: each part's mean loss, averaged over the ranks,
    is the global batch's mean, so the gradients are those of one process. Rank 0 alone
    validates (the others receive its metrics) and writes the state file.
    """
    config = stage.config
    model = channels_last(stage.model.to(device), device)
    loss = stage.loss.to(device)
    if stage.teacher is not None:
        channels_last(stage.teacher.to(device), device).eval().requires_grad_(False)
    loss.bind(model)
    net = data_parallel(model, loss, device)
    size = world().size
    whole = min(config.batch_size, len(train_loader.dataset))  # items of a global batch
    params = [p for p in [*model.parameters(), *loss.parameters()] if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=fused
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config, max(1, len(train_loader)))
    )
    ema = weight_average(model, config.ema)
    start, best_score, best = 0, [-math.inf, -math.inf], None
    loaders = (train_loader, val_loader)
    with main_first():  # rank 0 sets a damaged or foreign state aside before the others look
        state = resume_state(stage, state_path, model, loss, log)
    if state is not None:
        model.load_state_dict(state["model"])
        loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state, loaders)
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, best_score, best = state["epoch"], best_score_of(state), state["best"]
        stage.history[:] = state.get("history", [])
        log(f"{stage.label or stage.name}: resuming after epoch {start} from {state_path}")
    for epoch in range(start, config.epochs):
        began = time.perf_counter()
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        model.train()
        loss.train()
        sums: dict[str, float] = {}
        shares: dict[str, float] = {}
        count = 0
        # the gradient share of each term on the epoch's first batch (one process only: an
        # extra backward outside DDP's own would upset its static graph)
        loss.keep_terms = len(loss.terms) > 1 and size == 1
        for batch in train_loader:
            n = len(batch["label"])
            check_inputs(stage, epoch + 1, batch)
            with autocast(device):
                ctx = make_context(stage, batch, device, net)
                total, parts = loss(ctx)
            if loss.keep_terms:
                shares = gradient_shares(loss.weighted, params)
                loss.keep_terms, loss.weighted = False, {}
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: weigh each part's mean by its share
            (total * (n * size / whole) if size > 1 else total).backward()
            check_finite(stage, epoch + 1, total, parts, params)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model, step=scheduler.last_epoch)
            count += n
            for key, value in {"loss": float(total.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * n
            on_step()
        if size > 1:
            keys = sorted(sums)
            *totals, count = all_sum([*(sums[k] for k in keys), count], device)
            sums = dict(zip(keys, totals, strict=True))
        trained = time.perf_counter() - began
        chosen = model if ema is None else ema.module
        val = evaluate(chosen, val_loader, stage.view, device, num_classes) if is_main() else {}
        val = broadcast(val)
        timing = {  # for the loggers, not the history (a resumed run repeats that exactly)
            "epoch_seconds": time.perf_counter() - began,
            "images_per_second": count / max(trained, 1e-9),
        }
        if not math.isfinite(val["loss"]):
            raise DivergedError(
                f"{stage.label or stage.name} epoch {epoch + 1}: the validation loss is "
                f"{val['loss']} (training diverged); the last finished epoch is kept; lower "
                f"{stage.name.split('_')[0]}.lr or loss weights"
            )
        record = {
            "epoch": epoch + 1,
            **{f"train_{k}": v / max(1, count) for k, v in sums.items()},
            "val_accuracy": val["accuracy"],
            "val_f1": val["f1"],
            "val_loss": val["loss"],
            "lr": optimizer.param_groups[0]["lr"],
            **shares,
        }
        if shares:
            log(
                f"{stage.label or stage.name} epoch {epoch + 1}: gradient share "
                + ", ".join(f"{k.removeprefix('grad_share_')} {v:.1%}" for k, v in shares.items())
            )
        stage.history.append(record)
        score = select(config.select_by, val)
        if config.select_by == "last" or best is None or score > best_score:
            best_score = score
            best = weights_of(chosen, loss)
        if not is_main():
            on_epoch(epoch + 1, {**record, **timing})
            continue
        save_state(
            state_path,
            {
                "model": model.state_dict(),
                "loss": loss.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **rng_states(loaders),
                "recipe_digest": stage.digest,
                "epoch": epoch + 1,
                "best_score": best_score,
                **({"ema": ema.state_dict()} if ema is not None else {}),
                "best": best,
                "history": stage.history,
            },
        )
        on_epoch(epoch + 1, {**record, **timing})
    assert best is not None
    return best
