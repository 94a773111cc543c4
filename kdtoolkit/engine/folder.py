"""The run folder's stamp (``recipe.resolved.json``) and the checks made before it is written.

A run checks everything that could refuse it (the folder's recipe, every finished stage output
of the folds it runs, the fold assignment) before it writes anything: a refused run leaves the
folder as it found it. Then it stamps the folder (``stamp_run_folder``), writes a new fold
assignment and starts its log.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.distributed import is_main
from kdtoolkit.engine.plan import FoldPlan, RoiSpec, TrainSpec
from kdtoolkit.engine.stage import checkpoint_digest, read_rois, reusable
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.fileio import atomic_write_text, read_json
from kdtoolkit.report.results import FoldResult

STAMP = "recipe.resolved.json"


def check_run_folder(recipe: Recipe, force: bool) -> None:
    """Refuse a run folder made by another recipe, or whose stamp is damaged, unless
    ``force``. Reads only."""
    path = recipe.output_dir / STAMP
    if recipe.output_dir.exists() and not recipe.output_dir.is_dir():
        raise KdError(f"{recipe.output_dir}: is a file, not a folder; choose another output")
    if not path.exists() or force:
        return
    doc = read_json(path, "the run folder's resolved recipe", "delete it or pass --force")
    if doc.get("digest") != recipe.digest():
        raise KdError(
            f"{recipe.output_dir}: this run folder belongs to a different recipe; choose "
            f"another experiment.output (--output) or pass --force to reuse it"
        )


def stamp_run_folder(recipe: Recipe, data_digest: str = "") -> Path:
    """Create the run folder and stamp it with the resolved recipe (and the data digest)."""
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    doc = {"digest": recipe.digest(), "recipe": recipe.to_dict()}
    if data_digest:
        doc["data_digest"] = data_digest
    atomic_write_text(out / STAMP, json.dumps(doc, indent=2))
    return out


def check_outputs(ctx: RunContext, plan: FoldPlan, folds: list[int]) -> None:
    """Every refusal the stages of ``folds`` would make, made now and writing nothing: a
    finished output of another recipe, or a damaged one (``--force`` remakes them instead)."""
    if ctx.force:
        return
    for k in folds:
        done = ctx.paths.evaluation(k)
        if plan.evaluation.cache and done.exists():
            FoldResult.read(done)
        for stage in plan.stages:
            if isinstance(stage, TrainSpec):
                ckpt, what = ctx.paths.checkpoint(k, stage.role), f"fold {k} {stage.role}"
                if ckpt.exists():
                    digest, data = checkpoint_digest(ctx, what, ckpt)
                    want = (stage.recipe or ctx.recipe).digest()
                    reusable(ctx, what, ckpt, digest, want, data, quiet=True)
            elif isinstance(stage, RoiSpec):
                cache = ctx.paths.stage(k, stage.role) / "rois.json"
                saved = read_rois(cache, False, ctx.log) if cache.exists() else None
                if saved is not None:
                    want = ctx.recipe.digest()
                    reusable(
                        ctx, f"fold {k} {stage.role}", cache, saved[1] or want, want, quiet=True
                    )


@contextlib.contextmanager
def stamped(ctx: RunContext, plan: FoldPlan, folds: list[int]) -> Iterator[None]:
    """Check (``check_outputs``), then stamp the folder, write a new fold assignment and start
    the log (held until now). A run that fails in the block in a folder it stamped first has
    the stamp taken back, so the corrected recipe needs no ``--force``; the log says why it
    stopped."""
    check_outputs(ctx, plan, folds)
    path = ctx.paths.root / STAMP
    before = path.read_bytes() if path.exists() else None
    if is_main():
        stamp_run_folder(ctx.recipe, ctx.data_digest)
    ctx.write_folds()
    ctx.progress.commit()
    try:
        yield
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt | Interrupted):
            ctx.log("interrupted: finished stages and epochs are kept; rerun to resume")
        else:
            ctx.log(f"stopped: {e if isinstance(e, KdError) else f'{type(e).__name__}: {e}'}")
            evaluated = any(ctx.paths.root.glob("fold_*/eval.json"))
            if before is None and not evaluated and is_main():
                path.unlink(missing_ok=True)
        raise
