"""Plugin discovery (pluggy, entry-point group ``kdtoolkit``) and the component registries."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import NamedTuple

import pluggy

from kdtoolkit.config.option import OptionInfo
from kdtoolkit.errors import KdError, close_matches, suggestion
from kdtoolkit.plugins import hookspec
from kdtoolkit.plugins.registry import Registry, UnknownComponent

GROUP = "kdtoolkit"
BUILTIN_PLUGINS = (
    "kdtoolkit.builtin.timm",
    "kdtoolkit.builtin.convnext_attn",
    "kdtoolkit.builtin.roi_zoom",
    "kdtoolkit.builtin.losses",
    "kdtoolkit.builtin.input_gradient",
    "kdtoolkit.builtin.manual",
    "kdtoolkit.builtin.yolo.provider",
    "kdtoolkit.builtin.yolo.obb",
    "kdtoolkit.builtin.csv_logger",
    "kdtoolkit.builtin.tensorboard_logger",
    "kdtoolkit.builtin.mlflow_logger",
)
"""The built-in plugin modules, registered like installed plugins (and blocked the same way,
by module name, in ``KD_DISABLE_PLUGINS``)."""


@dataclass
class Registries:
    """One registry per component kind (registered names and resolvers, see ``Registry``)."""

    backbones: Registry
    roi_providers: Registry
    losses: Registry
    tasks: Registry
    loggers: Registry

    def kinds(self) -> dict[str, Registry]:
        return {
            "backbone": self.backbones,
            "roi_provider": self.roi_providers,
            "loss": self.losses,
            "task": self.tasks,
            "logger": self.loggers,
        }


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``KD_DISABLE_PLUGINS`` (comma separated)."""
    return {p.strip() for p in os.environ.get("KD_DISABLE_PLUGINS", "").split(",") if p.strip()}


class KdPluginManager(pluggy.PluginManager):
    """pluggy's manager with what kdtoolkit keeps about installed plugins: ``versions``
    (plugin name → 'distribution version') and ``broken`` (plugin name → why it is switched
    off: it failed to import, or declares a hook that matches none)."""

    def __init__(self) -> None:
        super().__init__(GROUP)
        self.versions: dict[str, str] = {}
        self.broken: dict[str, str] = {}


def unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """The registered ``plugin``'s hook implementations that match no hook spec, each with a
    'did you mean' for the closest hook."""
    specs = [name for name in dir(hookspec) if name.startswith("kd_")]
    return [
        f"{caller.name}{suggestion(caller.name, close_matches(caller.name, specs, n=1))}"
        for caller in pm.get_hookcallers(plugin) or []
        if not caller.has_spec()
    ]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_installed(pm: KdPluginManager) -> None:
    """Register every installed plugin of the ``kdtoolkit`` entry-point group that is not
    blocked. One that fails to import or declares an unknown hook is switched off (recorded
    in ``pm.broken``), so it never takes the others, or ``kd`` itself, down."""
    for ep in metadata.entry_points(group=GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # any import-time failure of third-party code
            pm.broken[ep.name] = f"cannot be imported ({_first_line(e)})"
            continue
        try:
            pm.register(plugin, name=ep.name)
        except (pluggy.PluginValidationError, ValueError) as e:
            if pm.has_plugin(ep.name):  # pluggy keeps the hooks it attached before the bad one
                pm.unregister(name=ep.name)
            pm.broken[ep.name] = f"has an invalid hook ({_first_line(e)})"
            continue
        if unknown := unknown_hooks(pm, plugin):
            pm.unregister(plugin)
            pm.broken[ep.name] = f"declares unknown hook {', '.join(unknown)}"
            continue
        if ep.dist is not None:
            pm.versions[ep.name] = f"{ep.dist.name} {ep.dist.version}"


def broken_message(name: str, why: str) -> str:
    """The one line that reports a switched-off plugin."""
    return (
        f"plugin {name!r} is switched off: it {why}; fix it, or hide it with "
        f"KD_DISABLE_PLUGINS={name}"
    )


def make_plugin_manager(load_entry_points: bool = True) -> KdPluginManager:
    """A plugin manager with the hookspecs, the built-in plugins and (optionally) every
    installed plugin of the ``kdtoolkit`` entry-point group, minus the disabled ones and the
    broken ones (``load_installed``)."""
    pm = KdPluginManager()
    pm.add_hookspecs(hookspec)
    blocked = disabled_plugins()
    for name in blocked:
        pm.set_blocked(name)
    for module_name in BUILTIN_PLUGINS:
        if module_name not in blocked:
            pm.register(importlib.import_module(module_name), name=module_name)
    if load_entry_points:
        load_installed(pm)
    check_plugins(pm)
    return pm


def check_plugins(pm: pluggy.PluginManager) -> None:
    """Reject hook implementations that match no hook (a misspelt ``kd_register_*``)."""
    for plugin in pm.get_plugins():
        if unknown := unknown_hooks(pm, plugin):
            raise KdError(
                f"plugin {pm.get_name(plugin)!r} declares unknown hook {', '.join(unknown)}"
            )


def broken_plugins() -> dict[str, str]:
    """``{plugin name: why}`` of the installed plugins that are switched off."""
    return dict(getattr(plugin_manager(), "broken", {}))


def plugin_label(pm: pluggy.PluginManager, plugin: object) -> str:
    """'name version' of a plugin: its distribution's version, or kdtoolkit's for built-ins."""
    name = pm.get_name(plugin) or repr(plugin)
    versions = getattr(pm, "versions", {})
    if name in versions:
        return versions[name]
    if name in BUILTIN_PLUGINS:
        return f"kdtoolkit {metadata.version('kdtoolkit')}"
    return name


def collect_registries(pm: pluggy.PluginManager) -> Registries:
    """Call every ``kd_register_*`` hook, one plugin at a time, so each component knows its
    plugin; each registry checks the kind of what it is given (``kdtoolkit.plugins.kinds``,
    which imports torch: the component base classes are torch modules)."""
    from kdtoolkit.plugins.kinds import CHECKS

    regs = Registries(
        backbones=Registry("backbone", CHECKS["backbone"]),
        roi_providers=Registry("ROI provider", CHECKS["roi_provider"]),
        losses=Registry("loss", CHECKS["loss"]),
        tasks=Registry("task", CHECKS["task"]),
        loggers=Registry("logger", CHECKS["logger"]),
    )
    hooks = {
        "kd_register_backbones": regs.backbones,
        "kd_register_roi_providers": regs.roi_providers,
        "kd_register_losses": regs.losses,
        "kd_register_tasks": regs.tasks,
        "kd_register_loggers": regs.loggers,
    }
    for hook_name, registry in hooks.items():
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            with registry.owned_by(plugin_label(pm, impl.plugin)):
                impl.function(registry=registry)
    return regs


@cache
def installed_plugins() -> KdPluginManager:
    """The installed plugins alone, not the built-ins and with nothing registered yet: what
    ``kd`` needs to add plugins' commands and warn about broken plugins without importing the
    training stack (``kd --help``)."""
    pm = KdPluginManager()
    pm.add_hookspecs(hookspec)
    for name in disabled_plugins():
        pm.set_blocked(name)
    load_installed(pm)
    return pm


@cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built on first use)."""
    return make_plugin_manager()


@cache
def registries() -> Registries:
    """The process-wide registries, filled by every plugin on first use."""
    return collect_registries(plugin_manager())


class Component(NamedTuple):
    """One row of ``list_components``: a registered component, or a resolver (``resolver``
    True, ``name`` then says what it resolves, e.g. "any timm model name (1371 names)")."""

    kind: str
    name: str
    plugin: str
    resolver: bool = False


def list_components(kind: str | None = None, pattern: str = "*") -> list[Component]:
    """Registered components (and resolvers) by kind, like ``timm.list_models(pattern)``:
    ``kind`` one of backbone, roi_provider, loss, task, logger (None: all); ``pattern`` a glob
    on the name (resolvers are listed with the ``*`` pattern only). What ``kd plugins`` shows."""
    kinds = registries().kinds()
    if kind is not None and kind not in kinds:
        raise KdError(f"unknown component kind {kind!r}; one of {', '.join(kinds)}")
    rows = []
    for name_of_kind, registry in kinds.items():
        if kind is not None and name_of_kind != kind:
            continue
        rows += [Component(name_of_kind, n, registry.owner(n)) for n in registry.list(pattern)]
        if pattern == "*":
            rows += [
                Component(name_of_kind, r.describe, r.owner, True) for r in registry.resolvers()
            ]
    return rows


class ComponentOptions(NamedTuple):
    """The options of one component (``kd plugins --options NAME``)."""

    kind: str
    name: str
    plugin: str
    options: list[OptionInfo]


def options_of(name: str, regs: Registries | None = None) -> list[ComponentOptions]:
    """The declared options of every component called ``name`` (one per kind that has it),
    the same declarations recipes are validated against; ``UnknownComponent`` when none."""
    from kdtoolkit.plugins.kinds import component_options

    regs = regs if regs is not None else registries()
    out = [
        ComponentOptions(kind, name, registry.owner(name), component_options(registry[name], kind))
        for kind, registry in regs.kinds().items()
        if name in registry
    ]
    if not out:
        names = [n for registry in regs.kinds().values() for n in registry]
        raise UnknownComponent(
            f"unknown component {name!r}{suggestion(name, names)}; run `kd plugins` to list them"
        )
    return out
