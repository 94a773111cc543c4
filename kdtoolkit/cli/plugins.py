"""``kd plugins``: the registered components and their options."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()


def plugins(
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            metavar="NAME",
            help="Print the options of component NAME: types, bounds and defaults.",
        ),
    ] = None,
) -> None:
    """List every registered component by kind, with the plugin that provides it, and the
    resolvers that accept whole families of names (e.g. any timm model name); with
    ``--options NAME``, the options a recipe may give that component."""
    from kdtoolkit.plugins.manager import broken_plugins, list_components, options_of

    if options is not None:
        for c in options_of(options):
            table = Table(title=f"{c.kind} {c.name!r} ({c.plugin})")
            for column in ("option", "type", "bounds", "default"):
                table.add_column(column)
            for o in c.options:
                table.add_row(o.name, o.type, o.bounds, o.default)
            console.print(table if c.options else f"{c.kind} {c.name!r} ({c.plugin}): no options")
        return
    table = Table(title="kdtoolkit components")
    for column in ("kind", "name", "plugin"):
        table.add_column(column)
    for c in list_components():
        table.add_row(c.kind, f"<{c.name}>" if c.resolver else c.name, c.plugin)
    for name, why in broken_plugins().items():
        table.add_row("[red]broken[/]", escape(name), escape(f"switched off: it {why}"))
    console.print(table)
