"""Gap closure of several student recipes ("variants") against one teacher and one baseline.

    python benchmarks/gap_closure.py RECIPE \\
        --variant "paper:" \\
        --variant "roi_feature:loss.3.name=roi_feature,loss.3.weight=0.5" \\
        [--set cv.folds=3 ...] [--output DIR] [--device cpu] [--quiet] [--force]

A variant is ``NAME:OVERRIDES``: a lower snake_case name, then ``--set``-style ``key=value``
overrides separated by commas (commas inside ``[...]``, ``{...}`` or quotes belong to the value).
``NAME:`` (or ``NAME``) is the recipe as it is. ``loss.N.key=value`` with N equal to the number
of loss terms appends a new term; ``loss.N.weight=0`` switches a term off. A variant may change
only ``loss`` and the student's settings (``student.*``, its backbone options included, but not
its backbone): the
folds, teacher, ROI provider and full-image baseline are shared, so they are trained once per
fold (stages ``teacher``, ``roi``, ``baseline_full``) and each variant trains its own student
(stage ``student_<name>``), all cached in the output folder (a rerun, or one with more variants,
reuses them). Variant students share the plain student's seed, so they start from the same
weights and batch order and differ only in what the variant changes.

Every model is evaluated on the held-out folds; the table (and ``gap_closure.json`` /
``gap_closure.md`` in the output folder) gives accuracy and weighted F1 as mean ± std over folds
and the gap closure ``(student − baseline) / (teacher − baseline)`` in mean accuracy.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from kdtoolkit.config.override import apply_overrides, parse_override
from kdtoolkit.config.recipe import (
    Recipe,
    RecipeError,
    load_recipe,
    read_toml,
    task_defaults,
)
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.report.metrics import gap_closure, summarise

TEACHER, BASELINE = "teacher_crop", "baseline_full"
NAME = re.compile(r"[a-z0-9][a-z0-9_]*")


@dataclass
class Variant:
    """A named list of recipe overrides."""

    name: str
    overrides: list[str]

    @property
    def role(self) -> str:
        return f"student_{self.name}"


def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[2,3],c={x=1,y=2}`` at the commas outside brackets, braces and quotes."""
    parts, current, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_variant(text: str) -> Variant:
    """``'NAME:k=v,k=v'`` (or ``'NAME'``) → ``Variant``."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not NAME.fullmatch(name):
        raise KdError(
            f"--variant {text!r}: the name must be lower snake_case (a-z, 0-9, _), "
            "e.g. --variant 'roi_feature:loss.3.name=roi_feature'"
        )
    if name in (TEACHER, BASELINE):
        raise KdError(f"--variant {text!r}: {name!r} is the name of a reference row")
    overrides = split_overrides(rest)
    for item in overrides:
        parse_override(item)  # a malformed one fails here, naming itself
    return Variant(name, overrides)


def with_new_loss_terms(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with an empty ``[[loss]]`` table appended for each ``loss.N.…``
    override whose N is the next free index, so ``--set`` style overrides can add a term."""
    indices = set()
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] == "loss" and len(path) > 2 and path[1].isdigit():
            indices.add(int(path[1]))
    out = copy.deepcopy(raw)
    losses = out.get("loss")
    if losses is None:
        losses = copy.deepcopy(task_defaults(out).get("loss", []))
    if not isinstance(losses, list):
        return out  # validation reports it
    for index in sorted(indices):
        if index == len(losses):
            losses.append({})
    if indices:
        out["loss"] = losses
    return out


def load_variant_recipe(path: Path, overrides: list[str]) -> Recipe:
    """``load_recipe(path, overrides)`` that also accepts overrides appending loss terms."""
    raw = with_new_loss_terms(read_toml(path), overrides)
    overrides = list(overrides)
    # load_recipe reads relative data paths against the cwd for a dict; keep them file-relative
    data = apply_overrides(raw, overrides).get("data")
    manifest = data.get("manifest") if isinstance(data, dict) else None
    if isinstance(manifest, str) and manifest and not Path(manifest).is_absolute():
        candidate = path.resolve().parent / manifest
        if candidate.exists() or not Path(manifest).exists():
            overrides.append(f"data.manifest={json.dumps(str(candidate))}")
    try:
        recipe = load_recipe(raw, overrides)
    except RecipeError as e:
        raise RecipeError(str(path), e.problems) from None
    recipe.source = str(path)
    return recipe


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_shared(base: Recipe, variant: Variant, recipe: Recipe) -> None:
    """Refuse a variant that changes what the teacher, baseline or folds depend on."""
    a, b = _flat(base.to_dict()), _flat(recipe.to_dict())

    def free(key: str) -> bool:
        return key == "loss" or (key.startswith("student.") and key != "student.backbone")

    changed = sorted(k for k in a.keys() | b.keys() if not free(k) and a.get(k) != b.get(k))
    if changed:
        raise KdError(
            f"variant {variant.name!r} changes {', '.join(changed)}; a variant may change only "
            "loss.* and student.* settings (its backbone options, not its backbone), since the "
            "folds, teacher, ROI provider and baseline are shared"
        )


def check_cached_student(out: Path, fold: int, variant: Variant, recipe: Recipe) -> None:
    """Refuse a cached variant student trained for another definition of the variant."""
    meta_path = out / f"fold_{fold}" / variant.role / "model.json"
    if meta_path.exists():
        saved = json.loads(meta_path.read_text()).get("recipe_digest")
        if saved != recipe.digest():
            raise KdError(
                f"{meta_path.parent}: trained for another definition of variant "
                f"{variant.name!r}; rename the variant, choose another --output, or --force"
            )


def measure(
    recipe_path: Path,
    variants: list[Variant],
    sets: list[str],
    output: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) teacher, baseline and one student per variant on every fold, evaluate
    them on the held-out folds and return the results (also written to the output folder)."""
    from kdtoolkit.engine.evaluate import evaluate_fold
    from kdtoolkit.engine.progress import RunProgress
    from kdtoolkit.engine.run import Runner, build_loss, prepare_run_folder

    if not variants:
        raise KdError("no --variant given, e.g. --variant 'paper:'")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise KdError(f"--variant: names must be unique, got {names}")
    forced = ["evaluate.cam_examples=0"]  # no per-fold CAM files: the variants would overwrite
    if output is None:
        output = Path(f"{load_variant_recipe(recipe_path, sets + forced).output_dir}-gap_closure")
    forced.append(f"experiment.output={json.dumps(str(output))}")
    base = load_variant_recipe(recipe_path, sets + forced)
    recipes = [load_variant_recipe(recipe_path, sets + v.overrides + forced) for v in variants]
    for v, recipe in zip(variants, recipes, strict=True):
        check_shared(base, v, recipe)

    out = prepare_run_folder(base, force)
    per_fold: list[dict[str, Any]] = []
    with RunProgress(out / "gap_closure.log", quiet=quiet) as progress:
        progress.log(f"gap closure of {names} ({recipe_path}) -> {out}")
        runner = Runner(base, progress)
        runners = [Runner(recipe, progress) for recipe in recipes]
        folds = runner.folds_to_run()
        if not force:
            for k in folds:
                for v, recipe in zip(variants, recipes, strict=True):
                    check_cached_student(out, k, v, recipe)
        progress.start_run(len(folds) * (3 + len(variants)))
        ce_only = [("ce", 1.0, {})]
        for k in folds:
            train_idx, val_idx, test_idx = runner.fold_indices(k)
            split = (train_idx, val_idx)
            teacher_ckpt = runner.train(
                k, "teacher", "crop", base.teacher, build_loss(base, ce_only), split
            )
            teacher = runner.load_model(teacher_ckpt)
            baseline_ckpt = runner.train(
                k, "baseline_full", "image", base.student, build_loss(base, ce_only), split
            )
            rois, _ = runner.rois(k, train_idx)
            mask_rois = {
                int(i): (tuple(rois.boxes[i]), float(rois.angles[i]))
                for i in range(len(runner.samples))
            }
            metrics: dict[str, dict[str, float]] = {}
            for i, (v, vrunner) in enumerate(zip(variants, runners, strict=True)):
                loss = build_loss(vrunner.recipe)
                ckpt = vrunner.train(
                    k,
                    v.role,
                    "image",
                    vrunner.recipe.student,
                    loss,
                    split,
                    teacher=teacher if loss.needs_teacher else None,
                    mask_rois=mask_rois,
                )
                result = evaluate_fold(
                    vrunner,
                    k,
                    test_idx,
                    teacher,
                    teacher_ckpt,
                    ckpt,
                    baseline_ckpt if i == 0 else None,  # teacher and baseline: once per fold
                    None,
                )
                if i == 0:
                    metrics[TEACHER] = result["metrics"][TEACHER]
                    metrics[BASELINE] = result["metrics"][BASELINE]
                metrics[v.name] = result["metrics"]["student"]
            per_fold.append({"fold": k, "n_test": len(test_idx), "metrics": metrics})
            accuracy = ", ".join(f"{row} {m['accuracy']:.3f}" for row, m in metrics.items())
            progress.log(f"fold {k} accuracy: {accuracy}")

    summary = summarise([f["metrics"] for f in per_fold])
    results = {
        "recipe": str(recipe_path),
        "recipe_digest": base.digest(),
        "output": str(out),
        "metric": "accuracy",
        "formula": "(student - baseline_full) / (teacher_crop - baseline_full), mean accuracy",
        "folds_run": folds,
        "rows": [TEACHER, BASELINE, *names],
        "models": {"teacher": base.teacher.backbone, "student": base.student.backbone},
        "variants": {
            v.name: {
                "overrides": v.overrides,
                "role": v.role,
                "recipe_digest": recipe.digest(),
                "loss": recipe.to_dict()["loss"],
                "student": recipe.to_dict()["student"],
            }
            for v, recipe in zip(variants, recipes, strict=True)
        },
        "folds": per_fold,
        "summary": summary,
        "gap_closure": {
            v.name: gap_closure(summary, student=v.name, baseline=BASELINE, teacher=TEACHER)
            for v in variants
        },
    }
    atomic_write_text(out / "gap_closure.json", json.dumps(results, indent=1))
    atomic_write_text(out / "gap_closure.md", markdown(results))
    return results


def _pm(summary: dict[str, Any], row: str, metric: str) -> str:
    value = summary.get(row, {}).get(metric)
    if value is None:
        return "n/a"
    return f"{100 * value['mean']:.2f} ± {100 * value['std']:.2f}"


def _gap(results: dict[str, Any], row: str) -> str:
    if row in (TEACHER, BASELINE):
        return "—"
    value = results["gap_closure"].get(row)
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}%"


def table(results: dict[str, Any]) -> Table:
    """The results as a rich table: one row per setting."""
    folds = len(results["folds_run"])
    out = Table(title=f"Gap closure over {folds} fold(s): {results['recipe']}")
    out.add_column("setting", no_wrap=True)
    out.add_column("accuracy %", justify="right", no_wrap=True)
    out.add_column("F1 %", justify="right", no_wrap=True)
    out.add_column("gap closure", justify="right", no_wrap=True)
    for row in results["rows"]:
        summary = results["summary"]
        out.add_row(row, _pm(summary, row, "accuracy"), _pm(summary, row, "f1"), _gap(results, row))
    return out


def markdown(results: dict[str, Any]) -> str:
    """``gap_closure.md``: the table, the variants and the per-fold accuracies."""
    rows, summary = results["rows"], results["summary"]
    lines = [
        "# Gap closure",
        "",
        f"Recipe `{results['recipe']}` (digest `{results['recipe_digest']}`), "
        f"folds {results['folds_run']}, teacher `{results['models']['teacher']}`, "
        f"student `{results['models']['student']}`. Held-out folds, mean ± std (%).",
        f"Gap closure = {results['formula']}.",
        "",
        "| setting | accuracy | F1 | gap closure |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row} | {_pm(summary, row, 'accuracy')} | {_pm(summary, row, 'f1')} "
            f"| {_gap(results, row)} |"
        )
    lines += ["", "## Variants", ""]
    for name, info in results["variants"].items():
        changes = ", ".join(f"`{o}`" for o in info["overrides"]) or "the recipe as it is"
        terms = " + ".join(f"{t['weight']:g}·{t['name']}" for t in info["loss"])
        lines.append(f"- **{name}** (stage `{info['role']}`): {changes}; loss {terms}")
    lines += [
        "",
        "## Accuracy per fold (%)",
        "",
        "| fold | " + " | ".join(rows) + " |",
        "|---" * (len(rows) + 1) + "|",
    ]
    for fold in results["folds"]:
        cells = [f"{100 * fold['metrics'][row]['accuracy']:.2f}" for row in rows]
        lines.append(f"| {fold['fold']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="NAME:key=value,key=value (repeatable); 'NAME:' is the recipe as it is.",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override for every setting: --set cv.folds=3 (repeatable)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Output folder (default: the run folder + -gap_closure).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    force: Annotated[bool, typer.Option(help="Reuse an output folder of another recipe.")] = False,
    quiet: Annotated[bool, typer.Option(help="No live progress view.")] = False,
) -> None:
    """Gap closure of student variants against one crop teacher and one full-image baseline."""
    sets = list(set_ or [])
    if device is not None:
        sets.append(f"experiment.device={json.dumps(device)}")
    variants = [parse_variant(text) for text in (variant or ["recipe:"])]
    results = measure(recipe, variants, sets, output, force, quiet)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table(results))
    for name, info in results["variants"].items():
        console.print(
            f"  {name}: {', '.join(info['overrides']) or '(recipe as is)'}", highlight=False
        )
    out = Path(results["output"])
    console.print(f"written: {out / 'gap_closure.json'}, {out / 'gap_closure.md'}", highlight=False)


if __name__ == "__main__":
    from kdtoolkit.cli import run_app

    run_app(app)
