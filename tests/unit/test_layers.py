"""Imports go down the layers: nothing below the listen side knows it, the server or the CLI.

Read from the source (every `import` and `from ... import`, nested ones too), so an
upward import fails here however it is written and whether or not it is ever run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import proxy

PACKAGE = Path(proxy.__file__).parent
#: The layers below the listen side, and the modules they must never import.
LOWER = (
    "proxy.config",
    "proxy.ollama",
    "proxy.scheduling",
    "proxy.upstream",
    "proxy.observe",
    "proxy.errors",
    "proxy.units",
)
UPPER = ("proxy.edge", "proxy.server", "proxy.cli")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    return _imported(path.read_text(), package)


def _imported(source: str, package: str) -> set[str]:
    """Every module `source` (a module of `package`) imports, relative imports resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(package + ".") for package in packages)


LOWER_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _within(_module(p), LOWER))


def test_the_lower_layers_are_all_found():
    assert {_module(p).split(".")[1] for p in LOWER_MODULES} == {name.split(".")[1] for name in LOWER}


@pytest.mark.parametrize("path", LOWER_MODULES, ids=_module)
def test_a_lower_layer_never_imports_the_listen_side_the_server_or_the_cli(path: Path):
    upward = sorted(name for name in _imports(path) if _within(name, UPPER))
    assert not upward, f"{_module(path)} imports {upward}: imports go down the layers"


@pytest.mark.parametrize(
    "source",
    [
        "import proxy.edge.reply",
        "from proxy.edge import reply",
        "from ..edge.reply import Reply",
        "from .. import server",
        "def later():\n    from proxy.cli import main",
    ],
)
def test_an_upward_import_is_seen_however_it_is_written(source: str):
    assert any(_within(name, UPPER) for name in _imported(source, "proxy.upstream"))


def test_a_sibling_with_a_similar_name_is_not_upward():
    assert not any(_within(name, UPPER) for name in _imported("import proxy.edgeworks", "proxy.upstream"))


#: Every layer's height: a module may import only from layers strictly lower than its own
#: (or from its own package). The order docs/architecture.md draws, held here so it stays true.
HEIGHT = {
    "__main__": 11,
    "cli": 10,
    "demo_fleet": 9,
    "demo": 8,
    "server": 7,
    "reload": 6,
    "admin": 6,
    "edge": 6,
    "runtime": 5,
    "scheduling": 4,
    "upstream": 4,
    "observe": 3,
    "config": 2,
    "sim": 2,
    "ollama": 1,
    "units": 0,
    "errors": 0,
}


def _layer(name: str) -> str:
    return name.split(".")[1]


ALL_MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _module(p) != "proxy")


def test_every_layer_has_a_height():
    assert {_layer(_module(p)) for p in ALL_MODULES} == set(HEIGHT)


@pytest.mark.parametrize("path", ALL_MODULES, ids=_module)
def test_every_import_goes_down_the_layers(path: Path):
    own = _layer(_module(path))
    upward = sorted(
        name
        for name in _imports(path)
        if name.startswith("proxy.") and _layer(name) in HEIGHT and _layer(name) != own
        if HEIGHT[_layer(name)] >= HEIGHT[own]
    )
    assert not upward, f"{_module(path)} ({own}) imports {upward}: imports go down the layers"
