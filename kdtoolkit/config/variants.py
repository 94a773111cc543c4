"""The checks of ``kd compare``'s variants that need only the recipe: a variant's recipe, and
what it may change (``loss.*`` and ``student.*``: the folds, teacher, ROI provider and
baseline are shared). ``kd validate`` runs them too, without the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtoolkit.config.recipe import Recipe, RecipeError, load_recipe
from kdtoolkit.errors import KdError


def load_variant_recipe(path: Path, overrides: list[str], variant: str = "") -> Recipe:
    """The recipe at ``path`` with a variant's ``overrides`` (``load_recipe``; an override
    ``loss.N.…`` with N the number of terms appends one, as ``--set`` does everywhere); its
    problems are named as the variant's."""
    try:
        return load_recipe(path, overrides)
    except RecipeError as e:
        if not variant:
            raise
        raise RecipeError(
            str(path), [f"compare.variants.{variant}: {p}" for p in e.problems]
        ) from None


def variant_problems(path: Path, sets: list[str]) -> list[str]:
    """Every problem of the recipe's ``[compare]`` variants (``kd validate``): what loading
    each finds, and what ``kd compare`` refuses (``check_shared``)."""
    problems = []
    base = load_recipe(path, sets)
    for name, overrides in base.compare.variants.items():
        try:
            check_shared(base, name, load_variant_recipe(path, sets + list(overrides), name))
        except RecipeError as e:
            problems += e.problems
        except KdError as e:
            problems.append(f"compare.variants.{name}: {e}")
    return problems


def flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_shared(base: Recipe, name: str, recipe: Recipe) -> None:
    """Refuse a variant that changes what the teacher, baseline or folds depend on."""
    a, b = flat(base.to_dict()), flat(recipe.to_dict())

    def free(key: str) -> bool:
        return key == "loss" or key.startswith("student.")

    changed = sorted(k for k in a.keys() | b.keys() if not free(k) and a.get(k) != b.get(k))
    if changed:
        raise KdError(
            f"variant {name!r} changes {', '.join(changed)}; a variant may change only "
            "loss.* and student.* settings (its backbone included), since the folds, teacher, "
            "ROI provider and baseline are shared"
        )
