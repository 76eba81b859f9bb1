"""Tests for the sans-I/O chat core: no loop, no sockets, no sleeps; time is an argument."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netlib.sansio import chat
from netlib.sansio.chat import (
    FLOOD_BURST,
    FLOOD_RATE,
    MAX_LINE_LENGTH,
    MAX_NICK_LENGTH,
    MAX_REASON_LENGTH,
    MAX_ROOM_NAME_LENGTH,
    Broadcast,
    ChatCore,
    Close,
    Effect,
    Joined,
    Left,
    Send,
)

T0 = 1000.0


def make(**settings: int | float | str) -> ChatCore:
    return ChatCore(**settings)  # type: ignore[arg-type]


def connected(core: ChatCore, *ids: int) -> ChatCore:
    for client_id in ids:
        core.connect(client_id, T0)
    return core


def named(core: ChatCore, **nicks: int) -> ChatCore:
    """Connect each client and give it a nick: named(core, alice=1, bob=2)."""
    for nick, client_id in nicks.items():
        core.connect(client_id, T0)
        core.receive_line(client_id, f"/nick {nick}", T0)
    return core


def say(core: ChatCore, client_id: int, text: str) -> list[Effect]:
    return core.receive_line(client_id, text, T0)


def reply(core: ChatCore, client_id: int, text: str) -> str:
    """Send one line and return the single reply it must give its sender."""
    effects = say(core, client_id, text)
    assert len(effects) == 1, effects
    assert isinstance(effects[0], Send), effects
    assert effects[0].client == client_id
    return effects[0].text


def error(core: ChatCore, client_id: int, text: str) -> str:
    answer = reply(core, client_id, text)
    assert answer.startswith("!!! "), answer
    return answer


# -- connect, welcome, guest nicks ----------------------------------------------------------------


def test_connect_joins_default_room_then_welcomes() -> None:
    core = ChatCore()
    assert core.connect(7, T0) == [
        Joined(7, "#lobby"),
        Broadcast("#lobby", "[#lobby] *** guest1 joined", exclude=7),
        Send(
            7,
            "*** welcome, guest1! you are in #lobby; /nick <name> to choose a nick, "
            "/help for commands; limits: lines up to 4096 characters, 5 lines/s, bursts of 20",
        ),
    ]
    assert core.nick_of(7) == "guest1"
    assert core.rooms_of(7) == ("#lobby",)
    assert core.current_room(7) == "#lobby"
    assert core.members("lobby") == {7}


def test_guest_nicks_are_unique_and_never_reused() -> None:
    core = connected(ChatCore(), 1, 2)
    core.disconnect(1, "gone")
    core.connect(3, T0)
    assert [core.nick_of(i) for i in (1, 2, 3)] == [None, "guest2", "guest3"]


def test_custom_default_room_is_normalised() -> None:
    core = connected(ChatCore(default_room="Main"), 1)
    assert core.rooms_of(1) == ("#main",)


def test_connecting_a_connected_id_is_an_api_error() -> None:
    core = connected(ChatCore(), 1)
    with pytest.raises(ValueError, match="already connected"):
        core.connect(1, T0)


def test_server_full_replies_and_closes_without_registering() -> None:
    core = connected(ChatCore(max_clients=1), 1)
    assert core.connect(2, T0) == [
        Send(2, "!!! server full (1 clients): try again later"),
        Close(2, "server full"),
    ]
    assert core.nick_of(2) is None
    assert say(core, 2, "hello") == []
    assert core.disconnect(2, "bye") == []


@pytest.mark.parametrize(
    "settings",
    [
        {"default_room": "no spaces"},
        {"default_room": "##x"},
        {"max_rooms": 0},
        {"max_rooms_per_client": 0},
        {"max_clients": 0},
        {"max_line_length": 0},
        {"flood_rate": 0},
        {"flood_burst": 0.5},
    ],
)
def test_bad_settings_raise(settings: dict[str, int | float | str]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each setting has its own message
        make(**settings)


def test_queries_for_unknown_clients_and_rooms() -> None:
    core = ChatCore()
    assert core.nick_of(9) is None
    assert core.rooms_of(9) == ()
    assert core.current_room(9) is None
    assert core.members("#nowhere") == frozenset()
    assert core.members("not a room!") == frozenset()


def test_lines_from_unknown_clients_are_ignored() -> None:
    assert say(ChatCore(), 9, "hello") == []


# -- plain text, sanitising, line rules -----------------------------------------------------------


def test_text_goes_to_the_room_but_not_back_to_the_sender() -> None:
    core = named(ChatCore(), alice=1, bob=2)
    assert say(core, 1, "hello  there") == [
        Broadcast("#lobby", "[#lobby] <alice> hello  there", exclude=1, said=True)
    ]


def test_trailing_whitespace_stripped_leading_kept() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "  indented \t \r") == [
        Broadcast("#lobby", "[#lobby] <alice>   indented", exclude=1, said=True)
    ]


@pytest.mark.parametrize("line", ["", "   ", "\t\r", "\x1b\x07"])
def test_empty_lines_are_ignored(line: str) -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, line) == []


def test_control_characters_are_removed_tab_kept() -> None:
    core = named(ChatCore(), alice=1)
    hostile = "\x1b[2J\x9b31mred\x07\tok\x7f\u202eevil\u2028x\x00"
    assert say(core, 1, hostile) == [
        Broadcast("#lobby", "[#lobby] <alice> [2J31mred\tokevilx", exclude=1, said=True)
    ]


def test_unicode_and_replacement_characters_pass() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "héllo \ufffd 😀") == [
        Broadcast("#lobby", "[#lobby] <alice> héllo \ufffd 😀", exclude=1, said=True)
    ]


def test_line_length_limit() -> None:
    core = named(ChatCore(flood_burst=100), alice=1)
    assert len(say(core, 1, "x" * MAX_LINE_LENGTH)) == 1
    too_long = MAX_LINE_LENGTH + 1
    assert error(core, 1, "x" * too_long) == (
        f"!!! line too long ({too_long} characters, limit {MAX_LINE_LENGTH}): dropped"
    )
    assert core.statistics().lines_too_long == 1


def test_a_too_long_quit_line_is_not_a_quit() -> None:
    core = named(ChatCore(max_line_length=12), alice=1)
    assert error(core, 1, "/quit " + "x" * 10).startswith("!!! line too long")
    assert core.nick_of(1) == "alice"


def test_double_slash_sends_a_literal_slash_line() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "//join is a command") == [
        Broadcast("#lobby", "[#lobby] <alice> /join is a command", exclude=1, said=True)
    ]


@pytest.mark.parametrize("line", ["/", "/ nick bob", "/\tx"])
def test_empty_command(line: str) -> None:
    assert error(named(ChatCore(), alice=1), 1, line) == "!!! empty command; type /help"


def test_unknown_command() -> None:
    core = named(ChatCore(), alice=1)
    assert error(core, 1, "/Frobnicate x") == "!!! unknown command /frobnicate; type /help"


def test_command_names_ignore_case() -> None:
    core = connected(ChatCore(), 1)
    say(core, 1, "/NiCk alice")
    assert core.nick_of(1) == "alice"


def test_help_lists_every_command() -> None:
    core = connected(ChatCore(), 1)
    effects = say(core, 1, "/help me")
    text = "\n".join(e.text for e in effects if isinstance(e, Send) and e.client == 1)
    assert len(effects) == text.count("\n") + 1
    for command in ("/nick", "/join", "/part", "/list", "/who", "/msg", "/me", "/quit", "//"):
        assert command in text
    assert "over" in text


# -- /nick ----------------------------------------------------------------------------------------


def test_nick_change_notifies_every_room_then_the_client() -> None:
    core = connected(ChatCore(), 1, 2)
    say(core, 1, "/join rust")
    assert say(core, 1, "/nick alice") == [
        Broadcast("#lobby", "[#lobby] *** guest1 is now known as alice", exclude=1),
        Broadcast("#rust", "[#rust] *** guest1 is now known as alice", exclude=1),
        Send(1, "*** you are now known as alice"),
    ]
    assert core.nick_of(1) == "alice"


def test_nicks_are_unique_ignoring_case() -> None:
    core = named(ChatCore(), alice=1)
    core.connect(2, T0)
    assert error(core, 2, "/nick ALICE") == '!!! nick "ALICE" is already taken'
    assert core.nick_of(2) == "guest2"


def test_own_nick_may_change_case() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "/nick Alice")[-1] == Send(1, "*** you are now known as Alice")
    assert core.nick_of(1) == "Alice"


def test_same_nick_is_a_no_op() -> None:
    core = named(ChatCore(), alice=1)
    assert reply(core, 1, "/nick alice") == "*** you are already known as alice"


def test_freed_nicks_can_be_taken() -> None:
    core = named(ChatCore(), alice=1, bob=2)
    say(core, 1, "/nick al")
    say(core, 2, "/quit")
    core.connect(3, T0)
    say(core, 3, "/nick alice")
    say(core, 3, "/nick BOB")
    assert core.nick_of(3) == "BOB"


@pytest.mark.parametrize(
    "nick",
    ["1abc", "-abc", "a b", "héllo", "a.b", "a" * (MAX_NICK_LENGTH + 1), "<x>", "*"],
)
def test_invalid_nicks(nick: str) -> None:
    core = connected(ChatCore(), 1)
    answer = reply(core, 1, f"/nick {nick}")
    assert answer.startswith(("!!! invalid nick", "!!! usage: /nick <name>"))
    assert core.nick_of(1) == "guest1"


@pytest.mark.parametrize("nick", ["a", "_x-1", "[afk]", "{ok}|^", "Z" * MAX_NICK_LENGTH])
def test_valid_nicks(nick: str) -> None:
    core = connected(ChatCore(), 1)
    say(core, 1, f"/nick {nick}")
    assert core.nick_of(1) == nick


@pytest.mark.parametrize("nick", ["guest5", "Guest1", "GUEST0042"])
def test_guest_nicks_are_reserved(nick: str) -> None:
    core = connected(ChatCore(), 1)
    assert error(core, 1, f"/nick {nick}") == f'!!! nick "{nick}" is reserved for guests'


def test_guest_may_name_its_own_guest_nick() -> None:
    core = connected(ChatCore(), 1)
    assert reply(core, 1, "/nick guest1") == "*** you are already known as guest1"


@pytest.mark.parametrize("line", ["/nick", "/nick a b"])
def test_nick_usage(line: str) -> None:
    assert error(connected(ChatCore(), 1), 1, line) == "!!! usage: /nick <name>"


# -- /join, rooms ---------------------------------------------------------------------------------


def test_join_a_new_room() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "/join Rust") == [
        Joined(1, "#rust"),
        Broadcast("#rust", "[#rust] *** alice joined", exclude=1),
        Send(1, "*** you joined #rust (1 member); text goes there"),
    ]
    assert core.rooms_of(1) == ("#lobby", "#rust")
    assert core.current_room(1) == "#rust"


def test_room_names_are_case_insensitive_with_or_without_hash() -> None:
    core = connected(ChatCore(), 1, 2)
    say(core, 1, "/join #RuSt")
    assert say(core, 2, "/join rust")[-1] == Send(
        2, "*** you joined #rust (2 members); text goes there"
    )
    assert core.members("#RUST") == {1, 2}


def test_text_goes_to_the_current_room_and_join_switches() -> None:
    core = named(ChatCore(), alice=1)
    say(core, 1, "/join rust")
    assert say(core, 1, "hi") == [Broadcast("#rust", "[#rust] <alice> hi", exclude=1, said=True)]
    assert reply(core, 1, "/join LOBBY") == "*** plain text now goes to #lobby"
    assert core.rooms_of(1) == ("#rust", "#lobby")
    assert say(core, 1, "/me waves") == [
        Broadcast("#lobby", "[#lobby] * alice waves", exclude=1, said=True)
    ]


@pytest.mark.parametrize(
    "room", ["##x", "a room", "r!", "#", "é", "x" * (MAX_ROOM_NAME_LENGTH + 1), "#a#b"]
)
def test_invalid_room_names(room: str) -> None:
    core = connected(ChatCore(), 1)
    answer = reply(core, 1, f"/join {room}")
    assert answer.startswith(("!!! invalid room", "!!! usage: /join <room>"))
    assert core.rooms_of(1) == ("#lobby",)


def test_longest_room_name_is_accepted() -> None:
    core = connected(ChatCore(), 1)
    say(core, 1, "/join " + "R" * MAX_ROOM_NAME_LENGTH)
    assert core.current_room(1) == "#" + "r" * MAX_ROOM_NAME_LENGTH


@pytest.mark.parametrize("line", ["/join", "/join a b"])
def test_join_usage(line: str) -> None:
    assert error(connected(ChatCore(), 1), 1, line) == "!!! usage: /join <room>"


def test_rooms_per_client_limit() -> None:
    core = connected(ChatCore(max_rooms_per_client=2), 1)
    say(core, 1, "/join a")
    assert error(core, 1, "/join b") == "!!! cannot join #b: you are in 2 rooms (limit 2)"
    assert reply(core, 1, "/join lobby") == "*** plain text now goes to #lobby"


def test_server_room_limit_does_not_count_the_default_room() -> None:
    core = connected(ChatCore(max_rooms=1), 1, 2)
    say(core, 1, "/join a")
    assert error(core, 2, "/join b") == "!!! cannot create #b: the server has 1 room (limit 1)"
    assert len(say(core, 2, "/join a")) == 3  # existing rooms can still be joined


def test_default_room_is_recreated_even_at_the_room_limit() -> None:
    core = connected(ChatCore(max_rooms=1), 1)
    say(core, 1, "/join a")
    say(core, 1, "/part lobby")
    assert core.members("lobby") == frozenset()
    assert core.connect(2, T0)[0] == Joined(2, "#lobby")
    assert error(core, 2, "/join b").startswith("!!! cannot create #b")


# -- /part ----------------------------------------------------------------------------------------


def test_part_current_room_falls_back_to_the_last_used_room() -> None:
    core = named(ChatCore(), alice=1, bob=2)
    say(core, 1, "/join a")
    say(core, 1, "/join b")
    say(core, 2, "/join b")
    say(core, 1, "/join a")  # current: #a, then #b, then #lobby
    assert say(core, 1, "/part") == [
        Broadcast("#a", "[#a] *** alice left", exclude=1),
        Left(1, "#a"),
        Send(1, "*** you left #a; text goes to #b"),
    ]
    assert core.members("a") == frozenset()  # empty rooms disappear
    assert core.statistics().rooms == 2


def test_part_a_named_room() -> None:
    core = named(ChatCore(), alice=1)
    say(core, 1, "/join a")
    assert say(core, 1, "/part #LOBBY")[1] == Left(1, "#lobby")
    assert core.rooms_of(1) == ("#a",)


def test_part_errors() -> None:
    core = named(ChatCore(), alice=1)
    assert error(core, 1, "/part x") == "!!! you are not in #x"
    assert error(core, 1, "/part a b") == "!!! usage: /part [room]"
    assert error(core, 1, "/part a!").startswith('!!! invalid room "a!"')
    assert error(core, 1, "/part") == (
        "!!! cannot leave #lobby: it is your only room (/join another first)"
    )
    assert core.rooms_of(1) == ("#lobby",)


# -- /list, /who ----------------------------------------------------------------------------------


def test_list_rooms_with_member_counts() -> None:
    core = connected(ChatCore(), 1, 2, 3)
    say(core, 1, "/join zz")
    say(core, 2, "/join ZZ")
    say(core, 3, "/join aa")
    assert reply(core, 1, "/list") == "*** 3 rooms: #aa (1), #lobby (3), #zz (2)"
    assert error(core, 1, "/list all") == "!!! usage: /list"


def test_list_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "MAX_LIST_ROOMS", 2)
    core = connected(ChatCore(), 1)
    say(core, 1, "/join b")
    say(core, 1, "/join a")
    assert reply(core, 1, "/list") == "*** 3 rooms: #a (1), #b (1) (+1 more)"


def test_who_lists_members_sorted_ignoring_case() -> None:
    core = named(ChatCore(), zed=1, Amy=2, bob=3)
    say(core, 3, "/join x")
    assert reply(core, 1, "/who") == "*** #lobby (3 members): Amy bob zed"
    assert reply(core, 1, "/who #X") == "*** #x (1 member): bob"


def test_who_errors() -> None:
    core = connected(ChatCore(), 1)
    assert error(core, 1, "/who nowhere") == "!!! no such room #nowhere"
    assert error(core, 1, "/who a b") == "!!! usage: /who [room]"
    assert error(core, 1, "/who +").startswith('!!! invalid room "+"')


def test_who_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "MAX_WHO_NICKS", 2)
    core = named(ChatCore(), c=1, a=2, b=3)
    assert reply(core, 1, "/who") == "*** #lobby (3 members): a b (+1 more)"


# -- /msg, /me ------------------------------------------------------------------------------------


def test_private_message_then_echo() -> None:
    core = named(ChatCore(), alice=1, Bob=2)
    assert say(core, 1, "/msg bob  hi\tthere  you") == [
        Send(2, "-alice- hi\tthere  you"),
        Send(1, "-> Bob: hi\tthere  you"),
    ]


def test_private_message_errors() -> None:
    core = named(ChatCore(), alice=1)
    assert error(core, 1, "/msg nobody hi") == '!!! no such nick "nobody"'
    assert error(core, 1, "/msg ALICE hi") == "!!! you cannot /msg yourself"
    assert error(core, 1, "/msg bob") == "!!! usage: /msg <nick> <text>"
    assert error(core, 1, "/msg") == "!!! usage: /msg <nick> <text>"


def test_me_action_and_usage() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "/me  waves  ") == [
        Broadcast("#lobby", "[#lobby] * alice waves", 1, said=True)
    ]
    assert error(core, 1, "/me") == "!!! usage: /me <action>"


# -- /quit, over, disconnect ----------------------------------------------------------------------


def test_quit_leaves_every_room_then_says_goodbye_then_closes() -> None:
    core = named(ChatCore(), alice=1, bob=2)
    say(core, 1, "/join a")
    assert say(core, 1, "/QUIT  see you  ") == [
        Broadcast("#lobby", "[#lobby] *** alice quit (see you)", exclude=1),
        Left(1, "#lobby"),
        Broadcast("#a", "[#a] *** alice quit (see you)", exclude=1),
        Left(1, "#a"),
        Send(1, "*** goodbye"),
        Close(1, "quit", "alice"),
    ]
    assert core.nick_of(1) is None
    assert core.members("a") == frozenset()
    assert say(core, 1, "hello?") == []
    assert core.disconnect(1, "eof") == []


def test_quit_without_reason() -> None:
    core = named(ChatCore(), alice=1)
    assert say(core, 1, "/quit")[0] == Broadcast("#lobby", "[#lobby] *** alice quit", 1)


def test_quit_reason_is_cut() -> None:
    core = named(ChatCore(), alice=1)
    notice = say(core, 1, "/quit " + "r" * 1000)[0]
    assert notice == Broadcast("#lobby", f"[#lobby] *** alice quit ({'r' * 200})", 1)
    assert MAX_REASON_LENGTH == 200


def test_quitx_is_not_quit() -> None:
    core = named(ChatCore(), alice=1)
    assert error(core, 1, "/quitx") == "!!! unknown command /quitx; type /help"


@pytest.mark.parametrize("line", ["over", "OVER", "  Over \r", "ov\x1ber"])
def test_over_ends_the_session(line: str) -> None:
    core = named(ChatCore(), alice=1)
    effects = say(core, 1, line)
    assert effects[0] == Broadcast("#lobby", "[#lobby] *** alice quit (over)", exclude=1)
    assert effects[-1] == Close(1, "quit", "alice")


@pytest.mark.parametrize("line", ["over and out", "/over", "//over", "overt"])
def test_over_must_be_alone(line: str) -> None:
    core = named(ChatCore(), alice=1)
    assert not any(isinstance(e, Close) for e in say(core, 1, line))


def test_disconnect_notifies_rooms_with_reason_and_is_idempotent() -> None:
    core = named(ChatCore(), alice=1, bob=2)
    say(core, 1, "/join a")
    assert core.disconnect(1, "connection reset\x1b") == [
        Broadcast("#lobby", "[#lobby] *** alice quit (connection reset)", exclude=1),
        Left(1, "#lobby"),
        Broadcast("#a", "[#a] *** alice quit (connection reset)", exclude=1),
        Left(1, "#a"),
    ]
    assert core.disconnect(1, "again") == []
    assert core.disconnect(99, "never connected") == []
    assert core.members("lobby") == {2}


def test_disconnect_with_empty_reason() -> None:
    core = named(ChatCore(), alice=1)
    assert core.disconnect(1, " ")[0] == Broadcast("#lobby", "[#lobby] *** alice quit", 1)


FLOOD_NOTICE = Send(1, "!!! flood control: lines dropped; at most 5 per second (burst 20)")


# -- flood control --------------------------------------------------------------------------------


def test_flood_burst_then_one_notice_then_steady_rate() -> None:
    core = named(ChatCore(), alice=1)
    core.receive_line(1, "/join a", T0)  # the /nick and /join took 2 tokens
    for i in range(FLOOD_BURST - 2):
        assert len(core.receive_line(1, f"line {i}", T0)) == 1
    assert core.receive_line(1, "dropped", T0) == [FLOOD_NOTICE]
    for _ in range(9):
        assert core.receive_line(1, "dropped", T0 + 0.1) == []
    assert core.statistics().lines_flood_dropped == 10
    step = 1 / FLOOD_RATE
    later = T0 + 1e-6  # keeps float rounding from landing just short of a whole token
    assert core.receive_line(1, "back", later + step) == [
        Send(1, "*** flood control lifted: 10 lines dropped"),
        Broadcast("#a", "[#a] <alice> back", exclude=1, said=True),
    ]
    for i in range(2, 20):  # the steady rate is never throttled
        assert len(core.receive_line(1, "steady", later + i * step)) == 1
    assert core.receive_line(1, "burst", later + 19 * step) == [FLOOD_NOTICE]
    assert core.statistics().lines_flood_dropped == 11


def test_one_dropped_line_is_reported_singular() -> None:
    core = connected(ChatCore(flood_burst=1), 1)
    core.receive_line(1, "a", T0)
    core.receive_line(1, "b", T0)
    lifted = core.receive_line(1, "c", T0 + 1)[0]
    assert lifted == Send(1, "*** flood control lifted: 1 line dropped")


def test_empty_and_too_long_lines_cost_tokens() -> None:
    core = connected(ChatCore(flood_burst=2, max_line_length=5), 1)
    assert core.receive_line(1, "", T0) == []
    assert len(core.receive_line(1, "toolong", T0)) == 1
    assert core.receive_line(1, "x", T0) == [
        Send(1, "!!! flood control: lines dropped; at most 5 per second (burst 2)")
    ]


def test_welcome_states_the_limits_from_the_settings() -> None:
    core = ChatCore(flood_rate=FLOOD_RATE, flood_burst=FLOOD_BURST, max_line_bytes=16384)
    welcome = core.connect(1, T0)[-1]
    assert isinstance(welcome, Send)
    assert welcome.text.endswith(
        f"; limits: lines up to {MAX_LINE_LENGTH} characters (16384 bytes), "
        f"{FLOOD_RATE:g} lines/s, bursts of {FLOOD_BURST}"
    )
    other = ChatCore(flood_rate=0.5, flood_burst=3, max_line_length=10)
    assert other.limits() == "lines up to 10 characters, 0.5 lines/s, bursts of 3"


def test_a_line_too_long_on_the_wire_is_refused_and_counted() -> None:
    core = connected(ChatCore(max_line_bytes=100, flood_burst=2), 1, 2)
    assert core.receive_overlong(1, T0) == [
        Send(1, "!!! line too long (limit 100 bytes): not sent")
    ]
    assert core.statistics().lines_too_long == 1
    assert core.statistics().lines_received == 1
    assert len(core.receive_overlong(1, T0)) == 1  # it costs a token: the burst is 2
    assert core.receive_overlong(1, T0) == [
        Send(1, "!!! flood control: lines dropped; at most 5 per second (burst 2)")
    ]
    assert core.receive_overlong(99, T0) == []


def test_flood_wait_says_when_the_next_line_passes() -> None:
    core = connected(ChatCore(flood_rate=4.0, flood_burst=2), 1)
    assert core.flood_wait(1, T0) == 0.0
    say(core, 1, "a")
    say(core, 1, "b")
    assert core.flood_wait(1, T0) == pytest.approx(0.25)
    assert core.flood_wait(1, T0 + 0.1) == pytest.approx(0.15)
    assert core.flood_wait(1, T0 + 0.25) == 0.0
    assert len(core.receive_line(1, "c", T0 + 0.25)) == 1  # passes: nothing dropped
    assert core.statistics().lines_flood_dropped == 0
    assert core.flood_wait(42, T0) == 0.0


def test_quit_and_over_pass_flood_control() -> None:
    for line in ("/quit flooded", "over"):
        core = connected(ChatCore(flood_burst=1), 1)
        core.receive_line(1, "a", T0)
        core.receive_line(1, "b", T0)
        assert core.receive_line(1, line, T0)[-1] == Close(1, "quit", "guest1")


def test_statistics() -> None:
    core = connected(ChatCore(), 1, 2)
    say(core, 1, "hello")
    say(core, 2, "/join a")
    stats = core.statistics()
    assert (stats.clients, stats.rooms, stats.lines_received) == (2, 2, 2)


# -- effect types and the sans-I/O rule -----------------------------------------------------------


@pytest.mark.parametrize(
    "effect", [Send(1, "x"), Broadcast("#a", "x", None), Close(1, "x"), Joined(1, "#a")]
)
def test_effects_are_frozen_and_slotted(effect: Effect) -> None:
    assert not hasattr(effect, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(effect, dataclasses.fields(effect)[0].name, 2)


def test_module_imports_no_io_clock_or_randomness() -> None:
    tree = ast.parse(Path(chat.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    forbidden = {"asyncio", "socket", "selectors", "time", "random", "logging", "datetime"}
    assert not {name.split(".")[0] for name in imported} & forbidden


def test_public_surface() -> None:
    assert set(chat.__all__) <= set(dir(chat))
    assert {"ChatCore", "Send", "Broadcast", "Close", "Joined", "Left"} <= set(chat.__all__)


# -- stateful model check -------------------------------------------------------------------------

CLIENTS = st.integers(1, 6)
NICKS = st.sampled_from(["alice", "Alice", "bob", "BOB", "carol", "guest1", "1bad", "x" * 40])
ROOMS = st.sampled_from(["lobby", "#Lobby", "a", "#A", "b", "c", "bad room", "##"])
TEXTS = st.sampled_from(["hi", "", "over", "/", "//x", "/me waves", "/who", "/list", "\x1b[2J"])


class ChatMachine(RuleBasedStateMachine):
    """Drive a small ChatCore at random and replay its effects against a model of the hub."""

    def __init__(self) -> None:
        super().__init__()
        self.core = ChatCore(max_rooms=2, max_rooms_per_client=2, max_clients=4, flood_burst=4)
        self.now = 0.0
        self.live: set[int] = set()  # clients the adapter considers connected
        self.subscribed: dict[str, set[int]] = {}  # the hub's view, from Joined/Left only

    def apply(self, effects: list[Effect], leaving: int | None = None) -> None:
        for effect in effects:
            match effect:
                case Send(client=client):
                    assert client in self.live
                    assert client != leaving
                case Broadcast(room=room, exclude=exclude):
                    assert self.subscribed.get(room), f"broadcast to empty room {room}"
                    assert exclude is None or exclude in self.live
                case Joined(client=client, room=room):
                    assert client in self.live
                    assert client not in self.subscribed.setdefault(room, set())
                    self.subscribed[room].add(client)
                case Left(client=client, room=room):
                    self.subscribed[room].remove(client)
                    if not self.subscribed[room]:
                        del self.subscribed[room]
                case Close(client=client):
                    self.live.remove(client)  # later effects for it fail the Send check

    def line(self, client: int, text: str) -> None:
        self.apply(self.core.receive_line(client, text, self.now))

    @rule(client=CLIENTS)
    def connect(self, client: int) -> None:
        if client in self.live:
            return
        self.live.add(client)
        self.apply(self.core.connect(client, self.now))

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), reason=st.sampled_from(["", "reset", "timed out"]))
    def disconnect(self, data: st.DataObject, reason: str) -> None:
        client = data.draw(st.sampled_from(sorted(self.live)))
        self.apply(self.core.disconnect(client, reason), leaving=client)
        self.live.discard(client)
        assert self.core.disconnect(client, reason) == []

    @rule(client=CLIENTS, nick=NICKS)
    def nick(self, client: int, nick: str) -> None:
        self.line(client, f"/nick {nick}")

    @rule(client=CLIENTS, room=ROOMS)
    def join(self, client: int, room: str) -> None:
        self.line(client, f"/join {room}")

    @rule(client=CLIENTS, room=st.none() | ROOMS)
    def part(self, client: int, room: str | None) -> None:
        self.line(client, "/part" if room is None else f"/part {room}")

    @rule(client=CLIENTS, text=TEXTS)
    def say(self, client: int, text: str) -> None:
        self.line(client, text)

    @rule(client=CLIENTS, nick=NICKS)
    def msg(self, client: int, nick: str) -> None:
        self.line(client, f"/msg {nick} psst")

    @rule(client=CLIENTS)
    def quit(self, client: int) -> None:
        self.line(client, "/quit bye")

    @rule(dt=st.sampled_from([0.0, 0.05, 1.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def connected_clients_match(self) -> None:
        assert {c for c in range(1, 7) if self.core.nick_of(c) is not None} == self.live
        assert self.core.statistics().clients == len(self.live)

    @invariant()
    def nicks_unique_ignoring_case(self) -> None:
        nicks = [self.core.nick_of(c) or "" for c in self.live]
        assert len({nick.casefold() for nick in nicks}) == len(nicks)

    @invariant()
    def every_client_in_one_to_max_rooms(self) -> None:
        for client in self.live:
            rooms = self.core.rooms_of(client)
            assert 1 <= len(rooms) <= 2
            assert self.core.current_room(client) == rooms[-1]

    @invariant()
    def membership_matches_rooms_of_and_the_hub(self) -> None:
        rooms: dict[str, set[int]] = {}
        for client in self.live:
            for room in self.core.rooms_of(client):
                rooms.setdefault(room, set()).add(client)
        assert rooms == self.subscribed
        assert all(self.core.members(room) == members for room, members in rooms.items())
        assert self.core.statistics().rooms == len(rooms)
        assert len(set(rooms) - {"#lobby"}) <= 2


TestChatMachine = ChatMachine.TestCase
TestChatMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
