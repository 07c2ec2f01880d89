"""The package's layout: imports flow one way (cli -> benchmark -> metrics, methods, demo -> models), nothing
imports the CLI, no module is run as a script, and the public API imports from the top level."""
import ast
import os

import pytest

import pytorch_grad_cam_vlm

PACKAGE = "pytorch_grad_cam_vlm"
ROOT = os.path.dirname(pytorch_grad_cam_vlm.__file__)
# Lower rooms may not import higher ones; rooms of one rank may import each other (no cycle is still checked).
RANK = {"errors": 0, "image": 0, "layers": 0, "output": 0, "visualize": 0, "models": 1, "demo": 2, "methods": 2,
        "metrics": 2, "benchmark": 3, "cli": 4}
ENTRY_POINTS = {f"{PACKAGE}.__main__"}  # `python -m pytorch_grad_cam_vlm`: nothing imports it


def package_modules():
    """Module name -> file path of every module of the package."""
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = [PACKAGE] + os.path.relpath(path, ROOT)[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path, modules):
    """The package modules that the file at ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph():
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def room(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_outside_the_cli_imports_it():
    offenders = [f"{module} imports {target}" for module, targets in import_graph().items()
                 for target in targets if room(target) == "cli" and room(module) != "cli"
                 and module not in ENTRY_POINTS]
    assert offenders == []


def test_imports_flow_from_the_cli_down_to_the_models():
    graph = import_graph()
    rooms = {room(module) for module in graph} - {None, "__main__"}
    assert rooms <= set(RANK), f"rooms without a rank: {rooms - set(RANK)}"
    upward = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
              if room(module) in RANK and room(target) in RANK and RANK[room(target)] > RANK[room(module)]]
    assert upward == []


def test_no_module_runs_as_a_script():
    """Entry points are the CLI's subcommands (``python -m pytorch_grad_cam_vlm``): a module that the package also
    imports would warn when run with ``python -m``."""
    scripts = [name for name, path in package_modules().items()
               if name not in ENTRY_POINTS and '__name__ == "__main__"' in open(path).read()]
    assert scripts == []


def test_modules_stay_small():
    long = {name: n for name, path in package_modules().items() if (n := len(open(path).readlines())) > 420}
    assert long == {}


@pytest.mark.parametrize("name", pytorch_grad_cam_vlm.__all__)
def test_every_public_name_imports_from_the_top_level(name):
    namespace = {}
    exec(f"from pytorch_grad_cam_vlm import {name}", namespace)
    assert namespace[name] is getattr(pytorch_grad_cam_vlm, name)
