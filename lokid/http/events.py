"""Event routes: the SSE stream, history and stats (DESIGN.md §5 "Events").

The stream is a raw ASGI handler: after the headers, each wake-up takes
everything queued for the subscriber and sends it as one body chunk, so a
burst costs one write per client, not one per event, and no framework code
runs per event.
"""

from __future__ import annotations

from typing import Any

import trio

from lokid.actors.event_bus import EventBus, ReplayPlan, Subscriber, SubscriberClosed
from lokid.errors import InvalidQuery, LokiError
from lokid.events import EventFilter, make_filter, sse_comment, sse_retry, sse_unnumbered
from lokid.http.convert import api_converter
from lokid.http.errors import ApiError
from lokid.http.surface import (
    LeanResponse,
    Param,
    Receive,
    Scope,
    Send,
    Surface,
    bool_param,
    int_param,
    json_response,
    query_params,
    send_error,
)

RETRY_MS = 3000  # the `retry:` hint: how long browsers wait before reconnecting
DEFAULT_HISTORY = 100
MAX_HISTORY = 1000

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

FILTER_PARAMS = (
    Param("sessionId", "query", description="only events of this session"),
    Param("types", "query", description="comma list of types; `task.*` matches a family"),
    Param(
        "minLevel",
        "query",
        {"type": "string", "enum": ["debug", "info", "warning", "warn", "error"]},
        description="lowest level delivered",
    ),
)


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
    header = next((v for k, v in scope["headers"] if k == b"last-event-id"), None)
    if header is not None:
        text = header.decode("latin-1").strip()
        if not text.isdigit():
            raise InvalidQuery(
                f"Last-Event-ID must be an event id (an integer), got {text!r}",
                field="Last-Event-ID",
            )
        return int(text)
    return int_param(params, "lastEventId", None, minimum=0, maximum=2**63 - 1)


def install_events(surface: Surface, bus: EventBus, *, heartbeat: float) -> None:
    tags = ("events",)

    @surface.stream(
        "GET",
        "/api/events",
        "Server-Sent Events: replay (history / Last-Event-ID), then live events",
        responses={200: "An endless text/event-stream", 503: "Too many streams"},
        params=(
            *FILTER_PARAMS,
            Param("history", "query", description="`true` (last 100) or N (0-1000)"),
            Param("named", "query", {"type": "boolean"}, description="add `event:` lines"),
            Param("lastEventId", "query", {"type": "integer"}, description="as the header"),
            Param("Last-Event-ID", "header", {"type": "integer"}, description="resume after"),
        ),
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
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                reason = await _pump(send, bus, subscriber, event_filter, plan, named, heartbeat)
                await send(
                    {"type": "http.response.body", "body": sse_comment(reason), "more_body": False}
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
            Param("after", "query", {"type": "integer"}, description="ids above this, first ones"),
            Param("before", "query", {"type": "integer"}, description="ids below this"),
            Param("limit", "query", {"type": "integer"}, description="1-1000, default 100"),
        ),
        tags=tags,
        requires="read",
    )
    async def history(scope: Scope) -> LeanResponse:
        params = query_params(scope)
        event_filter = _filter(params)
        limit = int_param(params, "limit", 100, minimum=1, maximum=1000)
        after = int_param(params, "after", None, minimum=0, maximum=2**63 - 1)
        before = int_param(params, "before", None, minimum=0, maximum=2**63 - 1)
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
