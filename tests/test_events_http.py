"""GET /api/events, /api/events/history, /api/events/stats against a real in-process daemon."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lokid.actors.event_bus import EventBus
from lokid.actors.store import StoreActor
from lokid.config import load_config
from lokid.daemon import Daemon, serve
from lokid.events import Level
from lokid.http.events import install_events
from lokid.http.surface import Surface


@contextlib.asynccontextmanager
async def running_daemon(home: pathlib.Path, **settings: Any) -> AsyncIterator[Daemon]:
    config = load_config(
        {"api_port": 0, "dashboard_port": 0, **settings}, environ={"LOKI_HOME": str(home)}
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(functools.partial(serve, config))
            yield daemon
            daemon.request_shutdown()


def api(daemon: Daemon) -> str:
    assert daemon.listeners is not None
    return daemon.listeners.urls()["api"]


class Stream:
    """An SSE client that parses frames into (fields) dicts."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.comments: list[str] = []

    async def frame(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        async for line in self.lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError("stream ended")

    async def events(self, count: int) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while len(found) < count:
            frame = await self.frame()
            if "data" in frame:
                found.append({**json.loads(frame["data"]), "_frame": frame})
        return found


@contextlib.asynccontextmanager
async def stream(
    url: str, params: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", f"{url}/api/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


async def publish(
    daemon: Daemon, type: str, session: str | None = None, level: Level = Level.INFO
) -> int:
    return (await daemon.bus.publish(type, session, level, {"t": type})).id


async def test_stream_starts_with_retry_and_delivers_live_events(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, stream(api(daemon)) as sse:
        first = await sse.frame()
        assert first == {"retry": "3000"}
        event_id = await publish(daemon, "task.started", "s1")
        (event,) = await sse.events(1)
        assert event["id"] == event_id
        assert event["_frame"]["id"] == str(event_id)
        assert "event" not in event["_frame"]  # onmessage fires for unnamed frames
        assert event["type"] == "task.started" and event["sessionId"] == "s1"
        assert "connected" in sse.comments


async def test_named_frames_carry_the_type(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, stream(api(daemon), {"named": "true"}) as sse:
        await publish(daemon, "error", level=Level.ERROR)
        (event,) = await sse.events(1)
        assert event["_frame"]["event"] == "error"


async def test_filters_session_types_and_level(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        params = {"sessionId": "s1", "types": "task.*,error", "minLevel": "info"}
        async with stream(api(daemon), params) as sse:
            await publish(daemon, "task.started", "s2")  # other session
            await publish(daemon, "log", "s1")  # other type
            await publish(daemon, "task.created", "s1", Level.DEBUG)  # below level
            wanted = [
                await publish(daemon, "task.started", "s1"),
                await publish(daemon, "error", "s1", Level.ERROR),
            ]
            events = await sse.events(2)
        assert [e["id"] for e in events] == wanted


async def test_history_true_and_n(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        ids = [await publish(daemon, "task.started") for _ in range(5)]
        async with stream(api(daemon), {"history": "2", "types": "task.started"}) as sse:
            assert [e["id"] for e in await sse.events(2)] == ids[-2:]
            live = await publish(daemon, "task.started")
            assert [e["id"] for e in await sse.events(1)] == [live]
        async with stream(api(daemon), {"history": "true"}) as sse:
            events = await sse.events(6)  # the daemon's own start event, then ours
            assert [e["id"] for e in events][-5:] == ids


@pytest.mark.parametrize("how", ["header", "query"])
async def test_last_event_id_resumes_after_it(tmp_path: pathlib.Path, how: str) -> None:
    async with running_daemon(tmp_path) as daemon:
        ids = [await publish(daemon, "log") for _ in range(4)]
        params = {"lastEventId": str(ids[1])} if how == "query" else None
        headers = {"Last-Event-ID": str(ids[1])} if how == "header" else None
        async with stream(api(daemon), params, headers) as sse:
            more = await publish(daemon, "log")
            assert [e["id"] for e in await sse.events(3)] == [ids[2], ids[3], more]


async def test_replay_across_a_daemon_restart(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        before = [await publish(daemon, "task.completed") for _ in range(3)]
    async with running_daemon(tmp_path) as daemon:
        after = await publish(daemon, "task.completed")
        assert after > before[-1]
        headers = {"Last-Event-ID": str(before[0])}
        async with stream(api(daemon), {"types": "task.completed"}, headers) as sse:
            assert [e["id"] for e in await sse.events(3)] == [*before[1:], after]


async def test_stream_reset_when_last_event_id_is_past_retention(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path, event_retention_count=3) as daemon:
        ids = [await publish(daemon, "log") for _ in range(8)]
        await daemon.bus.prune()
        async with stream(api(daemon), None, {"Last-Event-ID": str(ids[0])}) as sse:
            reset = await sse.frame()
            while "data" not in reset:
                reset = await sse.frame()
            body = json.loads(reset["data"])
            assert "id" not in reset  # the client's Last-Event-ID is kept
            assert body["type"] == "stream.reset"
            assert body["data"]["reason"] == "expired"
            assert [e["id"] for e in await sse.events(3)] == ids[-3:]


async def test_every_listener_serves_the_stream(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.listeners is not None
        urls = daemon.listeners.urls()
        async with stream(urls["dashboard"]) as sse:
            event_id = await publish(daemon, "log")
            assert (await sse.events(1))[0]["id"] == event_id
        transport = httpx.AsyncHTTPTransport(uds=urls["socket"])
        async with httpx.AsyncClient(transport=transport, timeout=10) as client:
            answer = await client.get("http://lokid/dashboard/api/events/history")
            assert event_id in [e["id"] for e in answer.json()["events"]]


async def test_client_that_vanishes_is_unsubscribed(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        async with stream(api(daemon)) as sse:
            await sse.frame()
            assert daemon.bus.subscriber_count == 1
        with trio.fail_after(10):
            while daemon.bus.subscriber_count:
                await publish(daemon, "log")  # writes to the dead connection fail too
                await trio.sleep(0.05)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/events?minLevel=loud", "minLevel"),
        ("/api/events?types=task.started,nope", "types"),
        ("/api/events?history=lots", "history"),
        ("/api/events?history=5000", "history"),
        ("/api/events?named=maybe", "named"),
        ("/api/events?lastEventId=-1", "lastEventId"),
        ("/api/events/history?limit=abc", "limit"),
        ("/api/events/history?limit=0", "limit"),
        ("/api/events/history?after=x", "after"),
        ("/api/events/history?minLevel=loud", "minLevel"),
        ("/api/events/history?types=", "types"),
    ],
)
async def test_bad_query_values_are_400_naming_the_field(
    tmp_path: pathlib.Path, path: str, field: str
) -> None:
    async with running_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(api(daemon) + path)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "BAD_REQUEST"
    assert error["details"]["field"] == field


async def test_bad_last_event_id_header_is_400(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(api(daemon) + "/api/events", headers={"Last-Event-ID": "abc"})
    assert answer.status_code == 400
    assert answer.json()["error"]["details"]["field"] == "Last-Event-ID"


async def test_history_and_stats_routes(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        ids = [await publish(daemon, "task.started", "s1") for _ in range(3)]
        history = (
            await client.get(
                api(daemon) + "/api/events/history", params={"sessionId": "s1", "limit": 2}
            )
        ).json()
        assert [e["id"] for e in history["events"]] == ids[1:]
        assert (history["count"], history["limit"]) == (2, 2)
        stats = (await client.get(api(daemon) + "/api/events/stats")).json()
        assert stats["byType"]["task.started"] == 3
        assert stats["latestId"] == ids[-1]
        assert stats["subscribers"] == 0


def events_scope() -> dict[str, Any]:
    """The ASGI scope of a plain `GET /api/events` (for a handler driven in memory)."""
    return {
        "type": "http",
        "method": "GET",
        "path": "/api/events",
        "query_string": b"",
        "headers": [],
    }


async def test_heartbeat_comments_on_the_virtual_clock(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The stream handler alone, in memory: no events, so no store access is needed.
    bus = EventBus(StoreActor(tmp_path / "unused.db"))
    surface = Surface("t", "0")
    install_events(surface, bus, heartbeat=15)
    sent: list[tuple[float, bytes]] = []
    disconnect = trio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append((trio.current_time(), message["body"]))

    scope = events_scope()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(surface, scope, receive, send)
        await trio.sleep(50)
        disconnect.set()
    beats = [round(t - start, 3) for t, body in sent if body == b": keep-alive\n\n"]
    assert beats == [15.0, 30.0, 45.0]
    assert bus.subscriber_count == 0


async def test_a_stopping_daemon_ends_streams_and_refuses_new_ones(
    tmp_path: pathlib.Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that reconnects at once (`loki events -f`) must not get a new stream that
    holds the stopping listeners open: 503 UNAVAILABLE instead."""
    bus = EventBus(StoreActor(tmp_path / "unused.db"))  # no events: no store access
    surface = Surface("t", "0")
    install_events(surface, bus, heartbeat=15)

    async def get_events() -> tuple[int, bytes]:
        status: list[int] = []
        body: list[bytes] = []

        async def receive() -> dict[str, Any]:
            await trio.sleep_forever()  # the client stays
            raise AssertionError("unreachable")  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            else:
                body.append(message.get("body", b""))

        scope = events_scope()
        await surface(scope, receive, send)
        return status[0], b"".join(body)

    opened: list[tuple[int, bytes]] = []
    async with trio.open_nursery() as nursery:

        async def first() -> None:
            opened.append(await get_events())

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        assert bus.subscriber_count == 1
        assert bus.refuse_streams("lokid is stopping") == 1
    [(status, body)] = opened
    assert status == 200 and body.endswith(b": closed: shutdown\n\n")
    status, body = await get_events()
    assert status == 503
    assert json.loads(body)["error"] == {
        "code": "UNAVAILABLE",
        "message": "lokid is stopping",
        "details": {},
    }
    assert bus.subscriber_count == 0


async def test_head_on_the_stream_is_its_head_without_a_subscription(
    tmp_path: pathlib.Path,
) -> None:
    """HEAD is answered for every GET route (docs/http.md), the SSE stream included: its
    status and headers, no body, and no subscriber left behind; on every listener."""
    async with running_daemon(tmp_path) as daemon:
        assert daemon.listeners is not None
        urls = daemon.listeners.urls()
        transport = httpx.AsyncHTTPTransport(uds=urls["socket"])
        async with (
            httpx.AsyncClient(timeout=10) as client,
            httpx.AsyncClient(transport=transport, timeout=10) as control,
        ):
            answers = [
                await client.head(urls["api"] + "/api/events"),
                await client.head(urls["dashboard"] + "/api/events"),
                await control.head("http://lokid/api/events"),
                await control.head("http://lokid/dashboard/api/events"),
            ]
            refused = await client.head(urls["api"] + "/api/events?minLevel=loud")
        for answer in answers:
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/event-stream")
            assert answer.content == b""
        assert refused.status_code == 400  # the same refusal as GET's
        assert daemon.bus.subscriber_count == 0
