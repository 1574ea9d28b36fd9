"""Events: the envelope, filters, and SSE framing. Pure: no I/O, no trio.

Rules:

* An event is `{"id", "type", "timestamp", "sessionId", "level", "data"}`
  (DESIGN.md §5). `id` is a daemon-wide, strictly increasing integer
  assigned by the event bus; it survives restarts.
* Levels are ordered debug < info < warning < error. Query values accept
  `warn` as an alias of `warning` (the older implementation's spelling).
* A type filter is a set of exact names and families: `task.*` matches
  every type whose part before the first dot is `task`. Unknown names and
  unknown families are errors, never a silent empty stream.
* SSE framing (WHATWG event-stream): an event is `id: <id>` and
  `data: <envelope JSON on one line>`, ended by a blank line; with
  `named`, an `event: <type>` line comes first. Without it, the browser's
  `onmessage` fires for every event, as the seed's example expects.
  Comments (`: ...`) are heartbeats. The envelope JSON never contains a raw
  newline (JSON escapes it), so one `data:` line always suffices.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from lokid.errors import InvalidQuery
from lokid.jsontypes import LONE_SURROGATE, without_lone_surrogates


class Level(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40

    @property
    def label(self) -> str:
        return self.name.lower()


LEVEL_NAMES: dict[str, Level] = {level.label: level for level in Level} | {"warn": Level.WARNING}

EVENT_TYPES: frozenset[str] = frozenset(
    {
        # the seed's
        "session.started",
        "session.completed",
        "session.failed",
        "phase.started",
        "phase.completed",
        "task.started",
        "task.completed",
        "agent.spawned",
        "agent.completed",
        "error",
        "warning",
        # DESIGN.md §5 adds
        "session.paused",
        "session.resumed",
        "session.stopped",
        "session.interrupted",
        "task.created",
        "task.failed",
        "agent.failed",
        "agent.output",
        "input.received",
        "input.applied",
        "log",
        # sent by the stream itself when a replay cannot be complete
        "stream.reset",
    }
)
FAMILIES: frozenset[str] = frozenset(t.split(".", 1)[0] for t in EVENT_TYPES if "." in t)

MAX_TYPES_IN_FILTER = 64


@attrs.frozen
class Event:
    id: int
    type: str
    timestamp: str
    session_id: str | None
    level: Level
    data: Mapping[str, Any]
    data_json: str | None = attrs.field(default=None, eq=False, repr=False)
    """`compact_json(data)` when the publisher computed it already (encoded once)."""

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "timestamp": self.timestamp,
            "sessionId": self.session_id,
            "level": self.level.label,
            "data": self.data,
        }


def compact_json(value: Any) -> str:
    """The one JSON form of events: compact, UTF-8 kept as is (stored and sent alike)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def envelope_json(event: Event) -> str:
    if event.data_json is None:
        return compact_json(event.envelope())
    # `data` is the envelope's last key: the same text as encoding it whole.
    head = compact_json(
        {
            "id": event.id,
            "type": event.type,
            "timestamp": event.timestamp,
            "sessionId": event.session_id,
            "level": event.level.label,
        }
    )
    return f'{head[:-1]},"data":{event.data_json}}}'


@attrs.frozen
class EncodedEvent:
    """An event with its wire forms computed once and shared by every subscriber."""

    event: Event
    json: str
    frame: bytes  # unnamed SSE frame
    named_frame: bytes  # with an `event:` line

    @classmethod
    def of(cls, event: Event) -> EncodedEvent:
        text = envelope_json(event)
        frame = f"id: {event.id}\ndata: {text}\n\n".encode()
        named = f"event: {event.type}\nid: {event.id}\ndata: {text}\n\n".encode()
        return cls(event, text, frame, named)

    def sse(self, named: bool) -> bytes:
        return self.named_frame if named else self.frame


def sse_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


def sse_retry(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


def sse_unnumbered(event_type: str, payload: Mapping[str, Any], named: bool) -> bytes:
    """A frame without `id:` (so the client's Last-Event-ID is kept), e.g. stream.reset."""
    text = compact_json(payload)
    head = f"event: {event_type}\n" if named else ""
    return f"{head}data: {text}\n\n".encode()


@attrs.frozen
class EventFilter:
    """Which events a subscriber or a history query wants. Empty = everything."""

    session_id: str | None = None
    types: frozenset[str] = frozenset()
    families: frozenset[str] = frozenset()
    min_level: Level = Level.DEBUG

    def matches(self, event: Event) -> bool:
        if self.session_id is not None and event.session_id != self.session_id:
            return False
        if event.level < self.min_level:
            return False
        if self.types or self.families:
            if event.type in self.types:
                return True
            return event.type.split(".", 1)[0] in self.families and "." in event.type
        return True

    def sql(self) -> tuple[str, list[Any]]:
        """The same filter as a WHERE fragment (`1` when empty) and its parameters."""
        clauses: list[str] = []
        params: list[Any] = []
        if self.session_id is not None:
            clauses.append("session_id = ?")
            params.append(self.session_id)
        if self.min_level > Level.DEBUG:
            clauses.append("level >= ?")
            params.append(int(self.min_level))
        alternatives: list[str] = []
        if self.types:
            alternatives.append(f"type IN ({','.join('?' * len(self.types))})")
            params.extend(sorted(self.types))
        for family in sorted(self.families):
            alternatives.append("type LIKE ? ESCAPE '\\'")
            params.append(family.replace("_", "\\_").replace("%", "\\%") + ".%")
        if alternatives:
            clauses.append("(" + " OR ".join(alternatives) + ")")
        return (" AND ".join(clauses) or "1"), params


# -- query values ----------------------------------------------------------------


def parse_level(value: str, *, field: str = "minLevel") -> Level:
    level = LEVEL_NAMES.get(value.strip().lower())
    if level is None:
        raise InvalidQuery(
            f"{field} must be one of debug, info, warning (or warn), error; got {value!r}",
            field=field,
        )
    return level


def parse_types(value: str, *, field: str = "types") -> tuple[frozenset[str], frozenset[str]]:
    """`task.*,error` -> ({"error"}, {"task"}); unknown names are a 422 naming them."""
    names = [part.strip() for part in value.split(",") if part.strip()]
    if len(names) > MAX_TYPES_IN_FILTER:
        raise InvalidQuery(f"{field} lists more than {MAX_TYPES_IN_FILTER} types", field=field)
    exact: set[str] = set()
    families: set[str] = set()
    unknown: list[str] = []
    for name in names:
        if name.endswith(".*"):
            family = name[:-2]
            (families.add(family) if family in FAMILIES else unknown.append(name))
        elif name in EVENT_TYPES:
            exact.add(name)
        else:
            unknown.append(name)
    if unknown:
        raise InvalidQuery(
            f"unknown event type(s) in {field}: {', '.join(unknown)}",
            field=field,
            details={"unknown": unknown, "known": sorted(EVENT_TYPES)},
        )
    if not names:
        raise InvalidQuery(f"{field} is empty; omit it to receive every type", field=field)
    return frozenset(exact), frozenset(families)


def make_filter(
    *, session_id: str | None = None, types: str | None = None, min_level: str | None = None
) -> EventFilter:
    exact: frozenset[str] = frozenset()
    families: frozenset[str] = frozenset()
    if types is not None:
        exact, families = parse_types(types)
    if session_id is not None and not session_id.strip():
        raise InvalidQuery("sessionId is empty", field="sessionId")
    return EventFilter(
        session_id=session_id,
        types=exact,
        families=families,
        min_level=parse_level(min_level) if min_level is not None else Level.DEBUG,
    )


def event_from_row(row: Mapping[str, Any]) -> Event:
    return Event(
        id=int(row["id"]),
        type=str(row["type"]),
        timestamp=str(row["timestamp"]),
        session_id=row["session_id"],
        level=Level(int(row["level"])),
        data=json.loads(row["data"]),
    )


def check_publishable(
    event_type: str, data: Mapping[str, Any], known: Iterable[str] = EVENT_TYPES
) -> dict[str, Any]:
    """Internal publishers must use known types and JSON-able data (a bug otherwise).

    Returns the data to publish: `data` itself, or a copy with each lone surrogate
    replaced by U+FFFD (`without_lone_surrogates`). Agent output may hold one (a JSON
    "\\ud800" escape in a stream-json line), and neither SQLite nor a UTF-8 frame can
    carry it: it crashed the event bus, and with it every actor started after it.
    """
    return publishable(event_type, data, known)[0]


def publishable(
    event_type: str, data: Mapping[str, Any], known: Iterable[str] = EVENT_TYPES
) -> tuple[dict[str, Any], str]:
    """`check_publishable`, and the data's `compact_json` (stored and sent as is)."""
    if event_type not in known or event_type == "stream.reset":
        raise ValueError(f"cannot publish event type {event_type!r}")
    text = compact_json(data)
    if LONE_SURROGATE.search(text) is None:
        return dict(data), text
    cleaned: dict[str, Any] = without_lone_surrogates(dict(data))
    return cleaned, compact_json(cleaned)
