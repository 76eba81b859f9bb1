"""The layer rule and the public surface, checked by walking the package with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import netlib

PACKAGE = Path(netlib.__file__).parent
# Lower number = lower layer. A module may import only from its own layer or below.
LAYERS = {
    "netlib.errors": 0,
    "netlib.sansio": 1,
    "netlib.aio": 2,
    "netlib.streams": 3,
    "netlib.server": 3,
    "netlib.client": 3,
    "netlib.handlers": 3,
    "netlib.runner": 3,
    "netlib.udp": 3,
    "netlib.chat": 3,
    "netlib.chat_client": 5,
    "netlib": 4,  # __init__ re-exports
    "netlib.cli": 5,
    "netlib.demo": 5,
    "netlib.__main__": 5,
}
SANSIO_FORBIDDEN = {"asyncio", "socket", "selectors", "time", "random", "logging"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return LAYERS[name]


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_module_has_a_layer() -> None:
    for name, _ in modules():
        assert layer_of(name) >= 0


def test_imports_only_point_down() -> None:
    violations = [
        f"{name} imports {imported}"
        for name, path in modules()
        for imported in imports_of(path)
        if imported.startswith("netlib") and layer_of(imported) > layer_of(name)
    ]
    assert violations == []


def test_layer_order_catches_an_upward_import() -> None:
    assert layer_of("netlib.aio.framed") > layer_of("netlib.sansio.framing")
    assert layer_of("netlib.server") > layer_of("netlib.aio.echo") > layer_of("netlib.errors")


def test_sansio_never_touches_io_or_clocks() -> None:
    for name, path in modules():
        if name.startswith("netlib.sansio"):
            roots = {imported.split(".")[0] for imported in imports_of(path)}
            assert not roots & SANSIO_FORBIDDEN, name


def test_public_surface() -> None:
    exported = set(netlib.__all__)
    assert len(exported) == len(netlib.__all__)
    for name in exported:
        assert hasattr(netlib, name), name
    public = {n for n in vars(netlib) if not n.startswith("_") and n not in _SUBMODULES}
    assert public == exported - {"__version__"}


def test_every_module_declares_all() -> None:
    for name, path in modules():
        if not name.endswith("__main__") and path.name != "__init__.py":
            assert "__all__" in path.read_text(), name


_SUBMODULES = {
    "aio",
    "sansio",
    "errors",
    "client",
    "server",
    "streams",
    "handlers",
    "runner",
    "cli",
    "demo",
    "udp",
    "chat",
    "chat_client",
}
