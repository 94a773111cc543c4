"""``kd new-plugin``: the template renders into a package that is discovered, passes its own
tests and runs its quick-start recipe (installed-looking, on ``PYTHONPATH``, in subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdtoolkit.cli import app
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.manager import GROUP
from kdtoolkit.scaffold import ORIENTED, SUFFIX, TEMPLATE, new_plugin
from kdtoolkit.testing import kd_cli

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "README.md",
    "pyproject.toml",
    "kd_molars/__init__.py",
    "kd_molars/data.py",
    "kd_molars/plugin.py",
    "kd_molars/roi.py",
    "recipes/molars-quick.toml",
    "tests/test_molars.py",
}


def run_generated_tests(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The generated plugin's own tests, run in its folder; they must pass."""
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    return tests


def test_template_is_package_data_and_not_collected():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for folder in (TEMPLATE, ORIENTED):
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert files and all(p.name.endswith(SUFFIX) for p in files)
        data = config["tool"]["setuptools"]["package-data"]["kdtoolkit"]
        assert f"scaffold/{folder.name}/**/*" in data


def test_new_plugin_renders_every_file(tmp_path):
    root = new_plugin("molars", tmp_path)
    assert root == tmp_path / "kd-molars"
    written = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert written == FILES
    for name in written:
        text = (root / name).read_text()
        assert "{{" not in text, name
        if name.endswith(".py"):
            compile(text, name, "exec")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["name"] == "kd-molars"
    assert project["entry-points"][GROUP] == {"molars": "kd_molars.plugin"}
    plugin = (root / "kd_molars/plugin.py").read_text()
    assert "from kdtoolkit import" in plugin and "from kdtoolkit." not in plugin


def test_component_names_follow_the_documented_convention(tmp_path):
    """The task is the plugin's name, every other component is prefixed with it
    (docs/plugins.md, "Component names")."""
    assert "prefixed with the plugin's name" in " ".join(
        (ROOT / "docs/plugins.md").read_text().split()
    )
    for oriented in (False, True):
        root = new_plugin("molars", tmp_path / str(oriented), oriented=oriented)
        sys.path[:0] = [str(root)]
        try:
            import kd_molars.plugin as plugin

            from kdtoolkit.testing import fresh_registries

            regs = fresh_registries(plugin)
        finally:
            sys.path.remove(str(root))
            for name in [m for m in sys.modules if m.startswith("kd_molars")]:
                del sys.modules[name]
        assert [n for n in regs.tasks if n.startswith("molars")] == ["molars"]
        own = [
            n for kind in (regs.losses, regs.roi_providers) for n in kind if n.startswith("molars")
        ]
        assert sorted(own) == sorted(
            ["molars_logit_norm", "molars_principal_axis" if oriented else "molars_mean_box"]
        )


def test_oriented_plugin_has_rotated_rois_and_an_oriented_provider(tmp_path):
    root = new_plugin("knee", tmp_path, oriented=True)
    written = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert written == {f.replace("molars", "knee") for f in FILES}
    recipe = tomllib.loads((root / "recipes/knee-quick.toml").read_text())
    assert recipe["roi"]["provider"] == "knee_principal_axis"
    assert recipe["data"]["crop_size"] == [16, 32]
    roi = (root / "kd_knee/roi.py").read_text()
    assert "oriented = True" in roi and "from kdtoolkit import" in roi
    assert "angle" in (root / "kd_knee/data.py").read_text()


@pytest.mark.slow
def test_oriented_plugin_passes_its_own_tests(tmp_path):
    """The generated tests (rotated boxes recovered by the provider, a tiny run) pass as
    written, with the plugin not installed."""
    root = new_plugin("knee", tmp_path, oriented=True)
    path = [str(root), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    tests = run_generated_tests(root, env)
    assert "5 passed" in tests.stdout


def test_new_plugin_refuses_bad_names_and_a_full_folder(tmp_path):
    for bad in ("Molars", "2molars", "mo-lars", "class", ""):
        with pytest.raises(KdError, match="not a plugin name"):
            new_plugin(bad, tmp_path)
    new_plugin("hand_wrist", tmp_path)
    assert (tmp_path / "kd-hand-wrist/kd_hand_wrist/plugin.py").exists()
    with pytest.raises(KdError, match="not empty"):
        new_plugin("hand_wrist", tmp_path)
    new_plugin("hand_wrist", tmp_path, force=True)


def test_cli_command_writes_the_package(tmp_path):
    result = CliRunner().invoke(app, ["new-plugin", "molars", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "kd-molars/recipes/molars-quick.toml").exists()


def installed_env(tmp_path: Path, root: Path) -> dict[str, str]:
    """``root`` importable, with a dist-info declaring its entry point, as ``pip`` would."""
    site = tmp_path / "site"
    info = site / "kd_molars-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kd-molars\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nmolars = kd_molars.plugin\n")
    path = [str(site), str(root), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


@pytest.mark.slow
def test_generated_plugin_is_listed_passes_its_tests_and_runs(tmp_path):
    root = new_plugin("molars", tmp_path)
    env = installed_env(tmp_path, root)
    listed = kd_cli("plugins", env=env)
    assert listed.returncode == 0, listed.stderr
    for name in ("molars_logit_norm", "molars_mean_box", "kd-molars"):
        assert name in listed.stdout
    helped = kd_cli("molars", "stages", env=env)
    assert helped.returncode == 0 and "stage_3" in helped.stdout, helped.stderr
    run_generated_tests(root, env)
    tiny = ["--set", "task.n=12", "--set", "teacher.epochs=1", "--set", "student.epochs=1"]
    ran = kd_cli("run", "recipes/molars-quick.toml", "--quiet", *tiny, env=env, cwd=root)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    assert (root / "runs/molars-quick/report.md").exists()
