"""Helpers for testing kdtoolkit plugins (and kdtoolkit itself).

- ``fresh_plugin_manager(*plugins, builtins=False)``: a plugin manager with only the plugins
  given (objects or modules with ``@hookimpl`` functions), optionally plus the built-ins;
- ``fresh_registries(*plugins, builtins=False)``: the registries those plugins fill;
- ``install_plugin(folder, module, source, dist="kd-demo", version="0.1")``: an installed-looking
  plugin distribution (module + dist-info with its ``kdtoolkit`` entry point) in ``folder``;
  returns the environment under which a ``kd`` subprocess discovers it;
- ``kd_cli(*args, env=None, cwd=None)``: run ``kd`` as a user would, in a subprocess.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy

from kdtoolkit.plugins import hookspec
from kdtoolkit.plugins.manager import (
    BUILTIN_PLUGINS,
    GROUP,
    Registries,
    check_plugins,
    collect_registries,
)


def fresh_plugin_manager(*plugins: object, builtins: bool = False) -> pluggy.PluginManager:
    """A plugin manager with the hook specs and only ``plugins`` (and the built-ins when
    ``builtins``); no installed plugin is loaded. Misspelt hooks are rejected."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspec)
    if builtins:
        for name in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
    check_plugins(pm)
    return pm


def fresh_registries(*plugins: object, builtins: bool = False) -> Registries:
    """The registries filled by ``plugins`` alone (plus the built-ins when ``builtins``)."""
    return collect_registries(fresh_plugin_manager(*plugins, builtins=builtins))


def install_plugin(
    folder: Path, module: str, source: str, dist: str = "kd-demo", version: str = "0.1"
) -> dict[str, str]:
    """Write ``module`` (``source``, dedented) and a dist-info with a ``kdtoolkit`` entry point
    into ``folder``; return ``os.environ`` with ``folder`` on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{module} = {module}\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def kd_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ``kd ARGS`` in a subprocess (as a user would); output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "kdtoolkit.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
