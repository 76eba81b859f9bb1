"""The layer rule and the public surface, checked by walking the package with ``ast``."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import netlib

PACKAGE = Path(netlib.__file__).parent
# The floors, lowest first. A module may import from lower floors, and from its own floor
# only what that floor shares (below) or what sits in its own package: adapters do not
# import each other, services do not import each other, and so on.
LAYERS = {
    "netlib.errors": 0,
    "netlib.sansio": 1,  # CORE: pure logic, bytes and `now` in, events and bytes out
    "netlib.aio": 2,  # ADAPTERS: the only code that touches transports and the loop clock
    "netlib.streams": 3,  # public objects over the adapters: MessageStream, Datagram...
    "netlib.services": 4,  # SERVICES: what runs on a connection, over any transport
    "netlib.server": 5,  # PUBLIC verbs: serve_*, open_*, connect_*
    "netlib.client": 5,
    "netlib.udp": 5,
    "netlib.rudp": 5,
    "netlib.chat": 5,
    "netlib.files": 5,
    "netlib.speedtest": 5,
    "netlib.nats_server": 5,
    "netlib.runner": 5,
    "netlib.testing": 5,
    "netlib": 6,  # __init__ re-exports
    "netlib.cli": 7,
    "netlib.chat_client": 7,
    "netlib.demo": 7,
    "netlib.__main__": 7,
}
# Modules a floor shares with its own members (helpers, not peers).
SHARED = {
    "netlib.sansio.framing",
    "netlib.sansio.deadlines",
    "netlib.sansio.ratelimit",
    "netlib.sansio.datagram",  # the reply budget every UDP service core spends
    "netlib.aio.flow",
    "netlib.aio.logs",
    "netlib.aio.sockets",
    "netlib.aio.deadlines",
    "netlib.services.hub",
    "netlib.server",
    "netlib.rudp",  # the reliable-UDP server, which the chat serves on too
    "netlib.runner",
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


def package_of(name: str) -> str:
    """The package a module belongs to on its floor (``netlib.services.chat`` for
    ``netlib.services.chat.udp``; the module itself for a top-level module)."""
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 2 else name


def sideways(name: str, imported: str) -> bool:
    """True if ``imported`` is a peer on ``name``'s floor that it may not import."""
    if not imported.startswith("netlib.") or layer_of(imported) != layer_of(name):
        return False
    if layer_of(name) >= layer_of("netlib") or imported in SHARED:
        return False  # the front ends (cli, demo) are one program
    return package_of(imported) != package_of(name)


def test_no_sideways_imports_between_peers() -> None:
    violations = [
        f"{name} imports {imported}"
        for name, path in modules()
        for imported in imports_of(path)
        if sideways(name, imported)
    ]
    assert violations == []


def test_layer_order_catches_an_upward_import() -> None:
    assert layer_of("netlib.aio.framed") > layer_of("netlib.sansio.framing")
    assert layer_of("netlib.server") > layer_of("netlib.services.echo") > layer_of("netlib.aio")
    assert layer_of("netlib.services.chat.udp") > layer_of("netlib.streams")


def test_sideways_rule_catches_peers_and_allows_packages() -> None:
    assert sideways("netlib.aio.echo", "netlib.aio.datagram")
    assert sideways("netlib.services.echo", "netlib.services.chat")
    assert sideways("netlib.udp", "netlib.client")
    assert not sideways("netlib.services.chat.udp", "netlib.services.chat.service")
    assert not sideways("netlib.services.chat.service", "netlib.services.hub")
    assert not sideways("netlib.chat", "netlib.server")


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
    "services",
    "runner",
    "cli",
    "demo",
    "udp",
    "rudp",
    "chat",
    "chat_client",
    "nats_server",
    "files",
    "speedtest",
    "testing",
}


def _type_checking_imports() -> dict[str, str]:
    """The names ``netlib/__init__.py`` imports under ``TYPE_CHECKING``, with their modules."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    guarded = [
        node
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
    ]
    assert len(guarded) == 1
    return {
        alias.name: str(node.module)
        for node in ast.walk(guarded[0])
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_the_lazy_table_matches_the_typed_imports_and_the_public_names() -> None:
    homes = netlib._HOMES
    assert homes == _type_checking_imports()
    assert set(homes) == set(netlib.__all__) - {"__version__"}
    for name, home in homes.items():
        assert getattr(netlib, name) is getattr(importlib.import_module(home), name), name


def test_import_netlib_loads_no_service_until_one_is_used() -> None:
    probe = (
        "import sys, netlib\n"
        "heavy = ('netlib.files', 'netlib.chat', 'netlib.rudp', 'h11', 'asyncio')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "netlib.connect_tcp\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.splitlines() == ["[]", "['asyncio']"]
