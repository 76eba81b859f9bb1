"""The room hub: delivers a room's lines to its subscribers, in this process or beyond.

A chat service publishes each room line once; the hub fans it out. ``MemoryHub`` (the
default) does it in this process. A hub backed by a message broker (``NatsHub``) delivers
the same lines to subscribers in other processes and machines, so the interface is small
and asynchronous:

* ``await hub.join(room, subscriber)`` / ``await hub.leave(room, subscriber)``;
* ``await hub.publish(room, line, origin, said=...)``: every subscriber of ``room`` gets
  ``subscriber.deliver(line, origin)``, in publish order; ``origin`` names the sender so a
  subscriber can skip its own lines; ``said`` marks what a member said (as opposed to a
  notice), which a hub may keep as the room's history;
* ``await hub.aclose()``.

``Subscriber.deliver`` is synchronous and must not block: a subscriber queues the line
(bounded) or drops the subscriber's connection, it never slows the room.

A chat spread over several processes also shares what a ``Directory`` holds: nicknames
(unique across the cluster), who is in which room, private messages between nodes. A hub
that is also a ``Directory`` (``NatsHub``) makes the ``ChatService`` using it a node of a
cluster; it calls back into the service through the ``ClusterNode`` interface.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, runtime_checkable

__all__ = ["ClusterNode", "Directory", "Hub", "MemoryHub", "Subscriber"]


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

    async def publish(
        self, room: str, line: bytes, origin: Hashable, *, said: bool = False
    ) -> None:
        """Deliver ``line`` to every subscriber of ``room``."""
        ...

    async def aclose(self) -> None:
        """Release the hub's resources."""
        ...


class ClusterNode(Protocol):
    """What a ``Directory`` asks of the chat on its own node (a ``ChatService``)."""

    def who(self, room: str) -> tuple[int, list[str]]:
        """Members of ``room`` on this node: how many, and (some of) their nicks."""
        ...

    def rooms(self) -> dict[str, int]:
        """Rooms on this node and their member counts."""
        ...

    def private(self, sender: str, nick: str, text: str) -> str | None:
        """Deliver a private message to ``nick`` if it is on this node: its nick as its
        holder spells it, or None."""
        ...

    def nick_lost(self, nick: str) -> None:
        """The cluster gave ``nick``, held on this node, to someone else."""
        ...

    def cluster_changed(self, available: bool, detail: str) -> None:
        """The cluster became unreachable (``available`` False) or reachable again."""
        ...

    def undelivered(self, origin: Hashable, line: bytes, detail: str) -> None:
        """A line ``origin`` said could not be delivered (``detail`` says why)."""
        ...


@runtime_checkable
class Directory(Protocol):
    """What the nodes of a chat cluster share besides room lines.

    Every call that needs the cluster raises ``netlib.ServiceUnavailable`` while it cannot
    be reached (``is_available()`` is then False).
    """

    def attach(self, node: ClusterNode) -> None:
        """Answer the cluster's questions (``/who``, ``/list``, private messages) from
        ``node``, and report to it (lost nicks, outages, lines not delivered)."""
        ...

    def is_available(self) -> bool:
        """True while the cluster can be reached."""
        ...

    def next_guest(self) -> int | None:
        """A guest number no other node gives out, or None if none is at hand."""
        ...

    async def claim(self, nick: str) -> bool:
        """Take ``nick`` for this node: True if it was free (or already this node's)."""
        ...

    def register(self, nick: str) -> None:
        """This node uses ``nick``, a guest nick from ``next_guest``: no check is needed;
        it is registered now or once the cluster can be reached (never blocks)."""
        ...

    def release(self, nick: str) -> None:
        """This node no longer uses ``nick`` (never blocks; may take effect later)."""
        ...

    async def who(self, room: str) -> tuple[int, list[str], str]:
        """Members of ``room`` on every node: how many, (some of) their nicks, and a note
        when not every node answered (else "")."""
        ...

    async def rooms(self) -> tuple[dict[str, int], str]:
        """Rooms on every node with their member counts, and a note as for ``who``."""
        ...

    async def private(self, sender: str, nick: str, text: str) -> str | None:
        """Deliver a private message to ``nick`` wherever it is: its nick as its holder
        spells it, or None if nobody has it."""
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

    async def publish(
        self, room: str, line: bytes, origin: Hashable, *, said: bool = False
    ) -> None:
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
