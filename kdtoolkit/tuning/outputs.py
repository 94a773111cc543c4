"""What ``kd tune`` writes after its study: ``trials.csv``, Optuna's history, intermediate
values and importance plots (``figures/``) and ``best.toml``, the recipe with the best trial's
values and no ``[tune]``, whose run folder is ``best/`` in the study's folder."""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdtoolkit.config.override import apply_overrides
from kdtoolkit.config.recipe import load_recipe, read_toml, with_default_losses
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_bytes, atomic_write_text
from kdtoolkit.plugins.logger import scalars_of


def trials_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per trial: number, state, value, seconds, whether it is the recipe's own values,
    each parameter, each fold's score."""
    params = sorted({k for r in rows for k in r["params"]})
    folds = sorted({k for r in rows for k in r["folds"]})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", "seconds", "recipe", *params, *folds])
    for r in rows:
        writer.writerow(
            [
                r["number"],
                r["state"],
                "" if r["value"] is None else r["value"],
                "" if r["seconds"] is None else round(r["seconds"], 1),
                str(r.get("recipe", False)).lower(),
                *(r["params"].get(k, "") for k in params),
                *(r["folds"].get(k, "") for k in folds),
            ]
        )
    return buf.getvalue()


def save_plot(plot: Callable[[], Any], path: Path) -> Path:
    """An Optuna matplotlib plot (its Axes) as a PNG, written atomically."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        ax = plot()
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    buf = io.BytesIO()
    figure.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return atomic_write_bytes(path, buf.getvalue())


def write_plots(study: Any, folder: Path, log: Callable[[str], None]) -> list[Path]:
    """History and intermediate values (with any finished trial) and parameter importances
    (with two complete trials or more); a plot Optuna cannot make is skipped with a log line."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = {"tune_history.png": vis.plot_optimization_history}
    plots["tune_intermediate.png"] = vis.plot_intermediate_values
    if complete >= 2:
        plots["tune_importance.png"] = vis.plot_param_importances
    else:
        log(f"tune_importance.png: needs 2 complete trials, the study has {complete}")
    written = []
    for name, plot in plots.items():
        try:
            written.append(save_plot(lambda plot=plot: plot(study), folder / name))
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            log(f"{name}: not made ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return written


def best_recipe(
    recipe_path: Path, sets: Sequence[str], params: dict[str, Any], output: Path
) -> dict[str, Any]:
    """The recipe file with ``sets`` and the best values applied, without ``[tune]``, its run
    folder ``output`` and its manifest path absolute (the file lives in the study's folder)."""
    raw = read_toml(recipe_path)
    changes = [*sets, *((key.split("."), value) for key, value in params.items())]
    raw = apply_overrides(with_default_losses(raw, changes), changes)
    raw.pop("tune", None)
    raw.setdefault("experiment", {})["output"] = str(output)
    manifest = load_recipe(recipe_path, list(sets)).data.manifest
    if manifest:
        raw["data"]["manifest"] = manifest
    return raw


def write_best(
    recipe_path: Path, sets: Sequence[str], params: dict[str, Any], folder: Path
) -> Path:
    """``best.toml`` in ``folder``, checked by loading it as ``kd validate`` does."""
    try:
        import tomli_w
    except ImportError:
        raise KdError('writing best.toml needs tomli-w; pip install "kdtoolkit[tune]"') from None
    path = folder / "best.toml"
    raw = best_recipe(recipe_path, sets, params, folder / "best")
    header = f"# {recipe_path} with the best values of kd tune ({folder}): {params}\n"
    atomic_write_text(path, header + tomli_w.dumps(raw))
    load_recipe(path)
    return path


def logged_results(result: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """What the run loggers get at the end of a study: ``trial_<n>/<metric>`` of each complete
    trial, ``best/<metric>``, ``best/trial``, the best numeric values (``best/loss.0.weight``)
    and ``recipe/<metric>`` (the recipe's own values), and the trials as a document."""
    metrics: dict[str, float] = {}
    for r in result.trials:
        if r["state"] == "complete":
            metrics[f"trial_{r['number']}/{result.metric}"] = float(r["value"])
            if r.get("recipe"):
                metrics[f"recipe/{result.metric}"] = float(r["value"])
    if result.best is not None:
        metrics[f"best/{result.metric}"] = float(result.best["value"])
        metrics["best/trial"] = float(result.best["number"])
        metrics.update(scalars_of({f"best/{k}": v for k, v in result.best["params"].items()}))
    doc = {"metric": result.metric, "direction": result.direction, "trials": result.trials}
    return metrics, doc


def write_outputs(
    result: Any, study: Any, recipe_path: Path, sets: Sequence[str], log: Callable[[str], None]
) -> None:
    """``trials.csv``, the plots and (with a complete trial) ``best.toml`` into
    ``result.output``; ``result`` gets ``best``, ``best_toml`` and ``files``."""
    folder = result.output
    result.files.append(atomic_write_text(folder / "trials.csv", trials_csv(result.trials)))
    result.files += write_plots(study, folder / "figures", log)
    complete = [r for r in result.trials if r["state"] == "complete"]
    if not complete:
        log("best.toml: no complete trial yet (all pruned or failed)")
        return
    pick = min if result.direction == "minimize" else max
    result.best = pick(complete, key=lambda r: r["value"])
    result.best_toml = write_best(recipe_path, sets, result.best["params"], folder)
    result.files.append(result.best_toml)
    log(f"best trial {result.best['number']}: {result.metric} {result.best['value']:.4f}")
    if own := [r for r in complete if r.get("recipe")]:
        log(f"the recipe's own values, trial {own[0]['number']}: {own[0]['value']:.4f}")
