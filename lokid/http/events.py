"""Event routes: the SSE stream, history and stats (DESIGN.md §5 "Events").

The stream is a raw ASGI handler: after the headers, each wake-up takes
everything queued for the subscriber and sends it as one body chunk, so a
burst costs one write per client, not one per event, and no framework code
runs per event. A stream opened with a token ends (`: closed: Token
revoked`, `Token expired`) when that token is revoked or expires
(`Gate.stream`).
"""

from __future__ import annotations

from typing import Any

import trio

from lokid.actors.event_bus import EventBus, ReplayPlan, Subscriber, SubscriberClosed
from lokid.errors import InvalidQuery, LokiError
from lokid.events import (
    EVENT_TYPES,
    FAMILIES,
    LEVEL_NAMES,
    MAX_TYPES_IN_FILTER,
    EventFilter,
    make_filter,
    sse_comment,
    sse_retry,
    sse_unnumbered,
)
from lokid.http.convert import api_converter
from lokid.http.errors import ApiError
from lokid.http.gate import TokenStream
from lokid.http.surface import (
    BOOLEAN_PARAM,
    LeanResponse,
    Param,
    Receive,
    Scope,
    Send,
    Surface,
    bool_param,
    int_param,
    json_response,
    not_blank,
    query_params,
    send_error,
    words,
)

RETRY_MS = 3000  # the `retry:` hint: how long browsers wait before reconnecting
DEFAULT_HISTORY = 100
MAX_HISTORY = 1000
MAX_EVENT_ID = 2**63 - 1  # SQLite's INTEGER

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

FILTER_PARAMS = (
    Param("sessionId", "query", not_blank(), description="only events of this session"),
    Param(
        "types",
        "query",
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_TYPES_IN_FILTER,
            "items": {
                "type": "string",
                "enum": sorted(EVENT_TYPES) + sorted(f"{family}.*" for family in FAMILIES),
            },
        },
        explode=False,
        description="comma list of types; `task.*` matches a family",
    ),
    Param(
        "minLevel",
        "query",
        words(*LEVEL_NAMES),
        description="lowest level delivered (any case)",
    ),
)
EVENT_ID = {"type": "integer", "minimum": 0, "maximum": MAX_EVENT_ID}

ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "type", "timestamp", "sessionId", "level", "data"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "type": {"type": "string", "enum": sorted(EVENT_TYPES - {"stream.reset"})},
        "timestamp": {"type": "string", "format": "date-time"},
        "sessionId": {"type": ["string", "null"]},
        "level": {"type": "string", "enum": [name for name in LEVEL_NAMES if name != "warn"]},
        "data": {"type": "object"},
    },
}
RESET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "data"],
    "additionalProperties": False,
    "properties": {
        "type": {"const": "stream.reset"},
        "data": {
            "type": "object",
            "required": ["reason", "lastEventId", "message"],
            "properties": {
                "reason": {"type": "string", "enum": ["unknown", "expired"]},
                "lastEventId": {"type": "integer"},
                "latestId": {"type": ["integer", "null"]},
                "firstAvailableId": {"type": ["integer", "null"]},
                "message": {"type": "string"},
            },
        },
    },
}
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One event of the stream. `data` is an event envelope, or (without `id`, "
    "before any other event) a stream.reset notice; `event` is `message`, or the type "
    "with ?named=true. Comments (`: connected`, `: keep-alive`) and `retry:` carry no data.",
    "required": ["data", "event"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [ENVELOPE_SCHEMA, RESET_SCHEMA]},
        },
        "event": {"type": "string", "enum": ["message", *sorted(EVENT_TYPES)]},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
    },
}
HISTORY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["events", "count", "limit"],
    "properties": {
        "events": {"type": "array", "items": ENVELOPE_SCHEMA},
        "count": {"type": "integer", "minimum": 0},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY},
    },
}


def _filter(params: dict[str, str]) -> EventFilter:
    return make_filter(
        session_id=params.get("sessionId"),
        types=params.get("types"),
        min_level=params.get("minLevel"),
    )


def _history(params: dict[str, str]) -> int | None:
    value = params.get("history")
    if value is None:
        return None
    word = value.strip().lower()
    if word in ("true", "yes", "on", ""):
        return DEFAULT_HISTORY
    if word in ("false", "no", "off"):
        return None
    return int_param(params, "history", None, minimum=0, maximum=MAX_HISTORY)


def _last_event_id(scope: Scope, params: dict[str, str]) -> int | None:
    query = int_param(params, "lastEventId", None, minimum=0, maximum=MAX_EVENT_ID)
    header = next((v for k, v in scope["headers"] if k == b"last-event-id"), None)
    if header is not None:
        text = header.decode("latin-1").strip()
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses
        if not (text.isascii() and text.isdigit()) or int(text[:20]) > MAX_EVENT_ID:
            raise InvalidQuery(
                f"Last-Event-ID must be an event id (an integer 0-{MAX_EVENT_ID}), "
                f"got {text[:50]!r}",
                field="Last-Event-ID",
            )
        return int(text)  # the header wins over the query (a browser's reconnect)
    return query


def install_events(surface: Surface, bus: EventBus, *, heartbeat: float) -> None:
    tags = ("events",)

    @surface.stream(
        "GET",
        "/api/events",
        "Server-Sent Events: replay (history / Last-Event-ID), then live events",
        responses={200: "An endless text/event-stream", 503: "Too many streams, or stopping"},
        params=(
            *FILTER_PARAMS,
            Param(
                "history",
                "query",
                {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": MAX_HISTORY},
                        words("true", "yes", "on", "false", "no", "off", blank=True),
                    ]
                },
                description=f"true, yes, on or the bare name: the last {DEFAULT_HISTORY}; "
                f"N: the last N (0-{MAX_HISTORY}); false, no, off: none",
            ),
            Param("named", "query", BOOLEAN_PARAM, description="add `event:` lines"),
            Param("lastEventId", "query", EVENT_ID, description="as the header"),
            Param(
                "Last-Event-ID",
                "header",
                EVENT_ID,
                description="resume after this id (wins over lastEventId)",
            ),
        ),
        event_schema=SSE_EVENT_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            params = query_params(scope)
            event_filter = _filter(params)
            named = bool_param(params, "named", False)
            history = _history(params)
            last_event_id = _last_event_id(scope, params)
            subscriber = bus.subscribe(event_filter, named=named)
        except LokiError as exc:
            await send_error(send, ApiError.from_loki(exc))
            return
        try:
            plan = bus.plan_replay(subscriber, last_event_id=last_event_id, history=history)
            with surface.gate.stream(scope) as grant:
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                    if grant.token_id is not None:
                        nursery.start_soon(_close_when_token_ends, grant, subscriber)
                    reason = await _pump(
                        send, bus, subscriber, event_filter, plan, named, heartbeat
                    )
                    await send(
                        {
                            "type": "http.response.body",
                            "body": sse_comment(reason),
                            "more_body": False,
                        }
                    )
                    nursery.cancel_scope.cancel()
        finally:
            bus.unsubscribe(subscriber)

    @surface.lean(
        "GET",
        "/api/events/history",
        "Stored events, oldest first",
        responses={200: "Events", 400: "Bad query value"},
        params=(
            *FILTER_PARAMS,
            Param("after", "query", EVENT_ID, description="ids above this, first ones"),
            Param("before", "query", EVENT_ID, description="ids below this"),
            Param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY},
                description=f"default {DEFAULT_HISTORY}",
            ),
        ),
        response_schema=HISTORY_SCHEMA,
        tags=tags,
        requires="read",
    )
    async def history(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        event_filter = _filter(params)
        limit = int_param(params, "limit", DEFAULT_HISTORY, minimum=1, maximum=MAX_HISTORY)
        after = int_param(params, "after", None, minimum=0, maximum=MAX_EVENT_ID)
        before = int_param(params, "before", None, minimum=0, maximum=MAX_EVENT_ID)
        assert limit is not None
        events = await bus.history(event_filter, after=after, before=before, limit=limit)
        return json_response(
            200,
            {"events": [e.envelope() for e in events], "count": len(events), "limit": limit},
        )

    @surface.lean(
        "GET",
        "/api/events/stats",
        "Event counts by type and level, subscribers, first/latest id, rate",
        responses={200: "Statistics"},
        tags=tags,
        requires="read",
    )
    async def stats(scope: Scope) -> LeanResponse:
        answer: dict[str, Any] = await bus.counts()
        answer["bus"] = api_converter.unstructure(bus.statistics())
        return json_response(200, answer)


async def _close_when_token_ends(grant: TokenStream, subscriber: Subscriber) -> None:
    """End the stream (`: closed: Token revoked`) once its token is revoked or expires."""
    subscriber.close(await grant.wait())


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _pump(
    send: Send,
    bus: EventBus,
    subscriber: Subscriber,
    event_filter: EventFilter,
    plan: ReplayPlan,
    named: bool,
    heartbeat: float,
) -> str:
    """Send replay then live events until the subscriber is closed; returns why it ended."""

    async def body(data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    opening = sse_retry(RETRY_MS) + sse_comment("connected")
    if plan.reset is not None:
        opening += sse_unnumbered(
            "stream.reset", {"type": "stream.reset", "data": plan.reset}, named
        )
    await body(opening)
    async for page in bus.replay(event_filter, plan):
        if subscriber.closed_reason is not None:  # e.g. its token was revoked: stop here
            break
        await body(b"".join(item.sse(named) for item in page))
    while True:
        with trio.move_on_after(heartbeat) as idle:
            try:
                frames = await subscriber.next_frames()
            except SubscriberClosed:
                if subscriber.closed_reason == "slow":
                    return "closed: this client fell behind; reconnect with Last-Event-ID"
                return f"closed: {subscriber.closed_reason}"
        if idle.cancelled_caught:
            await body(sse_comment("keep-alive"))
        else:
            await body(b"".join(frames))
