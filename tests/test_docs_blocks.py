"""Every fenced block of README.md and docs/**/*.md is run or checked, on both loops.

What each kind of block must be (the info string after the opening fence):

* ``python``: a complete program. It runs in a subprocess on asyncio and on uvloop
  (``NETLIB_LOOP``), must finish by itself within ``TIMEOUT`` seconds, with exit status 0
  and nothing on stderr, and must pass ``ruff check``, ``ruff format --check`` and
  ``mypy --strict`` with the project's settings. Servers and clients must use loopback and
  port 0 (checked in its syntax tree). What it prints must be shown in an ``output`` block
  right after it, and is compared with it; a program that prints and has no ``output``
  block fails.
* ``output``: what the ``python`` block before it prints (or the included example); only
  blank lines or a line "It prints:" may stand between them.
* ``console``: ``$ command`` lines, each followed by the output it prints (stdout and
  stderr). Commands run with ``bash`` in the repository, with the venv's ``bin`` first on
  the ``PATH``. A command ending in ``&`` is a server: it is started with ``--port 0``
  instead of the port written, netlib's "listening on HOST:PORT" line gives the real
  port, which replaces the written one in the commands after it, and it is stopped with
  SIGINT at the end of the block. A ctime timestamp such as ``[Mon Nov 23 10:00:00 2026]``
  in an output line matches any timestamp, and a line ``...`` any number of lines.
* ``text``: an illustration that is not a program (a diagram, lines on the wire).
* ``{eval-rst}`` and ``{toctree}``: Sphinx directives (the API reference, the contents).
* ``{literalinclude}``: must include a file of docs/examples/, which
  tests/test_docs_examples.py runs; an ``output`` block after it must be what that test
  expects the example to print.

Any other block (including one with no info string) fails ``test_every_block_is_known``,
so a new block is tested from the day it is written. ``NOT_RUN`` lists the blocks checked
otherwise (``sh``), each with its reason.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import netlib
from tests.test_docs_examples import EXPECTED as EXAMPLE_OUTPUT

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
TIMEOUT = 30.0
LOOPS = ["asyncio", "uvloop"]

DIRECTIVES = {"{eval-rst}", "{toctree}", "{literalinclude}"}
KINDS = {"python", "output", "console", "text"} | DIRECTIVES

# Blocks that are not run, keyed by (file, first line of the block), with the reason and
# the check they get instead.
NOT_RUN: dict[tuple[str, str], str] = {
    (
        "README.md",
        'pip install "netlib-asyncio[cli]"   # and the interactive chat client\'s line editing',
    ): "installing from PyPI needs the network and a release: checked "
    "that each line installs this project's distribution name with extras it defines",
    (
        "README.md",
        "make demo   # creates .venv, installs netlib, runs echo, chat, a download and a "
        "speed test",
    ): "the make targets (re)install .venv and `make test` runs this "
    "suite: checked with `make -n` (the targets exist and their recipes parse)",
}


# Messages a block prints on stderr that are not its own, with their cause: (file, a line
# of the block) -> the message.


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    kind: str
    argument: str
    body: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def first_line(self) -> str:
        return self.body.splitlines()[0] if self.body else ""


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*(\S*)\s*(.*)$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def blocks_of(path: Path) -> Iterator[Block]:
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, kind, argument = opening.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence))
            and set(lines[j].strip()) == {fence[0]}
        ):
            body.append(lines[j])
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: unclosed code fence"
        yield Block(path, i + 1, kind, argument, "\n".join(body) + "\n" if body else "")
        i = j + 1


ALL_BLOCKS = [block for path in markdown_files() for block in blocks_of(path)]


def blocks(kind: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.kind == kind]


def output_after(block: Block) -> Block | None:
    """The ``output`` block right after ``block``, if any: only blank lines, or "It prints:",
    may stand between them."""
    lines = block.path.read_text().splitlines()
    index = ALL_BLOCKS.index(block)
    if index + 1 == len(ALL_BLOCKS):
        return None
    after = ALL_BLOCKS[index + 1]
    if after.path != block.path or after.kind != "output":
        return None
    closing = block.line + block.body.count("\n") + 1  # 1-based line of the closing fence
    between = lines[closing : after.line - 1]
    return after if all(line.strip() in ("", "It prints:") for line in between) else None


def not_run(block: Block) -> bool:
    return (str(block.path.relative_to(ROOT)), block.first_line) in NOT_RUN


# ---------------------------------------------------------------------------------------
# every block is of a known kind


def test_blocks_are_found() -> None:
    assert len(blocks("python")) >= 10
    assert blocks("console")


def test_every_block_is_known() -> None:
    unknown = [
        f"{b.name} ({b.kind or 'no info string'})"
        for b in ALL_BLOCKS
        if b.kind not in KINDS and not not_run(b)
    ]
    assert not unknown, f"blocks of no tested kind (see this module's docstring): {unknown}"


def test_every_output_block_follows_a_program() -> None:
    shown = {id(output_after(b)) for b in blocks("python") + blocks("{literalinclude}")}
    orphans = [b.name for b in blocks("output") if id(b) not in shown]
    assert not orphans


def test_not_run_list_is_tiny_and_current() -> None:
    assert len(NOT_RUN) <= 2
    firsts = {(str(b.path.relative_to(ROOT)), b.first_line) for b in ALL_BLOCKS}
    assert set(NOT_RUN) <= firsts, "NOT_RUN names a block that no longer exists"


@pytest.mark.parametrize("block", blocks("{literalinclude}"), ids=lambda b: b.name)
def test_literalinclude_shows_a_tested_example(block: Block) -> None:
    included = (block.path.parent / block.argument).resolve()
    assert included.parent == (DOCS / "examples").resolve(), block.argument
    assert included.name in EXAMPLE_OUTPUT  # run by tests/test_docs_examples.py
    shown = output_after(block)
    if shown:  # what it prints, as tests/test_docs_examples.py checks it
        assert shown.body == EXAMPLE_OUTPUT[included.name]


def test_reference_documents_every_public_name() -> None:
    reference = (DOCS / "reference.md").read_text()
    documented = set(re.findall(r"^\.\. auto\w+:: netlib\.(\w+)(?:\(\))?$", reference, re.M))
    assert documented == set(netlib.__all__) - {"__version__"}


# ---------------------------------------------------------------------------------------
# python blocks

SERVER_VERBS = {"serve_tcp": 2, "open_tcp_server": 2, "serve_udp": 2, "open_udp_server": 2}
CLIENT_VERBS = {"connect_tcp": 1, "open_udp_endpoint": 1, "open_chat_server": 1, "serve_chat": 1}
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def addresses_used(source: str) -> Iterator[tuple[str, object, object]]:
    """(verb, host, port) of every call of a netlib verb, with literal arguments or None."""
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        verb = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        port_index = {**SERVER_VERBS, **CLIENT_VERBS}.get(verb)
        if port_index is None:
            continue
        arguments: dict[str, ast.expr] = {kw.arg: kw.value for kw in node.keywords if kw.arg}
        if len(node.args) > port_index:
            arguments["port"] = node.args[port_index]
        if len(node.args) > port_index - 1:
            arguments["host"] = node.args[port_index - 1]
        host = arguments.get("host")
        port = arguments.get("port")
        yield (
            verb,
            host.value if isinstance(host, ast.Constant) else None,
            port.value if isinstance(port, ast.Constant) else None,
        )


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.name)
def test_python_block_uses_loopback_and_port_0(block: Block) -> None:
    for verb, host, port in addresses_used(block.body):
        assert host is None or host in LOOPBACK, f"{verb} binds or connects to {host!r}"
        assert port in (None, 0), f"{verb} uses the fixed port {port}; use 0 and .addresses"


def write_python_blocks(directory: Path) -> None:
    for block in blocks("python"):
        name = block.name.replace("/", "_").replace(":", "_line").replace(".", "_")
        (directory / f"{name.replace('-', '_')}.py").write_text(block.body)


def test_python_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    write_python_blocks(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "pyproject.toml", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_python_blocks_pass_ruff(tmp_path: Path) -> None:
    write_python_blocks(tmp_path)
    config = ["--config", str(ROOT / "pyproject.toml")]
    for command in (["check", "--no-cache"], ["format", "--check", "--diff", "--no-cache"]):
        done = subprocess.run(
            [str(BIN / "ruff"), *command, *config, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.name)
def test_python_block_runs(block: Block, loop_name: str, tmp_path: Path) -> None:
    program = tmp_path / "block.py"
    program.write_text(block.body)
    done = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "NETLIB_LOOP": loop_name},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    shown = output_after(block)
    assert done.stdout == (shown.body if shown else ""), (
        "what the block prints must be shown in an `output` block right after it"
    )


# ---------------------------------------------------------------------------------------
# console blocks

CTIME = r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\]"
LISTENING = re.compile(r"listening on \[?([^\]\s]+?)\]?:(\d+)")
PORT_OPTION = re.compile(r"--port (\d+)")


@dataclass
class Command:
    line: str
    expected: list[str]


def commands_of(block: Block) -> list[Command]:
    found: list[Command] = []
    for line in block.body.splitlines():
        if line.startswith("$ "):
            found.append(Command(line[2:], []))
        else:
            assert found, f"{block.name}: output before the first `$ ` command"
            found[-1].expected.append(line)
    return found


def matches(expected: list[str], got: list[str]) -> bool:
    """Whether ``got`` is ``expected``, where a line ``...`` stands for any lines."""
    pattern = ""
    for want in expected:
        if want == "...":
            pattern += r"(?:[^\n]*\n)*"
        else:
            line = re.escape(want).replace(re.escape("[Mon Nov 23 10:00:00 2026]"), CTIME)
            pattern += line + r"\n"
    return re.fullmatch(pattern, "".join(line + "\n" for line in got)) is not None


def shell_env(loop_name: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "NETLIB_LOOP": loop_name,
        "COLUMNS": "80",  # argparse wraps --help to the terminal's width
    }


def prepare(command: str, ports: dict[str, str]) -> str:
    command = command.replace(".venv/bin/", f"{BIN}/")
    return PORT_OPTION.sub(lambda m: f"--port {ports.get(m.group(1), m.group(1))}", command)


def start_server(command: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str, str]:
    """Start a `... &` command on port 0; return it, its first line and its real port."""
    written = PORT_OPTION.search(command)
    assert written, f"a background server needs --port: {command}"
    server = subprocess.Popen(
        ["bash", "-c", "exec " + PORT_OPTION.sub("--port 0", command.removesuffix("&"))],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert server.stdout is not None
    first = server.stdout.readline().rstrip("\n")  # blocks until it listens (or exits)
    listening = LISTENING.search(first)
    assert listening, f"{command}: no 'listening on' line, got {first!r}"
    return server, first.replace(listening.group(2), written.group(1)), listening.group(2)


def stop(server: subprocess.Popen[str]) -> int:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert server.stdout is not None
    server.stdout.close()
    return server.returncode


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("block", blocks("console"), ids=lambda b: b.name)
def test_console_block_runs(block: Block, loop_name: str) -> None:
    env = shell_env(loop_name)
    ports: dict[str, str] = {}
    servers: list[subprocess.Popen[str]] = []
    try:
        for command in commands_of(block):
            line = prepare(command.line.strip(), ports)
            if line.endswith("&"):
                written = PORT_OPTION.search(command.line)
                assert written
                server, first, port = start_server(line, env)
                servers.append(server)
                ports[written.group(1)] = port
                got = [first]
            else:
                done = subprocess.run(
                    ["bash", "-c", line],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=TIMEOUT,
                )
                assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
                got = (done.stdout + done.stderr).splitlines()
            expected = command.expected if command.expected or line.endswith("&") else []
            if line.endswith("&") and not command.expected:
                continue  # the server's banner is not shown
            assert matches(expected, got), f"$ {command.line}\nexpected {expected}\ngot {got}"
    finally:
        codes = [stop(server) for server in servers]
    assert all(code in (0, -signal.SIGINT, 130) for code in codes), codes


PIP_INSTALL = re.compile(r'pip install "?([A-Za-z0-9_.-]+)(?:\[([a-z,]+)\])?"?$')


def test_not_run_blocks_are_checked_otherwise() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    checked = [b for b in ALL_BLOCKS if not_run(b)]
    assert len(checked) == len(NOT_RUN)
    for block in checked:
        for line in block.body.splitlines():
            command = line.split("#")[0].strip()
            if command.startswith("make "):
                done = subprocess.run(
                    ["make", "-n", *command.split()[1:]],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == 0, done.stderr
                continue
            install = PIP_INSTALL.fullmatch(command)
            assert install, f"{block.name}: no check for {line!r}"
            name, extras = install.groups()
            assert name == project["name"]
            assert set((extras or "").split(",")) - {""} <= set(project["optional-dependencies"])
