"""The package layout keeps its promises: layers without import cycles (function-local imports
included), no private name imported across modules, no oversized module, and plugins that use the
public API only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kdtoolkit"
MAX_LINES = 400
BASE = ("kdtoolkit.errors", "kdtoolkit.fileio", "kdtoolkit.config", "kdtoolkit.plugins")
MIDDLE = (*BASE, "kdtoolkit.data", "kdtoolkit.models")
#: What each part of the package may import (besides itself). The engine takes components from
#: the registries, never from a built-in plugin module; built-ins see neither engine nor report.
ALLOWED = {
    "kdtoolkit.errors": (),
    "kdtoolkit.fileio": ("kdtoolkit.errors",),
    "kdtoolkit.config": ("kdtoolkit.errors", "kdtoolkit.fileio", "kdtoolkit.plugins"),
    "kdtoolkit.plugins": ("kdtoolkit.errors", "kdtoolkit.fileio", "kdtoolkit.config"),
    "kdtoolkit.data": BASE,
    "kdtoolkit.models": BASE,
    "kdtoolkit.report": MIDDLE,
    "kdtoolkit.builtin": MIDDLE,
    "kdtoolkit.serving": MIDDLE,
    "kdtoolkit.engine": (*MIDDLE, "kdtoolkit.report", "kdtoolkit.serving"),
    "kdtoolkit.tuning": (*MIDDLE, "kdtoolkit.report", "kdtoolkit.serving", "kdtoolkit.engine"),
}
#: The modules of ``kdtoolkit.serving`` that an install without the training stack runs
#: (``kd predict model.onnx``): they import neither torch nor a module that does.
TORCH_FREE = (
    "kdtoolkit.serving.exported",
    "kdtoolkit.serving.predict",
    "kdtoolkit.serving.predictor",
    "kdtoolkit.serving.preprocess",
    "kdtoolkit.serving.resample",
)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(folder: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(folder.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import anywhere in ``path``,
    resolved to modules of ``known`` (``from a import b`` where ``a.b`` is a module → ``a.b``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    out.append((sub, [], node.lineno))
                elif node.module in known:
                    out.append((node.module, [alias.name], node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {
        name: {m for m, _, _ in imports_of(path, known) if m != name} for name, path in mods.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def part_of(module: str) -> str | None:
    for part in ALLOWED:
        if module == part or module.startswith(part + "."):
            return part
    return None


def allowed(importer: str, imported: str) -> bool:
    mine, theirs = part_of(importer), part_of(imported)
    if mine is None:  # the facade, the CLI, helpers for tests: on top of everything
        return True
    return theirs == mine or (theirs is not None and theirs in ALLOWED[mine])


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_of_sees_function_local_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from kdtoolkit.engine import run\n    import kdtoolkit.data\n")
    found = imports_of(source, {"kdtoolkit.engine.run", "kdtoolkit.data"})
    assert [m for m, _, _ in found] == ["kdtoolkit.engine.run", "kdtoolkit.data"]


def test_no_import_cycle_in_kdtoolkit():
    assert find_cycle(graph()) is None


def test_layers_import_only_downwards():
    problems = [
        f"{name} -> {dep}"
        for name, deps in graph().items()
        for dep in sorted(deps)
        if not allowed(name, dep)
    ]
    assert not problems, problems


def test_layer_rule_refuses_upward_and_sideways_imports():
    assert allowed("kdtoolkit.engine.run", "kdtoolkit.data.view")
    assert not allowed("kdtoolkit.data.view", "kdtoolkit.engine.run")
    assert not allowed("kdtoolkit.engine.run", "kdtoolkit.builtin.losses")
    assert not allowed("kdtoolkit.builtin.losses", "kdtoolkit.engine.train")
    assert not allowed("kdtoolkit.data.view", "kdtoolkit")  # the facade is not a layer below
    assert allowed("kdtoolkit.cli", "kdtoolkit.engine.run")


def test_no_private_name_imported_across_modules():
    roots = [PACKAGE, ROOT / "plugins", ROOT / "benchmarks"]
    problems = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kd"):
                    for alias in node.names:
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            rel = path.relative_to(ROOT)
                            problems.append(f"{rel}:{node.lineno} {node.module}.{alias.name}")
    assert not problems, problems


@pytest.mark.parametrize("folder", ["kdtoolkit", "plugins", "benchmarks"])
def test_no_module_over_the_size_limit(folder):
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for p in sorted((ROOT / folder).rglob("*.py"))
    }
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_the_torch_free_serving_modules_import_no_training_stack():
    """Module-level imports only (a function may import torch where it needs it): walked
    through kdtoolkit's own modules, none of them reaches torch, timm, ultralytics, sklearn
    or scipy."""
    mods = modules()
    known = set(mods)
    heavy = ("torch", "timm", "ultralytics", "sklearn", "scipy", "matplotlib", "safetensors")

    def top_level(name: str) -> tuple[set[str], set[str]]:
        tree = ast.parse(mods[name].read_text())
        ours, theirs = set(), set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            ours |= {n for n in names if n in known}
            theirs |= {n.split(".")[0] for n in names}
        return ours, theirs

    for start in TORCH_FREE:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            ours, theirs = top_level(name)
            assert not theirs & set(heavy), (start, name, theirs & set(heavy))
            parent = name.rsplit(".", 1)[0]
            todo += [*ours, *([parent] if parent in known and parent != name else [])]
