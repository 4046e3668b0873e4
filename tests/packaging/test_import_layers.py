"""mnc_d2's imports go one way: utils -> config -> data -> modeling -> evaluation -> checkpoint -> engine -> tools.
A module imports only from its own layer or from earlier ones (read from the source with ``ast``), and every
subpackage imports in a fresh interpreter (no import cycle hidden by the order of a test session)."""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "mnc_d2")
LAYERS = ("utils", "config", "data", "modeling", "evaluation", "checkpoint", "engine", "tools")


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                yield path, parts[:-1] if parts[-1] == "__init__" else parts, parts[-1] == "__init__"


def _imported_modules(path, module_parts, is_package):
    """Dotted names of the mnc_d2 modules ``path`` imports (relative imports resolved)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    package = module_parts if is_package else module_parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] == "mnc_d2")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and node.module.split(".")[0] == "mnc_d2":
                yield node.module


def _layer(dotted: str):
    parts = dotted.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def _imported_layer(dotted: str):
    """The layer of an imported module; ``import mnc_d2`` (it registers every model part) counts as the top."""
    return len(LAYERS) - 1 if dotted == "mnc_d2" else _layer(dotted)


def test_every_module_belongs_to_a_layer():
    top = sorted(".".join(parts) for _, parts, _ in _modules() if _layer(".".join(parts)) is None)
    # the package itself and the thin entry points kept for one release (python -m mnc_d2.demo, ...)
    assert top == ["mnc_d2", "mnc_d2.analyze", "mnc_d2.demo", "mnc_d2.export"]


def test_imports_only_go_to_earlier_layers():
    wrong = []
    for path, parts, is_package in _modules():
        own = _layer(".".join(parts))
        if own is None:
            continue
        for imported in _imported_modules(path, parts, is_package):
            layer = _imported_layer(imported)
            if layer is None or layer > own:
                wrong.append(f"{'.'.join(parts)} ({LAYERS[own]}) imports {imported}")
    assert wrong == []


@pytest.mark.slow
@pytest.mark.parametrize("layer", LAYERS)
def test_each_subpackage_imports_in_a_fresh_interpreter(layer):
    proc = subprocess.run([sys.executable, "-c", f"import mnc_d2.{layer}"], capture_output=True, text=True,
                          cwd=os.path.dirname(PACKAGE), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
