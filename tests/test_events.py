"""The pure event module: filters (Python and SQL, checked against each other), framing."""

from __future__ import annotations

import json
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid.errors import InvalidQuery
from lokid.events import (
    EVENT_TYPES,
    EncodedEvent,
    Event,
    EventFilter,
    Level,
    check_publishable,
    make_filter,
    parse_level,
    parse_types,
    publishable,
    sse_comment,
    sse_unnumbered,
)


def event(
    id: int = 1, type: str = "task.started", session: str | None = "s1", level: Level = Level.INFO
) -> Event:
    return Event(id, type, "2026-11-28T12:00:00.000Z", session, level, {"n": id})


def test_empty_filter_matches_everything() -> None:
    assert EventFilter().matches(event())
    assert EventFilter().matches(event(session=None, level=Level.DEBUG))


def test_session_filter_is_exact_and_excludes_global_events() -> None:
    only = make_filter(session_id="s1")
    assert only.matches(event(session="s1"))
    assert not only.matches(event(session="s2"))
    assert not only.matches(event(session=None))


def test_types_exact_and_family() -> None:
    flt = make_filter(types="task.*,error")
    assert flt.matches(event(type="task.started"))
    assert flt.matches(event(type="task.failed"))
    assert flt.matches(event(type="error"))
    assert not flt.matches(event(type="session.started"))
    assert not flt.matches(event(type="warning"))


def test_min_level_applies_to_every_event() -> None:
    flt = make_filter(min_level="warn")
    assert flt.min_level is Level.WARNING
    assert not flt.matches(event(level=Level.INFO))
    assert flt.matches(event(level=Level.WARNING))
    assert flt.matches(event(level=Level.ERROR))


def test_filters_combine_with_and() -> None:
    flt = make_filter(session_id="s1", types="agent.*", min_level="error")
    assert flt.matches(event(type="agent.failed", level=Level.ERROR))
    assert not flt.matches(event(type="agent.failed", level=Level.INFO))
    assert not flt.matches(event(type="agent.failed", session="s2", level=Level.ERROR))
    assert not flt.matches(event(type="task.failed", level=Level.ERROR))


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ("task.started,nope", "unknown event type(s) in types: nope"),
        ("bogus.*", "unknown event type(s) in types: bogus.*"),
        (",,", "types is empty"),
        ("task.started," * 70, "more than 64 types"),
    ],
)
def test_bad_types_are_errors_naming_the_field(types: str, message: str) -> None:
    with pytest.raises(
        InvalidQuery, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        parse_types(types)
    assert caught.value.details["field"] == "types"


def test_bad_level_is_an_error() -> None:
    with pytest.raises(InvalidQuery, match="minLevel must be one of") as caught:
        parse_level("loud")
    assert caught.value.details == {"field": "minLevel"}
    assert parse_level(" ERROR ") is Level.ERROR


def test_empty_session_id_is_an_error() -> None:
    with pytest.raises(InvalidQuery, match="sessionId is empty"):
        make_filter(session_id=" ")


def test_unnamed_frame_has_no_event_line_so_onmessage_fires() -> None:
    encoded = EncodedEvent.of(event(id=42))
    text = encoded.sse(named=False).decode()
    assert text.startswith("id: 42\ndata: {")
    assert text.endswith("}\n\n")
    assert "event:" not in text
    payload = json.loads(text.split("data: ", 1)[1])
    assert payload == {
        "id": 42,
        "type": "task.started",
        "timestamp": "2026-11-28T12:00:00.000Z",
        "sessionId": "s1",
        "level": "info",
        "data": {"n": 42},
    }


def test_named_frame_adds_the_type() -> None:
    text = EncodedEvent.of(event(id=7, type="error")).sse(named=True).decode()
    assert text.splitlines()[:2] == ["event: error", "id: 7"]


def test_newlines_in_data_stay_on_one_data_line() -> None:
    multi = Event(1, "log", "t", None, Level.INFO, {"message": "a\nb\r\nc"})
    frame = EncodedEvent.of(multi).frame.decode()
    assert frame.count("\n") == 3  # id line, data line, blank line
    assert json.loads(frame.splitlines()[1][6:])["data"]["message"] == "a\nb\r\nc"


def test_comment_and_unnumbered_frames() -> None:
    assert sse_comment("keep-alive") == b": keep-alive\n\n"
    frame = sse_unnumbered("stream.reset", {"x": 1}, named=True).decode()
    assert frame == 'event: stream.reset\ndata: {"x":1}\n\n'
    assert "id:" not in frame


def test_publishable_data_has_lone_surrogates_replaced() -> None:
    data = {"text": "ok 🙂", "n": [1, {"k": "é"}]}
    assert check_publishable("log", data) == data
    dirty = {"text": "a\ud800", "list": ["\udcff", 2], "\udc80": {"x": "\ud83d"}}
    assert check_publishable("log", dirty) == {
        "text": "a\ufffd",
        "list": ["\ufffd", 2],
        "\ufffd": {"x": "\ufffd"},
    }
    assert dirty["text"] == "a\ud800"  # the caller's value is left alone


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=5,
    ),
    st.sampled_from([None, "s1", 'a"\\b']),
)
def test_data_encoded_once_frames_as_if_encoded_whole(
    data: dict[str, object], session: str | None
) -> None:
    """The bus encodes an event's data once (`publishable`) and builds the stored row and
    the SSE envelope from that text: byte for byte what encoding the envelope whole gives."""
    payload, text = publishable("log", data)
    assert payload == check_publishable("log", data)
    assert json.loads(text) == payload
    plain = Event(7, "log", "2026-11-29T12:00:00.000Z", session, Level.WARNING, payload)
    once = Event(7, "log", "2026-11-29T12:00:00.000Z", session, Level.WARNING, payload, text)
    assert once == plain
    assert EncodedEvent.of(once) == EncodedEvent.of(plain)
    assert EncodedEvent.of(once).json == json.dumps(
        plain.envelope(), separators=(",", ":"), ensure_ascii=False
    )


def test_publishing_unknown_or_reserved_types_is_a_bug() -> None:
    with pytest.raises(ValueError):
        check_publishable("nope", {})
    with pytest.raises(ValueError):
        check_publishable("stream.reset", {})
    with pytest.raises(TypeError):
        check_publishable("log", {"x": object()})


# -- the SQL form of a filter selects exactly what `matches` accepts ---------------------

TYPES = sorted(EVENT_TYPES - {"stream.reset"})
SESSIONS = [None, "s1", "s2", "s_1", "s%"]

events_strategy = st.lists(
    st.builds(
        lambda i, t, s, lv: event(i, t, s, lv),
        st.integers(1, 10_000),
        st.sampled_from(TYPES),
        st.sampled_from(SESSIONS),
        st.sampled_from(list(Level)),
    ),
    max_size=40,
    unique_by=lambda e: e.id,
)

filters_strategy = st.builds(
    EventFilter,
    session_id=st.sampled_from(SESSIONS),
    types=st.frozensets(st.sampled_from(TYPES), max_size=4),
    families=st.frozensets(
        st.sampled_from(["task", "session", "agent", "phase", "input"]), max_size=2
    ),
    min_level=st.sampled_from(list(Level)),
)


@settings(max_examples=200, deadline=None)
@given(events=events_strategy, flt=filters_strategy)
def test_sql_filter_equals_python_filter(events: list[Event], flt: EventFilter) -> None:
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, type, session_id, level, timestamp, data)"
    )
    db.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
        [(e.id, e.type, e.session_id, int(e.level), e.timestamp, "{}") for e in events],
    )
    where, params = flt.sql()
    selected = {row[0] for row in db.execute(f"SELECT id FROM events WHERE {where}", params)}
    assert selected == {e.id for e in events if flt.matches(e)}
