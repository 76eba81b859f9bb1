"""ChatCore in cluster mode: what only the cluster knows becomes a question and an answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netlib.sansio.chat import (
    MAX_WHO_NICKS,
    Broadcast,
    ChatCore,
    Close,
    Effect,
    Joined,
    ListQuery,
    NickClaim,
    NickRelease,
    PrivateQuery,
    Send,
    WhoQuery,
    history_notice,
)

T0 = 100.0


def guests(start: int) -> Iterator[int]:
    yield from range(start, start + 1000)


def node(start: int = 101) -> ChatCore:
    """A node whose guest numbers start at ``start`` (as the cluster hands them out)."""
    numbers = guests(start)
    return ChatCore(clustered=True, guest_numbers=lambda: next(numbers, None))


def say(core: ChatCore, client: int, text: str) -> list[Effect]:
    return core.receive_line(client, text, T0)


def named(core: ChatCore, **clients: int) -> ChatCore:
    """Connect the clients and grant them their nicks."""
    for nick, client in clients.items():
        core.connect(client, T0)
        assert say(core, client, f"/nick {nick}") == [NickClaim(client, nick)]
        core.nick_claimed(client, nick, None)
    return core


def test_a_guest_gets_a_cluster_number_is_registered_and_subscribed_after_its_welcome() -> None:
    effects = node().connect(7, T0)
    assert effects[0] == NickClaim(7, "guest101", guest=True)
    assert effects[1] == Broadcast("#lobby", "[#lobby] *** guest101 joined", exclude=7)
    assert isinstance(effects[2], Send)
    assert effects[2].text.startswith("*** welcome, guest101!")
    assert effects[3] == Joined(7, "#lobby")  # last: a hub's history follows the welcome
    assert len(effects) == 4


def test_without_a_guest_number_a_client_is_refused() -> None:
    core = ChatCore(clustered=True, guest_numbers=lambda: None)
    assert core.connect(1, T0) == [
        Send(1, "!!! the chat cannot take new members now: try again later"),
        Close(1, "no guest nick"),
    ]
    assert core.statistics().clients == 0


def test_a_nick_changes_only_once_the_cluster_grants_it() -> None:
    core = node()
    core.connect(1, T0)
    assert say(core, 1, "/nick alice") == [NickClaim(1, "alice")]
    assert core.nick_of(1) == "guest101"  # meanwhile the client talks as before
    assert say(core, 1, "hi")[0] == Broadcast("#lobby", "[#lobby] <guest101> hi", 1, True)
    assert say(core, 1, "/nick al") == [
        Send(1, '!!! your change to "alice" is still being checked')
    ]
    assert core.nick_claimed(1, "alice", None) == [
        Broadcast("#lobby", "[#lobby] *** guest101 is now known as alice", exclude=1),
        Send(1, "*** you are now known as alice"),
        NickRelease("guest101"),
    ]
    assert core.nick_of(1) == "alice"


def test_a_nick_asked_for_here_is_taken_for_the_others_here_until_the_answer() -> None:
    core = node()
    core.connect(1, T0)
    core.connect(2, T0)
    say(core, 1, "/nick alice")
    assert say(core, 2, "/nick ALICE") == [Send(2, '!!! nick "ALICE" is already taken')]
    assert core.nick_claimed(1, "alice", 'nick "alice" is already taken') == [
        Send(1, '!!! nick "alice" is already taken')
    ]
    assert say(core, 2, "/nick ALICE") == [NickClaim(2, "ALICE")]  # free again here


def test_a_nick_granted_after_its_client_left_is_given_back() -> None:
    core = node()
    core.connect(1, T0)
    say(core, 1, "/nick alice")
    assert NickRelease("guest101") in core.disconnect(1, "gone")
    assert core.nick_claimed(1, "alice", None) == [NickRelease("alice")]
    core.connect(2, T0)
    say(core, 2, "/nick bob")
    core.disconnect(2, "gone")
    assert core.nick_claimed(2, "bob", "taken") == []


def test_who_and_list_are_questions_answered_by_the_cluster() -> None:
    core = named(node(), alice=1)
    assert say(core, 1, "/who") == [WhoQuery(1, "#lobby")]
    assert say(core, 1, "/who Rust") == [WhoQuery(1, "#rust")]
    assert say(core, 1, "/who bad room") == [Send(1, "!!! usage: /who [room]")]
    assert say(core, 1, "/list") == [ListQuery(1)]
    assert core.who_answer(1, "#lobby", 3, ["bob", "alice", "Carol"]) == [
        Send(1, "*** #lobby (3 members): alice bob Carol")
    ]
    assert core.who_answer(1, "#rust", 0, [], "this server only: down") == [
        Send(1, "!!! no such room #rust (this server only: down)")
    ]
    many = [f"n{i:03}" for i in range(MAX_WHO_NICKS + 20)]
    (answer,) = core.who_answer(1, "#big", 500, many, "2 of 3 servers answered")
    assert isinstance(answer, Send)
    assert answer.text.endswith(" n099 (+400 more) (2 of 3 servers answered)")
    assert core.list_answer(1, {"#b": 2, "#a": 5}) == [Send(1, "*** 2 rooms: #a (5), #b (2)")]
    assert core.who_answer(9, "#lobby", 1, ["x"]) == []  # the client left meanwhile


def test_a_private_message_to_a_nick_not_here_asks_the_cluster() -> None:
    core = named(node(), alice=1, bob=2)
    assert say(core, 1, "/msg BOB hi") == [Send(2, "-alice- hi"), Send(1, "-> bob: hi")]
    assert say(core, 1, "/msg carol hi there") == [PrivateQuery(1, "alice", "carol", "hi there")]
    assert say(core, 1, "/msg 9lives hi") == [Send(1, '!!! no such nick "9lives"')]
    assert core.private_answer(1, "carol", "hi there", "Carol") == [Send(1, "-> Carol: hi there")]
    assert core.private_answer(1, "carol", "hi", None) == [Send(1, '!!! no such nick "carol"')]
    assert core.private_answer(1, "carol", "hi", None, "not delivered: down") == [
        Send(1, "!!! not delivered: down")
    ]


def test_a_private_message_from_another_node_reaches_its_nick_here() -> None:
    core = named(node(), Bob=2)
    assert core.deliver_private("alice", "bob", "psst\x1b[2J") == (
        "Bob",
        [Send(2, "-alice- psst[2J")],  # what reaches a terminal is sanitised here too
    )
    assert core.deliver_private("alice", "nobody", "psst") == (None, [])


def test_a_nick_the_cluster_gave_away_makes_its_holder_a_guest_again() -> None:
    core = named(node(), alice=1)
    assert core.nick_lost("ALICE") == [
        NickClaim(1, "guest102", guest=True),
        Broadcast("#lobby", "[#lobby] *** alice is now known as guest102", exclude=1),
        Send(
            1,
            "!!! your nick alice was given to someone else while the chat was degraded; "
            "you are now guest102",
        ),
    ]
    assert core.nick_lost("nobody") == []


def test_a_nick_lost_with_no_guest_number_left_ends_the_session() -> None:
    numbers = iter([101])
    core = ChatCore(clustered=True, guest_numbers=lambda: next(numbers, None))
    core.connect(1, T0)
    say(core, 1, "/nick alice")
    core.nick_claimed(1, "alice", None)
    effects = core.nick_lost("alice")
    assert effects[-1] == Close(1, "nick lost", "alice")
    assert core.nick_of(1) is None


def test_joining_a_room_subscribes_after_the_confirmation_and_counts_this_node() -> None:
    core = named(node(), alice=1)
    assert say(core, 1, "/join Rust") == [
        Broadcast("#rust", "[#rust] *** alice joined", exclude=1),
        Send(1, "*** you joined #rust (1 member on this server); text goes there"),
        Joined(1, "#rust"),
    ]
    assert core.local_who("#RUST") == (1, ["alice"])
    assert core.local_rooms() == {"#lobby": 1, "#rust": 1}


def test_what_members_say_is_marked_and_notices_are_not() -> None:
    core = named(node(), alice=1)
    assert say(core, 1, "hello") == [Broadcast("#lobby", "[#lobby] <alice> hello", 1, True)]
    assert say(core, 1, "/me waves") == [Broadcast("#lobby", "[#lobby] * alice waves", 1, True)]
    quit_effects = say(core, 1, "/quit bye")
    assert quit_effects[0] == Broadcast("#lobby", "[#lobby] *** alice quit (bye)", 1)
    assert NickRelease("alice") in quit_effects


@pytest.mark.parametrize(("count", "text"), [(1, "last 1 line"), (3, "last 3 lines")])
def test_the_history_notice(count: int, text: str) -> None:
    assert history_notice("#rust", count) == f"[#rust] *** {text}:"
