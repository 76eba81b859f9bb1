"""A chat cluster's NATS settings that the command line needs before anything starts: the
servers' URLs and how long a nick lives (nothing of ``nats-py``, no I/O).

``netlib.services.nats_hub`` uses them and exports them too, with ``nats_servers``, which
also reads ``$NATS_URL``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

__all__ = ["DEFAULT_NATS_URL", "NATS_URL_ENV", "NICK_TTL", "parse_nats_servers"]

NATS_URL_ENV: Final = "NATS_URL"
"""The environment variable naming the NATS servers when none are given, as the ``nats``
command line reads it: one URL or several separated by commas."""
DEFAULT_NATS_URL: Final = "nats://127.0.0.1:4222"
"""The server used when neither an argument nor ``NATS_URL`` names one."""

NICK_TTL: Final = 30.0
"""Seconds a nick outlives the last renewal by its node: a node that dies frees its nicks
within this time. Fixed by the node that creates the bucket."""


def parse_nats_servers(servers: str | Sequence[str]) -> list[str]:
    """The NATS server URLs in ``servers`` (a URL, URLs separated by commas, or a list):
    ``host`` and ``host:port`` mean ``nats://host:4222`` and ``nats://host:port``.

    Raises:
        ValueError: a URL is not a NATS URL (one line, naming it), or there is none.
    """
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    urls = [_nats_url(item.strip()) for item in items if item.strip()]
    if not urls:
        raise ValueError("no NATS URL given")
    return urls


def _nats_url(text: str) -> str:
    url = text if "://" in text else f"nats://{text}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid NATS URL {text!r}: {exc}") from None
    if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        raise ValueError(f"invalid NATS URL {text!r}: use nats://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"invalid NATS URL {text!r}: use nats://host:port")
    if port is None and parts.scheme in ("nats", "tls"):
        url = f"{url.rstrip('/')}:4222"
    return url
