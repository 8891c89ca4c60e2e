"""Tests of the package layout: layers import only downwards, no cycles, no private imports."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import circuitkit as ck
from circuitkit import _moved

PACKAGE = Path(ck.__file__).parent
LAYERS = ("core", "data", "methods", "circuits", "interface")
# Function-level imports of circuitkit modules that are there on purpose, with the reason.
LAZY_IMPORTS = {
    # `circuitkit --help` answers without importing torch and TransformerLens (seconds).
    "circuitkit.interface.cli",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(tree: ast.Module) -> list[tuple[str, list[str], bool]]:
    """``(module, names, at_top_level)`` of every import of a circuitkit module in ``tree``."""
    # Module level, including ``if TYPE_CHECKING:`` blocks (imports a type checker reads).
    top = set(map(id, tree.body))
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            top |= set(map(id, node.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "circuitkit":
                    out.append((alias.name, [], id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "circuitkit":
                names = [alias.name for alias in node.names]
                out.append((node.module, names, id(node) in top))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The circuitkit modules an import statement loads (``from pkg import submodule`` too)."""
    found = [f"{module}.{name}" for name in names if f"{module}.{name}" in MODULES]
    return found or [module]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _graph() -> dict[str, set[str]]:
    return {
        name: {t for m, names, top in _imports(tree) if top for t in _targets(m, names)}
        for name, tree in MODULES.items()
    }


def test_every_module_is_in_a_layer():
    outside = [m for m in MODULES if _layer(m) is None and m not in ("circuitkit", _moved.__name__)]
    assert outside == []


def test_layers_import_only_layers_below():
    upward = []
    for name, tree in MODULES.items():
        layer = _layer(name)
        if layer is None:
            continue
        for module, names, _ in _imports(tree):
            for target in _targets(module, names):
                target_layer = _layer(target)
                if target_layer is None or target_layer > layer:
                    upward.append(f"{name} imports {target}")
    assert upward == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # The check above must be able to fail: an import of the interface from the core is upward.
    tree = ast.parse("from circuitkit.interface.plot import plot\n")
    ((module, names, top),) = _imports(tree)
    assert top and _layer(_targets(module, names)[0]) > _layer("circuitkit.core.engine")


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_function_level_imports_of_circuitkit():
    lazy = [
        f"{name} imports {module}"
        for name, tree in MODULES.items()
        for module, _, top in _imports(tree)
        if not top and name not in LAZY_IMPORTS
    ]
    assert lazy == []


def test_only_the_lens_module_imports_transformer_lens():
    found = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            if any(module.split(".")[0] == "transformer_lens" for module in modules):
                found.append(name)
    assert found and set(found) == {"circuitkit.core.lens"}


def test_no_module_imports_another_modules_private_names():
    private = []
    for name, tree in MODULES.items():
        modules = set()  # local names bound to circuitkit modules
        for module, names, _ in _imports(tree):
            for n in names:
                if f"{module}.{n}" in MODULES:
                    modules.add(n)
                elif n.startswith("_") and not n.startswith("__"):
                    private.append(f"{name}: from {module} import {n}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                private.append(f"{name}: {node.value.id}.{node.attr}")
    assert private == []


def test_no_layer_imports_the_package_root():
    # The root imports everything: a module that imports it pulls in every layer above its own.
    root = [
        f"{name} imports circuitkit"
        for name, tree in MODULES.items()
        if _layer(name) is not None
        for module, names, _ in _imports(tree)
        if module == "circuitkit"
    ]
    assert root == []


@pytest.mark.parametrize("old", sorted(_moved.DEPRECATED))
def test_an_old_module_path_imports_with_a_deprecation_warning(old):
    new = importlib.import_module(_moved.DEPRECATED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=_moved.DEPRECATED[old].replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is new
    sys.modules.pop(old, None)


def test_an_old_module_attribute_warns():
    # An import of the old path (as in the test above) binds the attribute; start without it.
    vars(ck).pop("causal_tracing", None)
    with pytest.warns(DeprecationWarning, match="circuitkit.methods.causal_tracing"):
        module = ck.causal_tracing
    assert module.TOKEN_GROUPS[0] == "first subject token"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        ck.nonsense  # noqa: B018


@pytest.mark.parametrize("old", ["circuitkit.path_patching", "circuitkit.plot"])
def test_importing_an_old_path_keeps_the_public_function(old):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sys.modules.pop(old, None)
        importlib.import_module(old)
    assert callable(getattr(ck, old.split(".")[1]))


def test_old_names_import_from_old_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sys.modules.pop("circuitkit.attribution", None)
        from circuitkit.attribution import direct_logit_attribution
    assert direct_logit_attribution is ck.direct_logit_attribution


@pytest.mark.parametrize("public", sorted(_moved.PUBLIC))
def test_public_namespaces_import_without_a_warning(public):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = importlib.import_module(public)
    assert module is getattr(ck, public.split(".")[1])


def test_import_circuitkit_is_quick():
    # Public names load on first use: the bare import pulls in neither torch nor plotly.
    code = "import sys, circuitkit; assert not {'torch', 'plotly'} & set(sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ck.__all__)
def test_every_public_name_loads(name):
    assert getattr(ck, name) is not None
    assert name in dir(ck)


def test_importing_circuitkit_leaves_plotlys_default_template():
    code = (
        "import plotly.io as pio; before = pio.templates.default; import circuitkit as ck; "
        "ck.plot; ck.plot_circuit; "
        "assert pio.templates.default == before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
