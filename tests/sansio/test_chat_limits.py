"""Chat core limits against one host or one crowd: rooms per host, bounded announcements.

No loop, no sockets, no sleeps; time is an argument.
"""

from __future__ import annotations

from collections.abc import Sequence

from netlib.sansio.chat import (
    ANNOUNCE_MAX_MEMBERS,
    MAX_ROOMS,
    MAX_ROOMS_PER_CLIENT,
    MAX_ROOMS_PER_HOST,
    Broadcast,
    ChatCore,
    Effect,
    Send,
)

T0 = 1000.0


def test_defaults_are_named() -> None:
    assert (MAX_ROOMS_PER_HOST, ANNOUNCE_MAX_MEMBERS) == (50, 64)


# -- rooms per host ---------------------------------------------------------------------------


def _create_rooms(core: ChatCore, client: int, prefix: str) -> list[str]:
    """Have ``client`` try to create as many rooms as it may join (the lobby is one of its
    ``MAX_ROOMS_PER_CLIENT``); return the refusals."""
    refusals: list[str] = []
    for n in range(MAX_ROOMS_PER_CLIENT - 1):
        effects = core.receive_line(client, f"/join {prefix}{n}", T0 + client)
        refusals.extend(
            e.text for e in effects if isinstance(e, Send) and e.text.startswith("!!!")
        )
    return refusals


def test_one_host_cannot_use_up_the_room_cap() -> None:
    """112 connections from one address, 9 rooms each, used to exhaust the 1,000 rooms."""
    core = ChatCore(flood_burst=100)
    refused = []
    for client in range(1, 113):
        core.connect(client, T0, source="192.0.2.7")
        refused += _create_rooms(core, client, f"c{client}-")
    rooms = core.statistics().rooms - 1  # the lobby is not counted
    assert rooms == MAX_ROOMS_PER_HOST
    assert len(refused) == 112 * (MAX_ROOMS_PER_CLIENT - 1) - MAX_ROOMS_PER_HOST
    assert "your host has created 50 rooms (limit 50)" in refused[0]
    core.connect(1000, T0, source="198.51.100.1")  # another host still creates rooms
    assert _create_rooms(core, 1000, "other-") == []
    assert rooms + MAX_ROOMS_PER_CLIENT < MAX_ROOMS


def test_joining_an_existing_room_is_not_creating_one() -> None:
    core = ChatCore(max_rooms_per_host=1)
    core.connect(1, T0, source="h")
    core.connect(2, T0, source="h")
    assert _create_rooms(core, 1, "r")[0].endswith("(limit 1)")
    assert core.receive_line(2, "/join r0", T0)[-1] == Send(
        2, "*** you joined #r0 (2 members); text goes there"
    )


def test_a_room_that_ends_frees_its_creators_slot() -> None:
    core = ChatCore(max_rooms_per_host=1)
    core.connect(1, T0, source="h")
    core.receive_line(1, "/join first", T0)
    core.receive_line(1, "/part first", T0)  # the room is gone with its last member
    effects = core.receive_line(1, "/join second", T0)
    assert effects[-1].text.startswith("*** you joined #second")  # type: ignore[union-attr]
    core.disconnect(1, "gone")
    core.connect(2, T0, source="h")
    assert _create_rooms(core, 2, "again")[1:] != []  # one created, the rest refused


def test_without_a_source_each_client_is_its_own_host() -> None:
    core = ChatCore(max_rooms_per_host=2, flood_burst=100)
    for client in range(1, 6):
        core.connect(client, T0)
        assert len(_create_rooms(core, client, f"c{client}-")) == MAX_ROOMS_PER_CLIENT - 3
    assert core.statistics().rooms == 1 + 5 * 2


# -- announcements stay linear ----------------------------------------------------------------


def _deliveries(core: ChatCore, effects: Sequence[Effect]) -> int:
    """Lines these effects put on the wire (a broadcast reaches the room but its subject)."""
    count = 0
    for effect in effects:
        match effect:
            case Send():
                count += 1
            case Broadcast(room, _text, exclude):
                members = core.members(room)
                count += len(members) - (exclude in members)
    return count


def test_filling_and_emptying_a_lobby_costs_linear_deliveries() -> None:
    n = 2000
    core = ChatCore(max_clients=n)
    total = 0
    for client in range(1, n + 1):
        total += _deliveries(core, core.connect(client, T0))
        total += _deliveries(core, core.receive_line(client, f"/nick user{client}", T0))
    for client in range(1, n + 1):
        total += _deliveries(core, core.disconnect(client, "bye"))
    # 2 lines to each client for itself, plus announcements while the room was small:
    # 64 * 63 / 2 each for joins and nick changes on the way up, and for quits on the way
    # down. (Announcing everything cost about 3 * n * n / 2 = 6,000,000.)
    small_room = ANNOUNCE_MAX_MEMBERS * (ANNOUNCE_MAX_MEMBERS - 1) // 2
    assert total <= 2 * n + 3 * small_room
    assert total <= 6 * n  # a linear bound for n = 2,000


def test_a_small_room_still_hears_joins_and_leaves() -> None:
    core = ChatCore()
    core.connect(1, T0)
    joined = core.connect(2, T0)
    assert Broadcast("#lobby", "[#lobby] *** guest2 joined", exclude=2) in joined
    assert core.disconnect(2, "")[0] == Broadcast("#lobby", "[#lobby] *** guest2 quit", 2)
