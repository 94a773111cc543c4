"""``kd new-plugin``: write an installable plugin package from the template in ``template/``.

Template files end in ``.tmpl`` (so neither pytest nor ruff treats them as the toolkit's own
code); ``{{name}}``, ``{{package}}`` and ``{{dist}}`` in their paths and text are replaced.
``--oriented`` writes the files of ``oriented/`` over those of ``template/``: rotated ROIs in
the data and an oriented ROI provider.

Component names: the task is the plugin's name, every other component is prefixed with it
(``molars_logit_norm``), as docs/plugins.md recommends.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from typing import Annotated

import typer

from kdtoolkit.errors import KdError

TEMPLATE = Path(__file__).parent / "template"
#: Files written over the template's by ``--oriented``.
ORIENTED = Path(__file__).parent / "oriented"
SUFFIX = ".tmpl"
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def placeholders(name: str) -> dict[str, str]:
    """What each placeholder of the template becomes for the plugin ``name``."""
    return {
        "{{name}}": name,
        "{{package}}": f"kd_{name}",
        "{{dist}}": "kd-" + name.replace("_", "-"),
    }


def render(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def new_plugin(name: str, folder: Path, force: bool = False, oriented: bool = False) -> Path:
    """Write the package ``kd-NAME`` into ``folder``; return its root (``folder/kd-NAME``).
    An existing non-empty root is refused unless ``force``. ``oriented``: rotated ROIs and an
    oriented provider instead of axis-aligned boxes."""
    if not NAME.match(name) or keyword.iskeyword(name) or name.endswith("_"):
        raise KdError(
            f"new-plugin: {name!r} is not a plugin name — use lower snake_case starting with a "
            "letter, e.g. 'molars' or 'hand_wrist'"
        )
    values = placeholders(name)
    root = Path(folder) / values["{{dist}}"]
    if root.exists() and any(root.iterdir()) and not force:
        raise KdError(f"new-plugin: {root} exists and is not empty (--force writes over it)")
    files = {p.relative_to(TEMPLATE).as_posix(): p for p in TEMPLATE.rglob(f"*{SUFFIX}")}
    if oriented:
        files.update({p.relative_to(ORIENTED).as_posix(): p for p in ORIENTED.rglob(f"*{SUFFIX}")})
    for relative, source in sorted(files.items()):
        target = root / render(relative, values)[: -len(SUFFIX)]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(source.read_text(encoding="utf-8"), values), encoding="utf-8")
    return root


def new_plugin_command(
    name: Annotated[str, typer.Argument(help="Plugin name, lower snake_case (e.g. molars).")],
    folder: Annotated[
        Path, typer.Option("--dir", help="Where to write the package folder kd-NAME.")
    ] = Path("."),
    force: Annotated[bool, typer.Option(help="Write into an existing kd-NAME folder.")] = False,
    oriented: Annotated[
        bool, typer.Option(help="Rotated ROIs in the data and an oriented ROI provider.")
    ] = False,
) -> None:
    """Write a new plugin package kd-NAME: a task with tiny synthetic data, a loss, an ROI
    provider, a sub-command, a quick-start recipe and tests."""
    root = new_plugin(name, folder, force, oriented)
    typer.echo(f"wrote {root}")
    typer.echo(f"next: pip install -e {root}  &&  kd run {root}/recipes/{name}-quick.toml")
