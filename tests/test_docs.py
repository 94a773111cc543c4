"""Every hook is documented and tested (the datasette rule); README and CI agree."""

import re
from pathlib import Path

import pytest

from kdtoolkit.plugins import hookspec

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in vars(hookspec) if name.startswith("kd_"))


def test_there_are_hooks():
    assert "kd_register_losses" in HOOKS and len(HOOKS) == 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}(" in docs, f"{hook} has no section in docs/plugins.md"
    assert getattr(hookspec, hook).__doc__, f"{hook} has no docstring"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_tested(hook):
    tests = [p for p in ROOT.glob("tests/test_*.py") if p.name != "test_docs.py"]
    tests += list(ROOT.glob("plugins/*/tests/test_*.py"))
    assert any(hook in p.read_text() for p in tests), f"no test mentions {hook}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1).splitlines()
    assert len(commands) == 2, "the README opens with exactly two set-up commands"
    assert "kd run" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
