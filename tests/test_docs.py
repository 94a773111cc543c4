"""Every hook is documented and tested (the datasette rule); README and CI agree."""

import dataclasses
import re
from pathlib import Path

import pytest

from kdtoolkit.plugins import hookspec

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in vars(hookspec) if name.startswith("kd_"))


def test_there_are_hooks():
    """HOOKS is every hook spec pluggy sees (a ``kd_*`` function without the spec marker, or a
    spec under another name, would be missed by the documentation and test rules below)."""
    import pluggy

    pm = pluggy.PluginManager("kdtoolkit")
    pm.add_hookspecs(hookspec)
    specs = sorted(name for name in vars(pm.hook) if not name.startswith("_"))
    assert specs == HOOKS and "kd_register_losses" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}(" in docs, f"{hook} has no section in docs/plugins.md"
    assert getattr(hookspec, hook).__doc__, f"{hook} has no docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook):
    """Some test implements the hook in a throwaway plugin (``@hookimpl`` then ``def hook(``),
    not merely mentions its name."""
    tests = [p for p in ROOT.glob("tests/test_*.py") if p.name != "test_docs.py"]
    tests += list(ROOT.glob("plugins/*/tests/test_*.py"))
    implemented = re.compile(rf"@hookimpl\s*\n\s*def {hook}\(")
    assert any(implemented.search(p.read_text()) for p in tests), f"no test implements {hook}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1).splitlines()
    assert len(commands) == 2, "the README opens with exactly two set-up commands"
    assert "kd run" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


# ------------------------------------------------------------------ docs/plugins.md vs the code

PLUGINS_MD = ROOT / "docs" / "plugins.md"


def sections(text: str) -> dict[str, str]:
    """Heading line (without the #s) → its text up to the next heading (fences respected)."""
    out: dict[str, str] = {}
    heading, lines, fenced = "", [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            out[heading] = "\n".join(lines)
            heading, lines = line.lstrip("#").strip(), []
        else:
            lines.append(line)
    out[heading] = "\n".join(lines)
    return out


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def public_names(cls: type) -> set[str]:
    names = {n for n in vars(cls) if not n.startswith("_")}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def documented_types():
    from kdtoolkit.config.option import Range
    from kdtoolkit.data.manifest import Manifest, Sample
    from kdtoolkit.plugins.logger import RunInfo, RunLogger
    from kdtoolkit.plugins.loss import CompositeLoss, LossContext, LossTerm
    from kdtoolkit.plugins.registry import PluginError, Registry
    from kdtoolkit.plugins.roi import RoiProvider, RoiRequest, RoiResult
    from kdtoolkit.plugins.task import Task

    plugin_error = {"kind", "name", "plugin", "problem", "where", "at"}
    composite = {"names", "weights", "terms", "plugins", "where", "needs_teacher", "setup"}
    return {
        "`RoiRequest`": public_names(RoiRequest),
        "`Sample` and `Manifest`": public_names(Sample) - {"slice"} | public_names(Manifest),
        "`RoiResult`": public_names(RoiResult),
        "`RoiProvider`": public_names(RoiProvider),
        "`LossContext`": public_names(LossContext),
        "`LossTerm`": public_names(LossTerm) | {"forward"},
        "`CompositeLoss`": composite | {n for n in vars(CompositeLoss) if n[0] != "_"},
        "`Task`": public_names(Task),
        "`Range`": public_names(Range),
        "`Registry`": public_names(Registry) | {"kind", "check"},
        "`RunLogger`": public_names(RunLogger),
        "`RunInfo`": public_names(RunInfo),
        "`KdError` and `PluginError`": plugin_error | (public_names(PluginError) - {"wrap"}),
    }


@pytest.mark.parametrize("section", list(documented_types()))
def test_every_field_and_attribute_is_documented(section):
    text = sections(PLUGINS_MD.read_text())[section]
    missing = sorted(n for n in documented_types()[section] if not re.search(rf"[`.]{n}\b", text))
    assert not missing, f"docs/plugins.md, {section}: not documented: {missing}"


def test_every_testing_helper_is_documented():
    import inspect

    import kdtoolkit.testing as testing

    text = sections(PLUGINS_MD.read_text())["Testing a plugin"]
    helpers = [
        name
        for name, obj in vars(testing).items()
        if not name.startswith("_")
        and inspect.isfunction(obj)
        and obj.__module__ == testing.__name__
    ]
    assert "run_tiny_recipe" in helpers
    assert not [h for h in helpers if f"`{h}(" not in text]


def test_every_python_block_compiles_and_imports_resolve():
    blocks = code_blocks(PLUGINS_MD.read_text(), "python")
    assert len(blocks) >= 4
    for block in blocks:
        compile(block, "docs/plugins.md", "exec")
    exec(blocks[0], {})  # the facade import names what a plugin needs
    exec(blocks[1], {})  # the Range example: gt, ge, lt, le


def test_the_example_plugin_runs(tmp_path):
    import types

    import typer
    from typer.testing import CliRunner

    from kdtoolkit.plugins.loss import CompositeLoss
    from kdtoolkit.plugins.manager import options_of
    from kdtoolkit.plugins.roi import run_provider
    from kdtoolkit.testing import fake_loss_context, fake_roi_request, fresh_registries

    source = next(b for b in code_blocks(PLUGINS_MD.read_text(), "python") if "kd_molars" in b)
    module = types.ModuleType("kd_molars_plugin")
    exec(compile(source, "docs/plugins.md", "exec"), module.__dict__)
    regs = fresh_registries(module)
    assert regs.tasks["third_molar"].crop_aspect == 1.0
    assert regs.losses.owner("logit_norm") == "kd_molars_plugin"
    loss = CompositeLoss.from_registry(regs.losses, [("logit_norm", 1.0, {"scale": 0.5})])
    total, parts = loss(fake_loss_context(batch=4, classes=8))
    total.backward()
    assert parts["logit_norm"] > 0
    request = fake_roi_request(tmp_path, n=6)
    provider = regs.roi_providers["mean_box"](margin=0.1)
    result = run_provider(provider, request, "mean_box", "kd-molars 0.1.0")
    assert (
        result.boxes.shape == (6, 4)
        and result.found.all()
        and regs.roi_providers["mean_box"].learned
    )
    assert request.lines and "4 training boxes" in request.lines[0]
    (margin,) = options_of("mean_box", regs)[0].options
    assert (margin.type, margin.bounds, margin.default) == ("float", ">= 0, <= 1", "0.0")
    assert "`margin  float  >= 0, <= 1  0.0`" in PLUGINS_MD.read_text()
    app = typer.Typer()
    app.callback()(lambda: None)
    module.kd_register_commands(app)
    assert "apex closed" in CliRunner().invoke(app, ["molars", "stages"]).stdout


def test_docs_import_only_from_the_facade_and_every_import_resolves():
    """Every import in a Python block of the README and docs names ``kdtoolkit`` or
    ``kdtoolkit.testing`` (never an inner module) and resolves as written."""
    import ast

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    statements = []
    for path in docs:
        for block in code_blocks(path.read_text(), "python"):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdtoolkit"):
                    assert node.module in ("kdtoolkit", "kdtoolkit.testing"), (path, node.module)
                    statements.append(ast.unparse(node))
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("kdtoolkit")]
                    assert all(n == "kdtoolkit" for n in names), (path, names)
                    statements += [f"import {n}" for n in names]
    assert any("CompositeLoss" in s for s in statements)
    for statement in statements:
        exec(statement, {})
