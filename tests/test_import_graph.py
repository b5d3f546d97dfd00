"""The package's import graph: no circle, and no arrow back up the data flow (plans -> config -> network -> trainer ->
checkpoint -> export -> predict), so that each room can be read, tested and replaced below the ones that use it.

The trainer folder nnU-Net searches (``nnUNet_trainers``, installed beside the package) is one more room, the top one:
it publishes the variant table's classes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rep3d_nnunet"
TRAINER_FOLDER = "nnUNet_trainers"  # one node for the whole folder, whatever its files
# The data flow, lowest room first: a module may import those before it, never those after it. Modules not listed
# (datasets, demo, environment, inspection pictures, results tables...) only have to keep the graph free of circles.
FLOW = (
    "kernel_geometry", "fft_maths", "fft_operator", "conv_backends",  # the large-kernel convolution's two backends
    "backend_cost_model", "backend_choice", "backend_measurement",  # which backend: model, decisions, measurement
    "ops",  # the large-kernel convolution's API
    "modulation", "blocks",  # the method
    "config", "architecture", "planning",  # plans -> architecture config -> network, and the planner sizing it
    "nnunet_compat", "training", "finetuning", "variants", TRAINER_FOLDER,  # trainers
    "cli",
)
CHECKPOINT_SIDE = ("nnunet_compat", "model_folder", "export", "inference")  # checkpoint -> export -> predict
# Only the command line may import the variant table; everything else finds trainer classes by name.
MAY_IMPORT_VARIANTS = {"cli", "variants"}


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this package it imports}, module names relative to the package (``datasets.msd``); the
    trainer folder is one node, ``TRAINER_FOLDER``. Imports inside functions count: they run when called."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {name: set() for name in modules if name}
    graph[TRAINER_FOLDER] = set()
    trainer_files = [(TRAINER_FOLDER, path) for path in (PACKAGE.parent / TRAINER_FOLDER).glob("*.py")]
    for name, path in [*modules.items(), *trainer_files]:
        if not name:
            continue
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            targets += [TRAINER_FOLDER for module in imported if module.split(".")[0] == TRAINER_FOLDER]
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                if node.module:
                    module = ".".join(base + [node.module])
                    targets += [module] + [f"{module}.{a.name}" for a in node.names]
                else:  # from . import x: the submodules
                    targets += [".".join(base + [a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rep3d_nnunet"):
                module = node.module.removeprefix("rep3d_nnunet").lstrip(".")
                targets += [module] + [f"{module}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name.removeprefix("rep3d_nnunet").lstrip(".") for a in node.names
                            if a.name.startswith("rep3d_nnunet.")]
            graph[name] |= {t for t in targets if t in graph and t != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_circle():
    assert _circles(import_graph()) == []


def test_a_circle_would_be_found():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for flow in (FLOW, CHECKPOINT_SIDE):
        for position, module in enumerate(flow):
            upward += [f"{module} -> {target}" for target in graph[module] if target in flow[position + 1:]]
    return upward


def test_no_arrow_goes_back_up_the_data_flow():
    graph = import_graph()
    assert set(FLOW) <= set(graph) and set(CHECKPOINT_SIDE) <= set(graph)
    assert _upward_arrows(graph) == []


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module == goal:
            return True
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return False


def test_an_arrow_back_up_would_be_found():
    """The base commit's nnunet_compat found the trainer folder by importing it: the top room, above the variants."""
    graph = import_graph()
    graph["nnunet_compat"] = graph["nnunet_compat"] | {TRAINER_FOLDER}
    assert _reaches(graph, "nnunet_compat", "variants")
    assert "nnunet_compat -> nnUNet_trainers" in _upward_arrows(graph)


def test_no_low_module_imports_the_variant_table():
    """Directly or through another room (the trainer folder publishes the variant table's classes)."""
    graph = import_graph()
    assert graph[TRAINER_FOLDER] == {"variants"}
    assert sorted(m for m in graph if m not in MAY_IMPORT_VARIANTS | {TRAINER_FOLDER} and
                  _reaches(graph, m, "variants")) == []
    probe = ("import sys, rep3d_nnunet.finetuning, rep3d_nnunet.export, rep3d_nnunet.inspection, "
             "rep3d_nnunet.masks, rep3d_nnunet.erf, rep3d_nnunet.model_folder, rep3d_nnunet.environment; "
             "rep3d_nnunet.environment.trainer_folder(); "
             "assert 'rep3d_nnunet.variants' not in sys.modules, 'variants imported'; "
             "assert 'nnUNet_trainers' not in sys.modules, 'the trainer folder imported'")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py; a test module serving as another's library breaks when it moves."""
    tests = Path(__file__).resolve().parent
    borrowed = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            borrowed += [f"{path.name} imports {name}" for name in names
                         if name.rsplit(".", 1)[-1].startswith("test_")]
    assert borrowed == []
