"""`WS /ws` on a real daemon (in-process, real listeners), driven by trio-websocket."""

from __future__ import annotations

import datetime as dt
import json
import logging
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from lokid.actors.event_bus import MAX_BATCH_EVENTS, MAX_EMIT_MANY
from lokid.daemon import Daemon
from lokid.events import Level
from lokid.http import ws as ws_module
from lokid.http.ws import CLIENT_QUEUE, MESSAGE_TYPES
from lokid.timefmt import iso, utc_now
from lokid.tokens import create_token

from .sessions_kit import eventually
from .test_events_http import running_daemon

WAIT = 10.0


def ws_url(daemon: Daemon, query: str = "") -> str:
    assert daemon.listeners is not None
    base = daemon.listeners.urls()["dashboard"].replace("http://", "ws://")
    return f"{base}/ws{query}"


@asynccontextmanager
async def open_websocket_url_after_start(
    home: pathlib.Path,
) -> AsyncIterator[tuple[Daemon, WebSocketConnection]]:
    async with running_daemon(home) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await connected(daemon, 1)
        yield daemon, ws


async def next_message(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(WAIT):
        message: dict[str, Any] = json.loads(await ws.get_message())
        return message


async def connected(daemon: Daemon, count: int) -> None:
    await eventually(lambda: daemon.hub.statistics().clients == count, f"{count} clients")


async def test_published_updates_reach_every_client(tmp_path: pathlib.Path) -> None:
    async with (
        running_daemon(tmp_path) as daemon,
        open_websocket_url(ws_url(daemon)) as first,
        open_websocket_url(ws_url(daemon)) as second,
    ):
        await connected(daemon, 2)
        daemon.hub.publish("task.moved", {"id": "task-1", "column": "done"})
        for ws in (first, second):
            assert await next_message(ws) == {
                "type": "task.moved",
                "data": {"id": "task-1", "column": "done"},
            }


async def test_topics_ping_and_bad_messages(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "topics": ["project.*"]}))
        assert await next_message(ws) == {"type": "subscribed", "data": {"topics": ["project.*"]}}
        daemon.hub.publish("task.created", {"id": "task-1"})
        daemon.hub.publish("project.updated", {"id": "proj-1"})
        assert (await next_message(ws))["type"] == "project.updated"  # task.created skipped
        await ws.send_message(json.dumps({"type": "ping"}))
        assert await next_message(ws) == {"type": "pong", "data": {}}
        for bad in ("not json", "[1]", json.dumps({"type": "launch"})):
            await ws.send_message(bad)
            answer = await next_message(ws)
            assert answer["type"] == "error" and answer["data"]["message"]
        await ws.send_message(json.dumps({"type": "subscribe", "topics": "task.*"}))
        assert (await next_message(ws))["type"] == "error"
        await ws.send_message(json.dumps({"type": "subscribe", "topics": []}))
        assert await next_message(ws) == {"type": "subscribed", "data": {"topics": []}}
        daemon.hub.publish("task.created", {"id": "task-2"})
        assert (await next_message(ws))["data"] == {"id": "task-2"}  # everything again


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("[" * 30000 + "]" * 30000, "not usable JSON: nested more than 100 levels deep"),
        ('{"a":' * 990 + "1" + "}" * 990, "not usable JSON: nested more than 100 levels deep"),
        ('{"type": "ping", "n": ' + "9" * 5000 + "}", "not usable JSON: an integer has more"),
        ('{"type": "ping", "type": "subscribe"}', 'not usable JSON: the key "type" appears twice'),
    ],
)
async def test_json_too_deep_or_too_long_is_an_error_message(
    tmp_path: pathlib.Path, message: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Like any other bad JSON: an error message, the connection stays open, nothing logged."""
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await ws.send_message(message)
        answer = await next_message(ws)
        assert answer["type"] == "error"
        assert answer["data"]["message"].startswith(said)
        await ws.send_message(json.dumps({"type": "ping"}))
        assert await next_message(ws) == {"type": "pong", "data": {}}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_topics_that_can_never_match_are_refused_by_name(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "topics": ["task.moved"]}))
        assert (await next_message(ws))["data"] == {"topics": ["task.moved"]}
        refusals = {
            "*": "topics[0] '*' matches no message",
            "tasks.*": "topics[0] 'tasks.*' matches no message",
            "task.moves": "topics[0] 'task.moves' matches no message",
            "": "(an empty list means everything)",
            "x" * 1000: "topics[0] '" + "x" * 100 + "…' matches no message",
        }
        for topic, says in refusals.items():
            await ws.send_message(json.dumps({"type": "subscribe", "topics": [topic]}))
            answer = await next_message(ws)
            assert answer["type"] == "error", topic
            assert says in answer["data"]["message"]
            assert "task.*" in answer["data"]["message"]  # the families that do exist
        await ws.send_message(json.dumps({"type": "subscribe", "topics": ["task.*", 7]}))
        assert "topics[1] must be a string" in (await next_message(ws))["data"]["message"]
        too_many = ["task.moved"] * 101
        await ws.send_message(json.dumps({"type": "subscribe", "topics": too_many}))
        assert "at most 100; got 101" in (await next_message(ws))["data"]["message"]
        await ws.send_message(json.dumps({"type": "hello"}))
        assert "subscribe, ping, pong" in (await next_message(ws))["data"]["message"]
        # A refused subscribe leaves the topics in force as they were.
        daemon.hub.publish("task.created", {"id": "task-1"})
        daemon.hub.publish("task.moved", {"id": "task-1"})
        assert (await next_message(ws))["type"] == "task.moved"
        with pytest.raises(ValueError, match="not a /ws message type"):
            daemon.hub.publish("task.moves", {})


def test_every_message_type_is_documented() -> None:
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "websocket.md").read_text()
    families = {t.partition(".")[0] for t in MESSAGE_TYPES}
    for message_type in MESSAGE_TYPES:
        family = message_type.partition(".")[0]
        assert f"`{message_type}`" in doc or f"`{family}.*`" in doc, message_type
    assert families == {"task", "project", "registry", "session", "phase", "agent"}


async def test_a_burst_of_a_whole_bus_batch_reaches_a_client_that_reads(
    tmp_path: pathlib.Path,
) -> None:
    """The bus fans a batch out without a checkpoint: a client reading as fast as it
    can must not be closed as slow by a burst of agent output (it was, at ~300 lines)."""
    burst = MAX_BATCH_EVENTS + MAX_EMIT_MANY - 1
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await connected(daemon, 1)
        await daemon.bus.emit_many(
            [("agent.output", "session-x", Level.INFO, {"line": f"l{n}"}) for n in range(burst)]
        )
        lines = [(await next_message(ws))["data"]["data"]["line"] for _ in range(burst)]
        assert lines == [f"l{n}" for n in range(burst)]
        assert daemon.hub.statistics().closed_slow == 0


async def test_session_events_are_forwarded_and_others_are_not(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await connected(daemon, 1)
        await daemon.bus.publish("log", None, Level.INFO, {"message": "not for /ws"})
        await daemon.bus.publish("session.paused", "session-x", Level.INFO, {"reason": "test"})
        message = await next_message(ws)
        assert message["type"] == "session.paused"
        assert message["data"]["sessionId"] == "session-x"
        assert message["data"]["data"] == {"reason": "test"}


async def test_a_client_that_falls_behind_is_closed_with_1013(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        await connected(daemon, 1)
        for n in range(CLIENT_QUEUE + 10):  # no checkpoint: the queue fills at once
            daemon.hub.publish("task.updated", {"n": n})
        received = 0
        with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
            while True:
                await ws.get_message()
                received += 1
        assert closed.value.reason is not None and closed.value.reason.code == 1013
        assert received <= CLIENT_QUEUE
        assert daemon.hub.statistics().closed_slow == 1
        await connected(daemon, 0)


async def test_a_plain_get_of_ws_is_a_clear_400(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.listeners is not None
        url = daemon.listeners.urls()["dashboard"] + "/ws"
        async with httpx.AsyncClient(timeout=WAIT) as client:
            answer = await client.get(url)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "BAD_REQUEST"


async def rejected(url: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and error of a handshake the server refuses before the upgrade."""
    with trio.fail_after(WAIT), pytest.raises(ConnectionRejected) as refused:
        async with open_websocket_url(url):
            pass
    return refused.value.status_code, json.loads(refused.value.body or b"")["error"]


@pytest.mark.parametrize("auth", [False, True])
async def test_a_handshake_to_a_path_without_a_websocket_is_a_clear_refusal(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, auth: bool
) -> None:
    async with running_daemon(tmp_path, auth_enabled=auth) as daemon:
        made = await daemon.store.write(
            lambda db: create_token(db, {"name": "viewer", "scopes": ["read"]})
        )
        query = f"?token={made['token']}" if auth else ""
        assert daemon.listeners is not None
        urls = {k: v.replace("http://", "ws://") for k, v in daemon.listeners.urls().items()}
        expected = {
            f"{urls['api']}/ws": (404, "NOT_FOUND", "No WebSocket route for /ws"),
            f"{urls['dashboard']}/nothing": (404, "NOT_FOUND", "No WebSocket route for /nothing"),
            f"{urls['api']}/api/status": (400, "BAD_REQUEST", "/api/status is not a WebSocket"),
            f"{urls['dashboard']}/api/projects": (
                400,
                "BAD_REQUEST",
                "/api/projects is not a WebSocket",
            ),
        }
        for url, (status, code, message) in expected.items():
            answer, error = await rejected(url + query)
            assert (answer, error["code"]) == (status, code), url
            assert error["message"].startswith(message)
        if auth:  # the gate comes first: no token, no route names
            assert await refusal(f"{urls['dashboard']}/nothing") == (1008, "UNAUTHORIZED")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_auth_and_origin_rules_apply_to_the_handshake(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path, auth_enabled=True) as daemon:
        made = await daemon.store.write(
            lambda db: create_token(db, {"name": "viewer", "scopes": ["read"]})
        )
        assert await refusal(ws_url(daemon)) == (1008, "UNAUTHORIZED")
        async with open_websocket_url(ws_url(daemon, f"?token={made['token']}")) as ws:
            await connected(daemon, 1)
            daemon.hub.publish("registry.updated", {"total": 1})
            assert (await next_message(ws))["type"] == "registry.updated"
        own_page = daemon.listeners.urls()["dashboard"]  # type: ignore[union-attr]
        same = [
            (b"Authorization", f"Bearer {made['token']}".encode()),
            (b"Origin", own_page.encode()),
        ]
        async with open_websocket_url(ws_url(daemon), extra_headers=same) as ws:
            await ws.send_message(json.dumps({"type": "ping"}))
            assert (await next_message(ws))["type"] == "pong"  # the dashboard's own page
        header = [
            (b"Authorization", f"Bearer {made['token']}".encode()),
            (b"Origin", b"http://evil.example"),
        ]
        assert await refusal(ws_url(daemon), header) == (1008, "FORBIDDEN")


async def made_token(daemon: Daemon, scope: str) -> dict[str, Any]:
    """A new token with one scope, as `POST /api/enterprise/tokens` answers it."""
    made: dict[str, Any] = await daemon.store.write(
        lambda db: create_token(db, {"name": scope, "scopes": [scope]})
    )
    return made


async def test_revoking_a_token_closes_the_websockets_opened_with_it(
    tmp_path: pathlib.Path,
) -> None:
    async with running_daemon(tmp_path, auth_enabled=True) as daemon:
        admin, revoked, kept = [await made_token(daemon, s) for s in ("admin", "read", "read")]
        async with (
            open_websocket_url(ws_url(daemon, f"?token={revoked['token']}")) as doomed,
            open_websocket_url(ws_url(daemon, f"?token={kept['token']}")) as survivor,
        ):
            await connected(daemon, 2)
            dashboard = daemon.listeners.urls()["dashboard"]  # type: ignore[union-attr]
            async with httpx.AsyncClient(timeout=WAIT) as client:
                answer = await client.delete(
                    f"{dashboard}/api/enterprise/tokens/{revoked['id']}",
                    headers={"Authorization": f"Bearer {admin['token']}"},
                )
            assert answer.status_code == 200
            daemon.hub.publish("registry.updated", {"total": 1})
            with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
                await doomed.get_message()  # closed, not sent the update
            assert closed.value.reason is not None
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                1008,
                "UNAUTHORIZED: Token revoked",
            )
            assert (await next_message(survivor))["type"] == "registry.updated"
            await connected(daemon, 1)
            assert daemon.gate.token_streams == 1  # the survivor's; the revoked one is gone
        await connected(daemon, 0)
        assert daemon.gate.token_streams == 0


async def test_a_websocket_is_closed_when_its_token_expires(tmp_path: pathlib.Path) -> None:
    async with running_daemon(tmp_path, auth_enabled=True) as daemon:
        made = await made_token(daemon, "read")
        soon = iso(utc_now() + dt.timedelta(seconds=1))
        await daemon.store.write(
            lambda db: db.execute(
                "UPDATE api_tokens SET expires_at = ? WHERE id = ?", (soon, made["id"])
            )
        )
        async with open_websocket_url(ws_url(daemon, f"?token={made['token']}")) as ws:
            with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1008
        assert closed.value.reason.reason == "UNAUTHORIZED: Token expired"


async def refusal(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, str]:
    """The close code and the error code in the reason of a refused handshake (which is
    accepted, then closed at once: a browser sees 1008 and why, not a bare 1006)."""
    with trio.fail_after(WAIT):
        async with open_websocket_url(url, extra_headers=headers) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
    reason = closed.value.reason
    assert reason is not None
    return reason.code, (reason.reason or "").partition(":")[0]


async def test_quiet_connections_get_keep_alive_pings(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_module, "KEEPALIVE_SECONDS", 0.05)
    async with running_daemon(tmp_path) as daemon, open_websocket_url(ws_url(daemon)) as ws:
        assert await next_message(ws) == {"type": "ping", "data": {}}
        await ws.send_message(json.dumps({"type": "pong"}))  # answered with nothing
        assert await next_message(ws) == {"type": "ping", "data": {}}


async def test_a_websocket_opened_after_the_stop_began_is_closed_with_1001(
    tmp_path: pathlib.Path,
) -> None:
    async with running_daemon(tmp_path) as daemon:
        assert daemon.hub.close_all() == 0  # what the stop does first
        async with open_websocket_url(ws_url(daemon)) as ws:
            with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1001


async def test_a_stopping_daemon_closes_websockets_with_1001(tmp_path: pathlib.Path) -> None:
    async with open_websocket_url_after_start(tmp_path) as (daemon, ws):
        started = trio.current_time()
        daemon.request_shutdown()
        with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1001
        assert trio.current_time() - started < 5  # not the listener's graceful timeout
