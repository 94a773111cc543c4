"""Plugin discovery: fresh plugin managers, a throwaway installed plugin, blocking, bad hooks."""

import os
import textwrap

import pluggy
import pytest

from kdtoolkit import hookimpl
from kdtoolkit.errors import KdError
from kdtoolkit.plugins import hookspec
from kdtoolkit.plugins import manager as plugin
from tests.conftest import kd


class ThrowawayPlugin:
    @hookimpl
    def kd_register_losses(self, registry):
        registry.register("zero_loss", object)


def fresh_manager(*plugins):
    pm = pluggy.PluginManager("kdtoolkit")
    pm.add_hookspecs(hookspec)
    for p in plugins:
        pm.register(p, name=type(p).__name__)
    return pm


def test_register_on_fresh_manager():
    regs = plugin.collect_registries(fresh_manager(ThrowawayPlugin()))
    assert regs.losses.list() == ["zero_loss"]
    assert regs.losses.owner("zero_loss") == "ThrowawayPlugin"
    assert len(regs.backbones) == 0


def test_builtins_are_plugins_through_the_same_hooks():
    pm = plugin.make_plugin_manager(load_entry_points=False)
    regs = plugin.collect_registries(pm)
    assert {"ce", "kl", "attention_mse"} <= set(regs.losses.list())
    assert "manual" in regs.roi_providers
    assert "convnext_attn" in regs.backbones
    assert regs.losses.owner("ce").startswith("kdtoolkit ")


def test_misspelt_hook_implementation_is_rejected():
    class Misspelt:
        @hookimpl
        def kd_register_loss(self, registry):  # missing the final "es"
            pass

    with pytest.raises(KdError, match="kd_register_loss"):
        plugin.check_plugins(fresh_manager(Misspelt()))


def test_blocked_builtin_plugin(monkeypatch):
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kdtoolkit.builtin.losses")
    regs = plugin.collect_registries(plugin.make_plugin_manager(load_entry_points=False))
    assert "ce" not in regs.losses
    assert "roi_box" in regs.losses  # registered by kdtoolkit.builtin.roi_zoom
    assert "manual" in regs.roi_providers


def test_every_builtin_module_is_a_plugin_module():
    import importlib

    for name in plugin.BUILTIN_PLUGINS:
        module = importlib.import_module(name)
        hooks = [n for n in vars(module) if n.startswith("kd_register_")]
        assert hooks, f"{name} registers nothing"


def test_list_components_includes_resolvers():
    rows = plugin.list_components()
    assert ("loss", "ce") in {(r.kind, r.name) for r in rows if not r.resolver}
    (timm_row,) = [r for r in rows if r.resolver]
    assert timm_row.kind == "backbone" and "timm model name" in timm_row.name


def test_kd_plugins_lists_resolvers_and_honours_blocking():
    result = kd("plugins")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "timm model name" in x)
    assert "backbone" in line and "kdtoolkit" in line
    blocked = kd("plugins", env={**os.environ, "KD_DISABLE_PLUGINS": "kdtoolkit.builtin.timm"})
    assert blocked.returncode == 0, blocked.stderr
    assert "timm model name" not in blocked.stdout and "convnext_attn" in blocked.stdout


def test_duplicate_component_across_plugins_names_both():
    class Again:
        @hookimpl
        def kd_register_losses(self, registry):
            registry.register("zero_loss", object)

    with pytest.raises(KdError) as e:
        plugin.collect_registries(fresh_manager(ThrowawayPlugin(), Again()))
    assert "ThrowawayPlugin" in str(e.value) and "Again" in str(e.value)


def _install_throwaway(tmp_path):
    """A plugin distribution 'kd-dummy' with an entry point, installed on PYTHONPATH."""
    pkg = tmp_path / "kd_dummy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from kdtoolkit import hookimpl
            from kdtoolkit.plugins.loss import LossTerm

            class DummyLoss(LossTerm):
                def __init__(self, scale: float = 1.0):
                    super().__init__()

            @hookimpl
            def kd_register_losses(registry):
                registry.register("dummy_loss", DummyLoss)
            """
        )
    )
    info = tmp_path / "kd_dummy-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-dummy\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[kdtoolkit]\ndummy = kd_dummy\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return env


def test_installed_plugin_is_discovered_and_listed(tmp_path):
    env = _install_throwaway(tmp_path)
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "dummy_loss" in x)
    assert "kd-dummy 0.3" in line
    assert "sos" in result.stdout  # the SOS plugin is installed too


def test_installed_plugin_can_be_blocked(tmp_path):
    env = _install_throwaway(tmp_path)
    env["KD_DISABLE_PLUGINS"] = "dummy"
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert "dummy_loss" not in result.stdout


def test_installed_plugin_with_bad_hook_is_a_one_line_error(tmp_path):
    env = _install_throwaway(tmp_path)
    init = tmp_path / "kd_dummy" / "__init__.py"
    init.write_text(init.read_text().replace("def kd_register_losses", "def kd_register_lossez"))
    result = kd("plugins", env=env)
    assert result.returncode == 2
    assert "kd_register_lossez" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_hook_on_a_fresh_manager():
    import typer
    from typer.testing import CliRunner

    class Full:
        @hookimpl
        def kd_register_backbones(self, registry):
            registry.register("tiny_net", object)

        @hookimpl
        def kd_register_roi_providers(self, registry):
            registry.register("centre_box", object)

        @hookimpl
        def kd_register_tasks(self, registry):
            registry.register("molars", object)

        @hookimpl
        def kd_register_commands(self, app):
            sub = typer.Typer()

            @sub.command()
            def hello(name: str):
                print(f"hello {name}")

            app.add_typer(sub, name="molars")

    pm = fresh_manager(Full())
    regs = plugin.collect_registries(pm)
    assert regs.backbones.list() == ["tiny_net"]
    assert regs.roi_providers.list() == ["centre_box"]
    assert regs.tasks.list() == ["molars"]
    app = typer.Typer()

    @app.callback()
    def main():
        pass

    pm.hook.kd_register_commands(app=app)
    result = CliRunner().invoke(app, ["molars", "hello", "world"])
    assert result.exit_code == 0 and "hello world" in result.stdout
