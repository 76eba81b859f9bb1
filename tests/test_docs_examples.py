"""Every docs example runs to completion on both loops and prints what the docs show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
EXPECTED = {
    "custom_handler.py": "SET colour blue -> OK\nGET colour -> blue\nGET size -> (nil)\n"
    "DEL colour -> ERR unknown command DEL\n",
    "echo_protocol.py": "MAKE ME LOUD\n",
    "netstring.py": "on the wire: b'5:hello,0:,6:a,b:c\\n,'\n"
    "byte by byte: [b'hello', b'', b'a,b:c\\n']\n"
    "b'hello' -> b'HELLO'\nb'' -> b''\nb'a,b:c\\n' -> b'A,B:C\\n'\n"
    "the server closed the connection\nprotocol errors: 1\n",
    "udp_request.py": "b'hello' -> b'HELLO'\nb'' -> b''\n"
    "b'datagrams keep their boundaries' -> b'DATAGRAMS KEEP THEIR BOUNDARIES'\n"
    "handled: 3 replies refused: 0\n",
}


def test_every_example_has_an_expected_output() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, loop_name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NETLIB_LOOP": loop_name},
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == EXPECTED[name]
