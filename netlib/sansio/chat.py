"""Chat core: nicknames, rooms and commands as pure logic; text lines in, effects out.

Rules of this module:

* No I/O, no clock, no randomness, no logging. Time arrives as ``now`` (float seconds, any
  monotonic origin) and is only used for flood control.
* The adapter (TCP, UDP, ...) drives a ``ChatCore`` with three calls (and
  ``receive_overlong`` for a line its framing refused as too long on the wire):
  ``connect(client, now, source=...)`` when a session starts (``source`` names the client's
  host, e.g. its IP address, for the per-host limits; by default each client is its own),
  ``receive_line(client, text, now)`` for each decoded text line, and
  ``disconnect(client, reason)`` when the session is gone (idempotent). Each call returns
  the effects to carry out, *in order*: ``Send`` (one line to one client), ``Broadcast`` (one
  line to every member of a room but ``exclude``), ``Joined`` / ``Left`` (mirror the
  membership into the hub's subscriptions), ``Close`` (end the session once every earlier
  effect is delivered; the core has already forgotten the client and emits nothing more
  for it).
* The core never loops over room members: fan-out is the hub's job, possibly across
  processes. So room notices are broadcast while the subject is still a member (``exclude``
  keeps it from seeing its own notice), and a ``Broadcast`` never names a room without a
  member.
* A client is always in 1..``MAX_ROOMS_PER_CLIENT`` rooms. ``connect`` puts it in the
  default room (which never counts toward ``MAX_ROOMS``, so a connect cannot fail for want
  of a room); ``/part`` of its only room is refused. Plain text goes to its *current* room:
  the one it joined or switched to (``/join`` of a room it is in) last.
* Membership notices (join, part, quit, nick change) are broadcast only in rooms of at most
  ``ANNOUNCE_MAX_MEMBERS`` members: filling a room of N members then costs O(N) deliveries,
  not O(N^2). ``/who`` and ``/list`` still show who is there.
* Every limit is a named constant below; exceeding one gives an ``!!!`` reply, never a
  silent drop. Calls that misuse the API (connecting a connected id, bad settings) raise
  ``ValueError``; lines from an unknown client are ignored (``[]``), since an adapter may
  still hold lines read before a ``Close``.

Cluster mode (``ChatCore(clustered=True)``): the core is one node of a chat spread over
several processes, and what only the cluster knows becomes a question and an answer. Guest
numbers come from ``guest_numbers`` (the cluster hands out unique ones); ``/nick`` checks the
nick locally, then emits ``NickClaim`` and changes the nick only when ``nick_claimed``
brings the cluster's answer (lines sent meanwhile go out under the old nick); every nick
the core gives up is a ``NickRelease``; ``/who`` and ``/list`` emit ``WhoQuery`` and
``ListQuery`` answered by ``who_answer`` and ``list_answer``; ``/msg`` to a nick that is not
on this node emits ``PrivateQuery`` answered by ``private_answer``, and a private message
from another node arrives through ``deliver_private``. ``nick_lost`` renames a member whose
nick the cluster gave to someone else (after an outage longer than the nick's lifetime). A
member joins a room's broadcasts (``Joined``) after its join notice and confirmation, so a
hub that replays the room's last lines on ``join`` shows them right after the confirmation.
Room limits (``MAX_ROOMS``, per host) and the announcement threshold count this node's
members only.

Theory of operation: a line is sanitised first (C0/C1 controls but tab, DEL, bidi overrides
and line separators removed, trailing whitespace stripped), so nothing a client types can
drive another client's terminal. ``/quit`` and ``over`` are honoured before flood control:
leaving must always work. Every other line, empty or too long included, takes one token
from the client's ``TokenBucket``; a line without a token is dropped and counted, the first
drop of a burst tells the sender, and the next admitted line reports how many were lost.
An adapter that can stop reading a client (TCP) asks ``flood_wait(client, now)`` before each
line and holds the line until then, so nothing is dropped: the client is slowed down.
Then ``//text`` is a line of text ``/text``, ``/name args`` a command and anything else
text for the current room. Command handlers validate everything before changing state and
refuse with a private ``_Refused`` exception, turned into a single ``!!!`` reply.

Nicks: 1..``MAX_NICK_LENGTH`` ASCII letters, digits and ``_-[]{}|^``, not starting with a
digit or ``-``; unique ignoring case. ``guest<digits>`` is reserved: the core hands out
``guest1``, ``guest2``, ... from a counter that never goes back, so guest nicks never clash.
ASCII only, so that look-alike letters cannot impersonate someone.
Rooms: ``name`` or ``#name``, 1..``MAX_ROOM_NAME_LENGTH`` ASCII letters, digits, ``_`` or
``-``; canonical form ``#`` plus lower case (``Rust`` and ``#RUST`` are ``#rust``). A room
exists while it has a member.

Line protocol (server to client), the reference for clients and tests::

    [#room] <alice> hello                 text in a room (not echoed to alice)
    [#room] * alice waves                 /me (not echoed to alice)
    [#room] *** bob joined                bob joined the room        (these four: only in
    [#room] *** bob left                  bob used /part              rooms of at most
    [#room] *** bob quit (reason)         bob quit or was disconnected; "(reason)" if any
    [#room] *** alice is now known as al  nick change, in every room   ANNOUNCE_MAX_MEMBERS)
    -alice- text                          private message from alice
    -> bob: text                          echo of your /msg to bob
    *** text                              information for you only (welcome, /list, /who,
                                          /help, confirmations, flood notices, goodbye)
    !!! text                              error: your line was refused or dropped
    [#room] *** last 3 lines:             in a cluster, on joining a room: its last lines
                                          follow (``history_notice``)
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from netlib.sansio.ratelimit import TokenBucket

__all__ = [
    "ANNOUNCE_MAX_MEMBERS",
    "DEFAULT_ROOM",
    "FLOOD_BURST",
    "FLOOD_RATE",
    "MAX_CLIENTS",
    "MAX_LINE_LENGTH",
    "MAX_LIST_ROOMS",
    "MAX_NICK_LENGTH",
    "MAX_REASON_LENGTH",
    "MAX_ROOMS",
    "MAX_ROOMS_PER_CLIENT",
    "MAX_ROOMS_PER_HOST",
    "MAX_ROOM_NAME_LENGTH",
    "MAX_WHO_NICKS",
    "Broadcast",
    "ChatCore",
    "ChatStatistics",
    "Close",
    "Effect",
    "Joined",
    "Left",
    "ListQuery",
    "NickClaim",
    "NickRelease",
    "PrivateQuery",
    "Send",
    "WhoQuery",
    "history_notice",
]

DEFAULT_ROOM: Final = "#lobby"
"""The room every client lands in on ``connect``."""

MAX_LINE_LENGTH: Final = 4096
"""Longest line accepted, in characters, as received; longer lines get an error reply."""

MAX_NICK_LENGTH: Final = 32
"""Longest nickname, in characters."""

MAX_ROOM_NAME_LENGTH: Final = 32
"""Longest room name, in characters, without the leading ``#``."""

MAX_ROOMS: Final = 1000
"""Rooms that may exist at once, the default room not counted; more cannot be created."""

MAX_ROOMS_PER_CLIENT: Final = 10
"""Rooms one client may be in at once."""

MAX_ROOMS_PER_HOST: Final = 50
"""Rooms the clients of one host (``connect``'s ``source``) may have created and that still
exist: one host can hold at most 5% of ``MAX_ROOMS`` (without it, about 100 connections from
one address, 10 rooms each, used up all 1,000), and 50 is still five clients' worth of
``MAX_ROOMS_PER_CLIENT`` behind one NAT address."""

ANNOUNCE_MAX_MEMBERS: Final = 64
"""Largest room (members, the subject included) in which joins, parts, quits and nick
changes are announced. Above it they are not, so N joins cost O(N) deliveries instead of
O(N^2): 64 members is a conversation where arrivals matter, a bigger room an audience."""

MAX_CLIENTS: Final = 10_000
"""Clients connected at once; one more is told the server is full and closed."""

MAX_REASON_LENGTH: Final = 200
"""Longest quit or disconnect reason shown to others, in characters; longer ones are cut."""

MAX_WHO_NICKS: Final = 100
"""Nicks listed by one ``/who`` (the first in case-insensitive order); the rest are counted."""

MAX_LIST_ROOMS: Final = 100
"""Rooms listed by one ``/list`` (the first by name); the rest are counted."""

FLOOD_RATE: Final = 5.0
"""Lines per second a client may send in the long run."""

FLOOD_BURST: Final = 20
"""Lines a client may send at once before ``FLOOD_RATE`` applies."""

_NICK_CHARS: Final = r"A-Za-z_\[\]{}|^"
_NICK: Final = re.compile(f"[{_NICK_CHARS}][{_NICK_CHARS}0-9\\-]{{0,{MAX_NICK_LENGTH - 1}}}")
_GUEST: Final = re.compile(r"guest[0-9]+", re.IGNORECASE)
_ROOM: Final = re.compile(f"#?([A-Za-z0-9_-]{{1,{MAX_ROOM_NAME_LENGTH}}})")
_QUIT: Final = re.compile(r"/quit(?:\s+(?P<reason>.*))?", re.IGNORECASE | re.ASCII | re.DOTALL)
_NICK_RULES: Final = (
    f"1-{MAX_NICK_LENGTH} ASCII letters, digits or _-[]{{}}|^, not starting with a digit or -"
)
_ROOM_RULES: Final = (
    f"1-{MAX_ROOM_NAME_LENGTH} ASCII letters, digits, _ or -, optionally after one #"
)
_UNSAFE: Final = (
    *(c for c in range(0x20) if c != 0x09),  # C0 controls but tab (ESC, CR, LF, BEL, ...)
    *range(0x7F, 0xA0),  # DEL and C1 controls (0x9B is a one-byte CSI)
    *range(0x202A, 0x202F),  # bidi embeddings and overrides
    *range(0x2066, 0x206A),  # bidi isolates
    0x2028,  # line separator
    0x2029,  # paragraph separator
)
_SANITISE: Final[dict[int, None]] = dict.fromkeys(_UNSAFE)
_HELP: Final = (
    "*** commands:",
    "***   /nick <name>        change your nick",
    "***   /join <room>        join a room, or make it current; text goes to the current room",
    "***   /part [room]        leave a room (default: the current one)",
    "***   /list               rooms and their member counts",
    "***   /who [room]         members of a room (default: the current one)",
    "***   /msg <nick> <text>  private message",
    "***   /me <action>        action in the current room",
    "***   /quit [reason]      leave the chat; a line saying just 'over' does the same",
    "***   //text              send text that starts with /",
)


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver one line ``text`` to ``client``."""

    client: int
    text: str


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Deliver one line ``text`` to every member of ``room`` except ``exclude``.

    ``said`` marks what a member said (text, ``/me``), as opposed to a notice: a hub keeps
    it in the room's history and tells ``exclude`` (its sender) if it cannot deliver it.
    """

    room: str
    text: str
    exclude: int | None
    said: bool = False


@dataclass(frozen=True, slots=True)
class Close:
    """End ``client``'s session after delivering every earlier effect (``nick``: the nick
    it had, for the adapter's log; empty if it never had one)."""

    client: int
    reason: str
    nick: str = ""


@dataclass(frozen=True, slots=True)
class Joined:
    """``client`` is now a member of ``room``: subscribe it to the room's broadcasts."""

    client: int
    room: str


@dataclass(frozen=True, slots=True)
class Left:
    """``client`` is no longer a member of ``room``: unsubscribe it."""

    client: int
    room: str


@dataclass(frozen=True, slots=True)
class NickClaim:
    """Cluster mode: ask the cluster for ``nick`` on behalf of ``client``; answer with
    ``ChatCore.nick_claimed``. A ``guest`` nick (``guest_numbers`` made it unique) is only
    registered: no answer is expected, and ``nick_lost`` reports the rare clash."""

    client: int
    nick: str
    guest: bool = False


@dataclass(frozen=True, slots=True)
class NickRelease:
    """Cluster mode: this node no longer uses ``nick``; the cluster may give it away."""

    nick: str


@dataclass(frozen=True, slots=True)
class WhoQuery:
    """Cluster mode: ``client`` asked who is in ``room``; answer with ``who_answer``."""

    client: int
    room: str


@dataclass(frozen=True, slots=True)
class ListQuery:
    """Cluster mode: ``client`` asked for the rooms; answer with ``list_answer``."""

    client: int


@dataclass(frozen=True, slots=True)
class PrivateQuery:
    """Cluster mode: ``client`` (nick ``sender``) sends ``text`` to ``nick``, who is not on
    this node; answer with ``private_answer``."""

    client: int
    sender: str
    nick: str
    text: str


Effect: TypeAlias = (
    Send
    | Broadcast
    | Close
    | Joined
    | Left
    | NickClaim
    | NickRelease
    | WhoQuery
    | ListQuery
    | PrivateQuery
)
"""What the adapter must do, in the order the effects are returned."""


def history_notice(room: str, count: int) -> str:
    """The line that introduces the last ``count`` lines of ``room`` shown on joining it."""
    return f"[{room}] *** last {_count(count, 'line')}:"


@dataclass(frozen=True, slots=True)
class ChatStatistics:
    """Counters of a ``ChatCore``: current sizes and lines handled since it was created."""

    clients: int
    rooms: int
    lines_received: int
    lines_flood_dropped: int
    lines_too_long: int


@dataclass(slots=True, eq=False)
class _Client:
    """One connected client; ``rooms`` is ordered by last use, the current room last."""

    id: int
    nick: str
    bucket: TokenBucket
    source: Hashable  # the host, for MAX_ROOMS_PER_HOST
    rooms: dict[str, None] = field(default_factory=dict)
    throttled_drops: int = 0  # lines dropped in the current throttled burst
    claiming: str | None = None  # cluster mode: the nick asked for, until the answer

    @property
    def current(self) -> str:
        return next(reversed(self.rooms))


class _Refused(Exception):
    """A command is refused; the message becomes the ``!!!`` reply. Never leaves the module."""


class ChatCore:
    """Nicknames, rooms and commands of one chat node, with no I/O.

    Args:
        default_room: where clients land on ``connect`` (``name`` or ``#name``).
        flood_rate: lines per second a client may send in the long run.
        flood_burst: lines a client may send at once.
        max_rooms: rooms that may exist at once, the default room not counted.
        max_rooms_per_client: rooms one client may be in at once.
        max_rooms_per_host: rooms the clients of one ``source`` may have created (existing).
        announce_max_members: largest room in which membership changes are announced.
        max_clients: clients connected at once.
        max_line_length: longest line accepted, in characters.
        max_line_bytes: longest line the adapter accepts on the wire, in bytes, if it has
            such a limit (stated in the welcome; ``receive_overlong`` reports it).
        clustered: this core is one node of a cluster (see "Cluster mode" above).
        guest_numbers: returns the number of the next guest nick (``guest<N>``), or None
            when there is none to give (the connecting client is then refused); by default
            1, 2, 3, ... A cluster passes numbers no other node uses.

    Raises:
        ValueError: a setting is out of range or ``default_room`` is not a valid room name.

    Calling protocol: ``connect`` once per client id, then any number of ``receive_line``,
    then ``disconnect`` (not needed after a ``Close`` effect, harmless if repeated).
    """

    def __init__(
        self,
        *,
        default_room: str = DEFAULT_ROOM,
        flood_rate: float = FLOOD_RATE,
        flood_burst: float = FLOOD_BURST,
        max_rooms: int = MAX_ROOMS,
        max_rooms_per_client: int = MAX_ROOMS_PER_CLIENT,
        max_rooms_per_host: int = MAX_ROOMS_PER_HOST,
        announce_max_members: int = ANNOUNCE_MAX_MEMBERS,
        max_clients: int = MAX_CLIENTS,
        max_line_length: int = MAX_LINE_LENGTH,
        max_line_bytes: int | None = None,
        clustered: bool = False,
        guest_numbers: Callable[[], int | None] | None = None,
    ) -> None:
        room = _normalise_room(default_room)
        if room is None:
            raise ValueError(f"invalid default room {default_room!r}: use {_ROOM_RULES}")
        _require_positive(
            max_rooms=max_rooms,
            max_rooms_per_client=max_rooms_per_client,
            max_rooms_per_host=max_rooms_per_host,
            announce_max_members=announce_max_members,
            max_clients=max_clients,
            max_line_length=max_line_length,
            max_line_bytes=max_line_bytes or 1,
        )
        TokenBucket(flood_rate, flood_burst, 0.0)  # validates the flood settings
        self.default_room = room
        self.flood_rate = flood_rate
        self.flood_burst = flood_burst
        self.max_rooms = max_rooms
        self.max_rooms_per_client = max_rooms_per_client
        self.max_rooms_per_host = max_rooms_per_host
        self.announce_max_members = announce_max_members
        self.max_clients = max_clients
        self.max_line_length = max_line_length
        self.max_line_bytes = max_line_bytes
        self._clients: dict[int, _Client] = {}
        self._nicks: dict[str, int] = {}  # casefolded nick -> client id
        self._rooms: dict[str, set[int]] = {}  # canonical room -> member ids
        self._creator: dict[str, Hashable] = {}  # created room -> source of its creator
        self._created: dict[Hashable, int] = {}  # source -> rooms it created that exist
        self.clustered = clustered
        self._guest_numbers = guest_numbers or self._next_guest
        self._claims: dict[str, int] = {}  # cluster mode: casefolded nick asked for -> client
        self._guests = 0
        self._lines = self._flood_dropped = self._too_long = 0

    # -- the three inputs ---------------------------------------------------------------

    def connect(self, client_id: int, now: float, source: Hashable = None) -> list[Effect]:
        """Start a session: a guest nick, the default room, a welcome line.

        Args:
            source: the client's host (an IP address, say) for the per-host limits; None
                (the default) makes the client a host of its own.

        Raises:
            ValueError: ``client_id`` is already connected.
        """
        if client_id in self._clients:
            raise ValueError(f"client {client_id} is already connected")
        if len(self._clients) >= self.max_clients:
            full = f"!!! server full ({self.max_clients} clients): try again later"
            return [Send(client_id, full), Close(client_id, "server full")]
        guest = self._guest_numbers()
        if guest is None:
            busy = "!!! the chat cannot take new members now: try again later"
            return [Send(client_id, busy), Close(client_id, "no guest nick")]
        client = self._register(client_id, now, source, guest)
        effects: list[Effect] = []
        if self.clustered:
            effects.append(NickClaim(client_id, client.nick, guest=True))
        return effects + self._enter(client, self.default_room, self._welcome)

    def receive_line(self, client_id: int, text: str, now: float) -> list[Effect]:
        """Handle one line of text from ``client_id``, received at ``now``."""
        client = self._clients.get(client_id)
        if client is None:
            return []
        self._lines += 1
        line = _clean(text) if len(text) <= self.max_line_length else None
        if line is not None and (reason := _quit_reason(line)) is not None:
            return self._quit(client, reason)
        admitted, effects = self._flood_gate(client, now)
        if not admitted:
            return effects
        if line is None:
            return effects + self._too_long_reply(client, text)
        return effects + self._handle_line(client, line)

    def receive_overlong(self, client_id: int, now: float) -> list[Effect]:
        """Handle a line the adapter refused as longer than ``max_line_bytes`` on the wire
        (its bytes were discarded): it costs a token like any line and is refused."""
        client = self._clients.get(client_id)
        if client is None:
            return []
        self._lines += 1
        admitted, effects = self._flood_gate(client, now)
        if not admitted:
            return effects
        self._too_long += 1
        limit = f"limit {self.max_line_bytes} bytes" if self.max_line_bytes else "too many bytes"
        return effects + _error(client, f"line too long ({limit}): not sent")

    def flood_wait(self, client_id: int, now: float) -> float:
        """Seconds from ``now`` until ``client_id``'s next line passes flood control (0: it
        would now; also 0 for an unknown client). An adapter that can stop reading a client
        holds its next line that long instead of letting flood control drop it."""
        client = self._clients.get(client_id)
        return 0.0 if client is None else client.bucket.wait_time(1, now)

    def disconnect(self, client_id: int, reason: str) -> list[Effect]:
        """End ``client_id``'s session (gone, timed out, ...): quit notices in its rooms.

        Idempotent: an unknown or already disconnected client gives ``[]``.
        """
        client = self._clients.get(client_id)
        if client is None:
            return []
        return self._drop(client, _clean(reason).strip()[:MAX_REASON_LENGTH])

    # -- cluster mode: answers and messages from the cluster ------------------------------

    def nick_claimed(self, client_id: int, nick: str, refusal: str | None) -> list[Effect]:
        """The cluster's answer to ``NickClaim(client_id, nick)``: None grants the nick,
        else ``refusal`` says why not (``nick "x" is already taken``, ...)."""
        folded = nick.casefold()
        if self._claims.get(folded) == client_id:
            del self._claims[folded]
        client = self._clients.get(client_id)
        if client is None or nick != client.claiming:
            return [NickRelease(nick)] if refusal is None else []  # the client is gone
        client.claiming = None
        if refusal is not None:
            return _error(client, refusal)
        old = client.nick
        return [*self._rename(client, nick), NickRelease(old)]

    def nick_lost(self, nick: str) -> list[Effect]:
        """The cluster gave ``nick`` to someone else (it expired while this node could not
        renew it): its holder here becomes a guest, and is told why."""
        client_id = self._nicks.get(nick.casefold())
        if client_id is None:
            return []
        return self._lose_nick(self._clients[client_id])

    def _lose_nick(self, client: _Client) -> list[Effect]:
        lost = client.nick
        guest = self._guest_numbers()
        if guest is None:
            notice = f"!!! your nick {lost} was given to someone else; no guest nick is free"
            effects = self._drop(client, "nick lost")
            return [*effects, Send(client.id, notice), Close(client.id, "nick lost", lost)]
        nick = f"guest{guest}"
        notice = (
            f"!!! your nick {lost} was given to someone else while the chat was degraded; "
            f"you are now {nick}"
        )
        return [NickClaim(client.id, nick, guest=True), *self._rename(client, nick, notice)]

    def who_answer(
        self, client_id: int, room: str, count: int, nicks: Sequence[str], note: str = ""
    ) -> list[Effect]:
        """Answer ``/who room``: ``count`` members, of which ``nicks`` (any order, at most
        ``MAX_WHO_NICKS`` are shown); ``note`` is added in parentheses (an incomplete
        answer, say)."""
        if client_id not in self._clients:
            return []
        more = f" ({note})" if note else ""
        if count == 0:
            return [Send(client_id, f"!!! no such room {room}{more}")]
        shown = heapq.nsmallest(MAX_WHO_NICKS, nicks, key=str.casefold)
        hidden = _more(count - len(shown))
        header = f"{room} ({_count(count, 'member')})"
        return [Send(client_id, f"*** {header}: {' '.join(shown)}{hidden}{more}")]

    def list_answer(
        self, client_id: int, rooms: Mapping[str, int], note: str = ""
    ) -> list[Effect]:
        """Answer ``/list``: ``rooms`` maps each room to its member count; ``note`` is added
        in parentheses."""
        if client_id not in self._clients:
            return []
        names = sorted(rooms)
        shown = ", ".join(f"{room} ({rooms[room]})" for room in names[:MAX_LIST_ROOMS])
        more = _more(len(names) - MAX_LIST_ROOMS) + (f" ({note})" if note else "")
        return [Send(client_id, f"*** {_count(len(names), 'room')}: {shown}{more}")]

    def private_answer(
        self, client_id: int, nick: str, text: str, delivered_to: str | None, refusal: str = ""
    ) -> list[Effect]:
        """Answer ``PrivateQuery``: the message reached ``delivered_to`` (the nick as its
        holder spells it), or nobody (``refusal`` says why; default: no such nick)."""
        if client_id not in self._clients:
            return []
        if delivered_to is None:
            reason = refusal or f'no such nick "{nick}"'
            return [Send(client_id, f"!!! {reason}")]
        return [Send(client_id, f"-> {delivered_to}: {text}")]

    def deliver_private(
        self, sender: str, nick: str, text: str
    ) -> tuple[str | None, list[Effect]]:
        """A private message from ``sender`` on another node to ``nick``: the nick as its
        holder here spells it and the effects, or ``(None, [])`` if nobody here has it."""
        target = self._nicks.get(nick.casefold())
        if target is None:
            return None, []
        line = f"-{_clean(sender)}- {_clean(text)}"
        return self._clients[target].nick, [Send(target, line)]

    def local_who(self, room: str) -> tuple[int, list[str]]:
        """Members of ``room`` on this node: how many, and the first ``MAX_WHO_NICKS`` nicks
        in case-insensitive order."""
        members = self._rooms.get(_normalise_room(room) or "", ())
        nicks = (self._clients[member].nick for member in members)
        return len(members), heapq.nsmallest(MAX_WHO_NICKS, nicks, key=str.casefold)

    def local_rooms(self) -> dict[str, int]:
        """The rooms of this node and their member counts."""
        return {room: len(members) for room, members in self._rooms.items()}

    def clients(self) -> list[int]:
        """The ids of the connected clients."""
        return list(self._clients)

    # -- read-only queries --------------------------------------------------------------

    def nick_of(self, client_id: int) -> str | None:
        """Return the nick of a connected client, else None."""
        client = self._clients.get(client_id)
        return None if client is None else client.nick

    def rooms_of(self, client_id: int) -> tuple[str, ...]:
        """Return the client's rooms, least recently used first (the current room last)."""
        client = self._clients.get(client_id)
        return () if client is None else tuple(client.rooms)

    def current_room(self, client_id: int) -> str | None:
        """Return the room the client's plain text goes to, or None if not connected."""
        client = self._clients.get(client_id)
        return None if client is None else client.current

    def members(self, room: str) -> frozenset[int]:
        """Return the ids of ``room``'s members (``name`` or ``#name``, any case)."""
        return frozenset(self._rooms.get(_normalise_room(room) or "", ()))

    def statistics(self) -> ChatStatistics:
        """Return the current counters."""
        return ChatStatistics(
            clients=len(self._clients),
            rooms=len(self._rooms),
            lines_received=self._lines,
            lines_flood_dropped=self._flood_dropped,
            lines_too_long=self._too_long,
        )

    # -- sessions and membership --------------------------------------------------------

    def _next_guest(self) -> int:
        self._guests += 1
        return self._guests

    def _register(self, client_id: int, now: float, source: Hashable, guest: int) -> _Client:
        nick = f"guest{guest}"
        bucket = TokenBucket(self.flood_rate, self.flood_burst, now)
        key = ("client", client_id) if source is None else source
        client = _Client(client_id, nick, bucket, key)
        self._clients[client_id] = client
        self._nicks[nick] = client_id
        return client

    def limits(self) -> str:
        """The limits a client must keep to, as the welcome states them."""
        size = f"{self.max_line_length} characters"
        if self.max_line_bytes is not None:
            size += f" ({self.max_line_bytes} bytes)"
        return f"lines up to {size}, {self.flood_rate:g} lines/s, bursts of {self.flood_burst:g}"

    def _welcome(self, client: _Client) -> str:
        return (
            f"*** welcome, {client.nick}! you are in {client.current}; "
            f"/nick <name> to choose a nick, /help for commands; limits: {self.limits()}"
        )

    def _enter(
        self, client: _Client, room: str, confirmation: Callable[[_Client], str]
    ) -> list[Effect]:
        """Join ``room``: the join notice, ``confirmation(client)`` to the client, and its
        subscription (first on one node; last in a cluster, so a hub's replay of the
        room's last lines follows the confirmation)."""
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = set()
            if room != self.default_room:
                self._creator[room] = client.source
                self._created[client.source] = self._created.get(client.source, 0) + 1
        members.add(client.id)
        client.rooms[room] = None
        effects: list[Effect] = []
        if len(members) <= self.announce_max_members:
            notice = f"[{room}] *** {client.nick} joined"
            effects.append(Broadcast(room, notice, exclude=client.id))
        effects.append(Send(client.id, confirmation(client)))
        if self.clustered:
            effects.append(Joined(client.id, room))
        else:
            effects.insert(0, Joined(client.id, room))
        return effects

    def _exit(self, client: _Client, room: str, notice: str) -> list[Effect]:
        effects: list[Effect] = []
        members = self._rooms[room]
        if len(members) <= self.announce_max_members:
            text = f"[{room}] *** {client.nick} {notice}"
            effects.append(Broadcast(room, text, exclude=client.id))
        del client.rooms[room]
        members.discard(client.id)
        if not members:
            del self._rooms[room]
            self._forget_creator(room)
        effects.append(Left(client.id, room))
        return effects

    def _forget_creator(self, room: str) -> None:
        source = self._creator.pop(room, None)
        if source is None:
            return
        if (count := self._created[source] - 1) > 0:
            self._created[source] = count
        else:
            del self._created[source]

    def _drop(self, client: _Client, reason: str) -> list[Effect]:
        notice = f"quit ({reason})" if reason else "quit"
        effects: list[Effect] = []
        for room in list(client.rooms):
            effects.extend(self._exit(client, room, notice))
        del self._clients[client.id]
        del self._nicks[client.nick.casefold()]
        if self.clustered:
            effects.append(NickRelease(client.nick))
            if client.claiming is not None:  # its answer will find the client gone
                client.claiming = None
        return effects

    def _quit(self, client: _Client, reason: str) -> list[Effect]:
        effects = self._drop(client, reason)
        effects += [Send(client.id, "*** goodbye"), Close(client.id, "quit", client.nick)]
        return effects

    # -- lines ----------------------------------------------------------------------------

    def _flood_gate(self, client: _Client, now: float) -> tuple[bool, list[Effect]]:
        if client.bucket.try_take(1, now):
            return True, self._flood_lifted(client)
        self._flood_dropped += 1
        client.throttled_drops += 1
        if client.throttled_drops > 1:
            return False, []
        rate, burst = self.flood_rate, self.flood_burst
        notice = f"!!! flood control: lines dropped; at most {rate:g} per second (burst {burst:g})"
        return False, [Send(client.id, notice)]

    def _flood_lifted(self, client: _Client) -> list[Effect]:
        dropped, client.throttled_drops = client.throttled_drops, 0
        if not dropped:
            return []
        return [Send(client.id, f"*** flood control lifted: {_count(dropped, 'line')} dropped")]

    def _too_long_reply(self, client: _Client, text: str) -> list[Effect]:
        self._too_long += 1
        limit = self.max_line_length
        return _error(client, f"line too long ({len(text)} characters, limit {limit}): dropped")

    def _handle_line(self, client: _Client, line: str) -> list[Effect]:
        if not line:
            return []
        if line.startswith("//"):
            return self._say(client, line[1:])
        if line.startswith("/"):
            return self._command(client, line[1:])
        return self._say(client, line)

    def _say(self, client: _Client, text: str) -> list[Effect]:
        room = client.current
        line = f"[{room}] <{client.nick}> {text}"
        return [Broadcast(room, line, exclude=client.id, said=True)]

    def _command(self, client: _Client, body: str) -> list[Effect]:
        try:
            name, rest = _split_command(body)
            handler = _COMMANDS.get(name)
            if handler is None:
                raise _Refused(f"unknown command /{name}; type /help")
            return handler(self, client, rest)
        except _Refused as refusal:
            return _error(client, str(refusal))

    # -- commands: validate everything, raise _Refused, then change state ----------------

    def _cmd_nick(self, client: _Client, rest: str) -> list[Effect]:
        nick = _one_arg(rest, "/nick <name>")
        if nick == client.nick:
            return [Send(client.id, f"*** you are already known as {nick}")]
        self._check_nick(client, nick)
        if not self.clustered:
            return self._rename(client, nick)
        if client.claiming is not None:
            raise _Refused(f'your change to "{client.claiming}" is still being checked')
        client.claiming = nick
        self._claims[nick.casefold()] = client.id
        return [NickClaim(client.id, nick)]

    def _check_nick(self, client: _Client, nick: str) -> None:
        if not _NICK.fullmatch(nick):
            raise _Refused(f'invalid nick "{nick}": use {_NICK_RULES}')
        if _GUEST.fullmatch(nick):
            raise _Refused(f'nick "{nick}" is reserved for guests')
        folded = nick.casefold()
        if self._nicks.get(folded, self._claims.get(folded, client.id)) != client.id:
            raise _Refused(f'nick "{nick}" is already taken')

    def _rename(self, client: _Client, nick: str, notice: str = "") -> list[Effect]:
        old = client.nick
        del self._nicks[old.casefold()]
        self._nicks[nick.casefold()] = client.id
        client.nick = nick
        effects: list[Effect] = [
            Broadcast(room, f"[{room}] *** {old} is now known as {nick}", exclude=client.id)
            for room in client.rooms
            if len(self._rooms[room]) <= self.announce_max_members
        ]
        effects.append(Send(client.id, notice or f"*** you are now known as {nick}"))
        return effects

    def _cmd_join(self, client: _Client, rest: str) -> list[Effect]:
        room = _valid_room(_one_arg(rest, "/join <room>"))
        if room in client.rooms:
            del client.rooms[room]  # re-insert: it becomes the current room
            client.rooms[room] = None
            return [Send(client.id, f"*** plain text now goes to {room}")]
        self._check_join(client, room)
        here = " on this server" if self.clustered else ""

        def confirmation(client: _Client) -> str:
            members = _count(len(self._rooms[room]), "member")
            return f"*** you joined {room} ({members}{here}); text goes there"

        return self._enter(client, room, confirmation)

    def _check_join(self, client: _Client, room: str) -> None:
        if len(client.rooms) >= self.max_rooms_per_client:
            joined = _count(len(client.rooms), "room")
            limit = self.max_rooms_per_client
            raise _Refused(f"cannot join {room}: you are in {joined} (limit {limit})")
        if room in self._rooms or room == self.default_room:
            return
        created = len(self._rooms) - (self.default_room in self._rooms)
        if created >= self.max_rooms:
            rooms, limit = _count(created, "room"), self.max_rooms
            raise _Refused(f"cannot create {room}: the server has {rooms} (limit {limit})")
        by_host = self._created.get(client.source, 0)
        if by_host >= self.max_rooms_per_host:
            rooms, limit = _count(by_host, "room"), self.max_rooms_per_host
            raise _Refused(f"cannot create {room}: your host has created {rooms} (limit {limit})")

    def _cmd_part(self, client: _Client, rest: str) -> list[Effect]:
        room = self._room_arg(client, rest, "/part [room]")
        if room not in client.rooms:
            raise _Refused(f"you are not in {room}")
        if len(client.rooms) == 1:
            raise _Refused(f"cannot leave {room}: it is your only room (/join another first)")
        effects = self._exit(client, room, "left")
        effects.append(Send(client.id, f"*** you left {room}; text goes to {client.current}"))
        return effects

    def _cmd_list(self, client: _Client, rest: str) -> list[Effect]:
        if rest:
            raise _Refused("usage: /list")
        if self.clustered:
            return [ListQuery(client.id)]
        return self.list_answer(client.id, self.local_rooms())

    def _cmd_who(self, client: _Client, rest: str) -> list[Effect]:
        room = self._room_arg(client, rest, "/who [room]")
        if self.clustered:
            return [WhoQuery(client.id, room)]
        return self.who_answer(client.id, room, *self.local_who(room))

    def _cmd_msg(self, client: _Client, rest: str) -> list[Effect]:
        parts = rest.split(None, 1)
        if len(parts) != 2:
            raise _Refused("usage: /msg <nick> <text>")
        nick, text = parts
        target = self._nicks.get(nick.casefold())
        if target is None and self.clustered and _NICK.fullmatch(nick):
            return [PrivateQuery(client.id, client.nick, nick, text)]
        if target is None:
            raise _Refused(f'no such nick "{nick}"')
        if target == client.id:
            raise _Refused("you cannot /msg yourself")
        echo = f"-> {self._clients[target].nick}: {text}"
        return [Send(target, f"-{client.nick}- {text}"), Send(client.id, echo)]

    def _cmd_me(self, client: _Client, rest: str) -> list[Effect]:
        if not rest:
            raise _Refused("usage: /me <action>")
        room = client.current
        return [Broadcast(room, f"[{room}] * {client.nick} {rest}", exclude=client.id, said=True)]

    def _cmd_help(self, client: _Client, rest: str) -> list[Effect]:
        return [Send(client.id, line) for line in _HELP]

    def _room_arg(self, client: _Client, rest: str, usage: str) -> str:
        args = rest.split()
        if len(args) > 1:
            raise _Refused(f"usage: {usage}")
        return _valid_room(args[0]) if args else client.current


_Handler: TypeAlias = Callable[[ChatCore, _Client, str], list[Effect]]

_COMMANDS: Final[dict[str, _Handler]] = {
    "nick": ChatCore._cmd_nick,
    "join": ChatCore._cmd_join,
    "part": ChatCore._cmd_part,
    "list": ChatCore._cmd_list,
    "who": ChatCore._cmd_who,
    "msg": ChatCore._cmd_msg,
    "me": ChatCore._cmd_me,
    "help": ChatCore._cmd_help,
}  # /quit is handled before flood control, in ChatCore.receive_line


def _clean(text: str) -> str:
    """Remove terminal-unsafe characters and trailing whitespace."""
    return text.translate(_SANITISE).rstrip()


def _quit_reason(line: str) -> str | None:
    """Return the reason if ``line`` ends the session (``/quit [reason]`` or ``over``)."""
    if line.strip().casefold() == "over":
        return "over"
    match = _QUIT.fullmatch(line)
    if match is None:
        return None
    return (match["reason"] or "").strip()[:MAX_REASON_LENGTH]


def _split_command(body: str) -> tuple[str, str]:
    """Split the text after ``/`` into a lower-case command name and its arguments."""
    if not body or body[0].isspace():
        raise _Refused("empty command; type /help")
    parts = body.split(None, 1)
    return parts[0].casefold(), parts[1] if len(parts) == 2 else ""


def _one_arg(rest: str, usage: str) -> str:
    args = rest.split()
    if len(args) != 1:
        raise _Refused(f"usage: {usage}")
    return args[0]


def _normalise_room(name: str) -> str | None:
    """Return the canonical ``#name`` of a room, or None if ``name`` is not valid."""
    match = _ROOM.fullmatch(name)
    return None if match is None else "#" + match[1].lower()


def _valid_room(name: str) -> str:
    room = _normalise_room(name)
    if room is None:
        raise _Refused(f'invalid room "{name}": use {_ROOM_RULES}')
    return room


def _error(client: _Client, message: str) -> list[Effect]:
    return [Send(client.id, f"!!! {message}")]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _more(hidden: int) -> str:
    return f" (+{hidden} more)" if hidden > 0 else ""


def _require_positive(**limits: int) -> None:
    for name, value in limits.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
