"""The room hub: delivers a room's lines to its subscribers, in this process or beyond.

A chat service publishes each room line once; the hub fans it out. ``MemoryHub`` (the
default) does it in this process. A hub backed by a message broker (NATS) delivers the
same lines to subscribers in other processes and machines, so the interface is small and
asynchronous:

* ``await hub.join(room, subscriber)`` / ``await hub.leave(room, subscriber)``;
* ``await hub.publish(room, line, origin)``: every subscriber of ``room`` gets
  ``subscriber.deliver(line, origin)``, in publish order; ``origin`` names the sender so a
  subscriber can skip its own lines;
* ``await hub.aclose()``.

``Subscriber.deliver`` is synchronous and must not block: a subscriber queues the line
(bounded) or drops the subscriber's connection, it never slows the room.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

__all__ = ["Hub", "MemoryHub", "Subscriber"]


class Subscriber(Protocol):
    """Something that receives room lines: a chat connection."""

    def deliver(self, line: bytes, origin: Hashable) -> None:
        """Take one encoded line published by ``origin``; never blocks."""
        ...


class Hub(Protocol):
    """Fan-out of room lines to subscribers."""

    async def join(self, room: str, subscriber: Subscriber) -> None:
        """Deliver ``room``'s lines to ``subscriber`` from now on."""
        ...

    async def leave(self, room: str, subscriber: Subscriber) -> None:
        """Stop delivering ``room``'s lines to ``subscriber`` (idempotent)."""
        ...

    async def publish(self, room: str, line: bytes, origin: Hashable) -> None:
        """Deliver ``line`` to every subscriber of ``room``."""
        ...

    async def aclose(self) -> None:
        """Release the hub's resources."""
        ...


class MemoryHub:
    """A hub for one process: rooms are dicts of subscribers (insertion-ordered sets)."""

    def __init__(self) -> None:
        self._rooms: dict[str, dict[Subscriber, None]] = {}
        self.published = 0
        self.delivered = 0

    async def join(self, room: str, subscriber: Subscriber) -> None:
        self._rooms.setdefault(room, {})[subscriber] = None

    async def leave(self, room: str, subscriber: Subscriber) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.pop(subscriber, None)
            if not members:
                del self._rooms[room]

    async def publish(self, room: str, line: bytes, origin: Hashable) -> None:
        members = self._rooms.get(room)
        if not members:
            return
        self.published += 1
        self.delivered += len(members)
        for subscriber in list(members):
            subscriber.deliver(line, origin)

    async def aclose(self) -> None:
        self._rooms.clear()

    def subscribers(self, room: str) -> int:
        """Subscribers of ``room`` in this process."""
        return len(self._rooms.get(room, ()))
