"""The folders of minidpo are layers and imports point one way: a module imports only its own layer and the layers
below it (bottom to top: the shared leaves at the package root, formats, model, dataset, training, methods,
experiment; the registry of methods sits on top, beside the package's facade), and no two modules import each
other, directly or round a longer loop. Imports are read with `ast` from the source, so a lazy import inside a
function counts too."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minidpo"
LAYERS = ("", "formats", "model", "dataset", "training", "methods", "experiment")  # "" = the root's shared leaves


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """Index in LAYERS of a module such as 'minidpo.methods.dpo' (a root module like 'minidpo.config' is layer 0)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 else 0


def imports(path: Path) -> set[str]:
    """The minidpo modules a file imports (`from minidpo.x import y` names minidpo.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minidpo.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minidpo":
            assert node.level == 0, f"{path}: use absolute imports"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m != "minidpo"}


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
MODULES = set(SOURCES)
# on top, importing every layer: the package's __init__ (the facade) and the registry of methods (what the driver runs)
TOP = {"minidpo", "minidpo.registry"}
GRAPH = {m: imports(p) for m, p in SOURCES.items() if m not in TOP}


def test_every_folder_of_the_package_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {""}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_a_module_imports_only_its_own_layer_and_the_layers_below(module):
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not upward, f"{module} (layer {LAYERS[layer(module)] or 'root'}) imports higher layers: {upward}"


def test_no_import_cycles_within_a_layer():
    def reach(start: str) -> set[str]:
        seen, todo = set(), list(GRAPH.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH.get(m, ()))
        return seen
    cycles = sorted(m for m in GRAPH if m in reach(m))
    assert not cycles, f"modules that import themselves round a loop: {cycles}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from minidpo.experiment.compare import run_one\n")
    assert imports(bad) == {"minidpo.experiment.compare"}
    assert layer("minidpo.experiment.compare") > layer("minidpo.model.gpt") > layer("minidpo.config")
