"""Plugin discovery: fresh plugin managers, a throwaway installed plugin, blocking, bad hooks."""

import os

import numpy as np
import pytest
import torch

from kdtoolkit import LossTerm, RoiProvider, RoiResult, Task, hookimpl
from kdtoolkit.errors import KdError
from kdtoolkit.plugins import manager as plugin
from kdtoolkit.testing import fresh_plugin_manager as fresh_manager
from kdtoolkit.testing import install_plugin
from tests.conftest import kd


class ZeroLoss(LossTerm):
    def forward(self, ctx):
        return ctx.logits.sum() * 0


class CentreBox(RoiProvider):
    def provide(self, request):
        n = len(request.predict)
        return RoiResult(np.tile([8.0, 8.0, 24.0, 24.0], (n, 1)), np.zeros(n), np.ones(n, bool))


class TinyNet(torch.nn.Module):
    def __init__(self, num_classes, in_chans, width: int = 4):
        super().__init__()
        self.num_features = width


class ThrowawayPlugin:
    @hookimpl
    def kd_register_losses(self, registry):
        registry.register("zero_loss", ZeroLoss)


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
    line = next(x for x in result.stdout.splitlines() if "input_gradient" in x)
    assert "loss" in line and "kdtoolkit" in line
    blocked = kd("plugins", env={**os.environ, "KD_DISABLE_PLUGINS": "kdtoolkit.builtin.timm"})
    assert blocked.returncode == 0, blocked.stderr
    assert "timm model name" not in blocked.stdout and "convnext_attn" in blocked.stdout


def test_duplicate_component_across_plugins_names_both():
    class Again:
        @hookimpl
        def kd_register_losses(self, registry):
            registry.register("zero_loss", ZeroLoss)

    with pytest.raises(KdError) as e:
        plugin.collect_registries(fresh_manager(ThrowawayPlugin(), Again()))
    assert "ThrowawayPlugin" in str(e.value) and "Again" in str(e.value)


DUMMY = """
from kdtoolkit import hookimpl
from kdtoolkit.plugins.loss import LossTerm

class DummyLoss(LossTerm):
    def __init__(self, scale: float = 1.0):
        super().__init__()

@hookimpl
def kd_register_losses(registry):
    registry.register("dummy_loss", DummyLoss)
"""


def _install_throwaway(tmp_path):
    """A plugin distribution 'kd-dummy' with an entry point 'kd_dummy', on PYTHONPATH."""
    return install_plugin(tmp_path, "kd_dummy", DUMMY, dist="kd-dummy", version="0.3")


def test_installed_plugin_is_discovered_and_listed(tmp_path):
    env = _install_throwaway(tmp_path)
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "dummy_loss" in x)
    assert "kd-dummy 0.3" in line
    assert "sos" in result.stdout  # the SOS plugin is installed too


def test_installed_plugin_can_be_blocked(tmp_path):
    env = _install_throwaway(tmp_path)
    env["KD_DISABLE_PLUGINS"] = "kd_dummy"
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert "dummy_loss" not in result.stdout


def test_installed_plugin_with_bad_hook_is_switched_off_and_kd_still_works(tmp_path, tiny_recipe):
    """One plugin with a misspelt hook never takes ``kd`` down: every command works and
    prints one warning naming the plugin, the hook it probably meant and KD_DISABLE_PLUGINS;
    ``kd plugins`` lists it as broken; a recipe naming one of its components says why."""
    env = _install_throwaway(tmp_path)
    init = tmp_path / "kd_dummy.py"
    init.write_text(init.read_text().replace("def kd_register_losses", "def kd_register_loss"))
    warning = (
        "warning: plugin 'kd_dummy' is switched off: it declares unknown hook kd_register_loss "
        "(did you mean 'kd_register_losses'?); fix it, or hide it with KD_DISABLE_PLUGINS=kd_dummy"
    )
    for args in (["--help"], ["plugins"], ["validate", str(tiny_recipe)]):
        result = kd(*args, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip().splitlines() == [warning], args
        if args == ["plugins"]:
            listing = result.stdout
    assert "broken" in listing and "kd_dummy" in listing
    assert "dummy_loss" not in listing
    uses_it = kd("validate", str(tiny_recipe), "--set", "loss.0.name=dummy_loss", env=env)
    assert uses_it.returncode == 2
    assert "unknown loss 'dummy_loss'" in uses_it.stderr
    assert "plugin 'kd_dummy' is switched off: it declares unknown hook" in uses_it.stderr
    assert "Traceback" not in uses_it.stderr
    env["KD_DISABLE_PLUGINS"] = "kd_dummy"
    assert kd("plugins", env=env).stderr == ""


def test_installed_plugin_that_fails_to_import_is_switched_off(tmp_path):
    env = _install_throwaway(tmp_path)
    (tmp_path / "kd_dummy.py").write_text("import not_a_module_anywhere\n")
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "warning: plugin 'kd_dummy' is switched off: it cannot be imported "
        "(ModuleNotFoundError: No module named 'not_a_module_anywhere'); fix it, or hide it "
        "with KD_DISABLE_PLUGINS=kd_dummy"
    ]
    ce = next(line for line in result.stdout.splitlines() if "│ ce " in line)
    assert "kdtoolkit" in ce  # the built-ins are all there


def test_installed_plugin_with_a_bad_hook_signature_is_switched_off_whole(tmp_path):
    """A hook with the right name but parameters the spec lacks: the plugin is switched off
    entirely, none of its hooks is called (pluggy attaches some before it rejects one)."""
    env = _install_throwaway(tmp_path)
    source = (tmp_path / "kd_dummy.py").read_text()
    bad = "\n@hookimpl\ndef kd_register_tasks(registry, nonsense):\n    pass\n"
    (tmp_path / "kd_dummy.py").write_text(source + bad)
    result = kd("plugins", env=env)
    assert result.returncode == 0, result.stderr
    assert "plugin 'kd_dummy' is switched off: it has an invalid hook" in result.stderr
    assert "kd_register_tasks" in result.stderr
    assert "dummy_loss" not in result.stdout.split("broken")[0]


def test_every_hook_on_a_fresh_manager():
    import typer
    from typer.testing import CliRunner

    class Full:
        @hookimpl
        def kd_register_backbones(self, registry):
            registry.register("tiny_net", TinyNet)

        @hookimpl
        def kd_register_roi_providers(self, registry):
            registry.register("centre_box", CentreBox)

        @hookimpl
        def kd_register_tasks(self, registry):
            registry.register("molars", Task("molars", ("a", "b")))

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


def test_a_loss_registered_as_a_backbone_stops_kd_plugins_naming_it(tmp_path):
    source = DUMMY.replace("kd_register_losses", "kd_register_backbones").replace(
        '"dummy_loss"', '"dummy_net"'
    )
    env = install_plugin(tmp_path, "kd_dummy", source, dist="kd-dummy", version="0.3")
    result = kd("plugins", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "backbone 'dummy_net' from plugin 'kd-dummy 0.3'" in result.stderr
    assert "expected a backbone factory, got class DummyLoss" in result.stderr


def test_use_plugins_takes_an_installed_plugin_again():
    """Passing a plugin that is also installed registers it once (no pluggy error)."""
    import kd_sos.plugin

    from kdtoolkit.testing import use_plugins

    with use_plugins(kd_sos.plugin) as regs:
        assert "sos" in regs.tasks
        assert regs.tasks.owner("sos").startswith("kd-sos")
