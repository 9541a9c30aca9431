"""Imports point one way: application -> model library -> modules -> ops -> kernels.

A static check of the package's own imports (deferred ones inside functions included):
no module imports a module of a higher layer, and no two modules import each other,
directly or through others. Nothing is imported or run: the files are parsed."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Package name -> folder (the Triton kernels ship as effnet_fast.kernels from kernels/).
SOURCES = {"effnet_fast": ROOT / "effnet_fast", "effnet_fast.kernels": ROOT / "kernels"}
# Layers, lowest first: a module may import modules of its own layer or lower ones. The
# first prefix that matches a module's name gives its layer.
LAYERS = (
    ("kernels", ("effnet_fast.kernels",)),
    ("ops", ("effnet_fast.ops",)),
    ("modules", ("effnet_fast.nn",)),
    ("model library", ("effnet_fast.efficientnet", "effnet_fast.convert", "effnet_fast.patch", "effnet_fast.freeze",
                       "effnet_fast.distributed", "effnet_fast.pretrained")),
    ("application", ("effnet_fast.app",)),
    # The package's front door and the deprecated aliases of moved modules: nothing imports them.
    ("entry points", ("effnet_fast.__main__", "effnet_fast.model", "effnet_fast.layers", "effnet_fast")),
)
# Modules that must import nothing of effnet_fast outside their own package.
SELF_CONTAINED = ("effnet_fast.kernels",)


def module_files():
    """{module name: path} of every Python file of the package."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name.startswith("effnet_fast.kernels") and package == "effnet_fast":
                continue  # not a folder of effnet_fast/
            modules[name] = path
    return modules


def imports_of(name, path, known):
    """The effnet_fast modules that module `name` (at `path`) imports, anywhere in it."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "effnet_fast" or t.startswith("effnet_fast."))
    found.discard(name)
    return found


def layer_of(name):
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer of LAYERS: add it")


def upward_imports(graph):
    """['a imports b (layer x above layer y)', ...]."""
    wrong = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
            for package in SELF_CONTAINED:
                if name.startswith(package) and not target.startswith(package):
                    wrong.append(f"{name} imports {target}, outside {package}")
    return wrong


def cycles(graph):
    """The import circles of `graph` ({module: modules it imports}), as lists of modules."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _package_graph():
    modules = module_files()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # A package's __init__ runs before any of its modules, so `effnet_fast.x.y` importing
    # `effnet_fast` is no circle of ours; only the submodules' own imports count.
    return {name: {t for t in targets if t != "effnet_fast"} for name, targets in graph.items()}


def test_every_module_is_in_a_layer():
    for name in module_files():
        layer_of(name)


def test_no_import_points_up():
    assert upward_imports(_package_graph()) == []


def test_no_import_circles():
    assert cycles(_package_graph()) == []


def test_the_check_sees_deferred_and_relative_imports(tmp_path):
    """Negative control: an upward import hidden in a function, written relatively, and a
    circle through two modules are both found."""
    ops = tmp_path / "effnet_fast" / "ops"
    ops.mkdir(parents=True)
    (ops / "__init__.py").write_text("")
    (ops / "a.py").write_text("def f():\n    from ..nn.layers import MBConv\n    from . import b\n")
    (ops / "b.py").write_text("from .a import f\n")
    known = {"effnet_fast.ops", "effnet_fast.ops.a", "effnet_fast.ops.b", "effnet_fast.nn.layers"}
    graph = {name: imports_of(name, ops / f"{name.rsplit('.', 1)[1]}.py", known)
             for name in ("effnet_fast.ops.a", "effnet_fast.ops.b")}
    assert graph["effnet_fast.ops.a"] == {"effnet_fast.nn.layers", "effnet_fast.ops.b"}
    assert upward_imports(graph) == ["effnet_fast.ops.a (ops) imports effnet_fast.nn.layers (modules)"]
    assert cycles(graph) == [["effnet_fast.ops.a", "effnet_fast.ops.b"]]


@pytest.mark.parametrize("name", ["effnet_fast.kernels.ops", "effnet_fast.kernels._common"])
def test_the_kernels_import_nothing_of_the_package(name):
    graph = _package_graph()
    assert not [t for t in graph[name] if not t.startswith("effnet_fast.kernels")]


@pytest.mark.parametrize("old,new,names", [
    ("effnet_fast.layers", "effnet_fast.nn", ("MBConv", "FusedDWConvBNSiLU", "SyncBatchNorm2d")),
    ("effnet_fast.model", "effnet_fast.efficientnet", ("EfficientNet", "set_fused", "VARIANTS")),
])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new, names):
    import importlib
    import sys
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        module = importlib.import_module(old)
    current = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(current, name)
