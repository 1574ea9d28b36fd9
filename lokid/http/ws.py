"""`WS /ws` of the Dashboard API: live board, registry and session updates (DESIGN.md §7).

Theory of operation:

* **One hub, one encoding.** `DashboardHub.publish(type, data)` encodes the
  message `{"type", "data"}` once and offers the same text to every
  connected client whose topics match. It is synchronous and never waits:
  the board and registry call it right after their change commits, and the
  event bus calls `offer_event` from its fan-out for every session event
  (`session.*`, `phase.*`, `agent.*`).
* **Bounded per client.** Each client has a queue of `CLIENT_QUEUE`
  messages, drained by its own sender task. The event bus fans out a whole
  batch of events (up to `MAX_BATCH_EVENTS + MAX_EMIT_MANY - 1`, e.g. a
  burst of agent output) without a checkpoint, so no sender runs in
  between: the queue holds one such batch with room to spare, or a client
  reading as fast as it can would be closed by any burst. A client whose
  queue is full all the same has fallen behind: it is closed with code
  1013 ("try again later") and must reconnect; nothing else waits for it.
  The queued messages are the hub's shared strings (encoded once for all
  clients), so a full queue costs references, not copies.
* **Topics.** A new client gets everything. `{"type": "subscribe",
  "topics": [...]}` replaces its topics: exact types of `MESSAGE_TYPES`
  (`task.moved`) or their families (`task.*`); an empty list means
  everything again. A topic that can never match (a typo, `*`) is refused
  with an `error` naming it, rather than silently muting the connection.
  `{"type": "ping"}` is answered `{"type": "pong"}`. Anything else gets an
  `{"type": "error", "data": {"message": ...}}` and the connection stays.
  Messages over `MAX_CLIENT_MESSAGE` bytes close the connection (1009).
* **Keep-alive**: after `KEEPALIVE_SECONDS` without a message the server
  sends `{"type": "ping", "data": {}}` (a client may answer `pong`; it is
  ignored), so proxies and NAT keep the connection. Not Hypercorn's
  protocol pings: its ping task outlives a closed connection by up to one
  interval and held every graceful shutdown for the listener's whole
  timeout.
* **Auth** is the gate's (a token in `Authorization` or `?token=`, the
  origin check); a refused handshake is accepted and closed with 1008 and the reason.
  A connection opened with a token is closed with 1008 (`UNAUTHORIZED: Token
  revoked` / `Token expired`) when that token is revoked or expires
  (`Gate.stream`). Client messages change nothing, so none is audited.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs
import trio
from quart import websocket

from lokid.actors.event_bus import MAX_BATCH_EVENTS, MAX_EMIT_MANY
from lokid.events import EVENT_TYPES, EncodedEvent
from lokid.http.gate import TokenStream
from lokid.http.surface import Surface
from lokid.jsontypes import UnusableJson, loads_bounded

CLIENT_QUEUE = 4096  # messages queued per client before it is closed as slow
assert CLIENT_QUEUE >= MAX_BATCH_EVENTS + MAX_EMIT_MANY - 1  # one bus batch fits (module)
MAX_CLIENT_MESSAGE = 64 * 1024  # bytes of one message from a client
MAX_TOPICS = 100
MAX_TOPIC_LENGTH = 100
FORWARDED_FAMILIES = frozenset({"session", "phase", "agent"})  # event bus -> /ws
BOARD_TYPES = frozenset(
    {
        "task.created",
        "task.updated",
        "task.moved",
        "task.deleted",
        "project.created",
        "project.updated",
        "project.deleted",
    }
)
MESSAGE_TYPES = (
    BOARD_TYPES
    | {"registry.updated"}
    | {t for t in EVENT_TYPES if t.partition(".")[0] in FORWARDED_FAMILIES}
)
"""Every type the hub sends as an update: what a topic may name."""
TOPIC_FAMILIES = frozenset(t.partition(".")[0] for t in MESSAGE_TYPES)
CLOSE_SLOW = 1013
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008  # the token it was opened with was revoked or expired
CLOSE_REASONS = {CLOSE_SLOW: "too slow: reconnect", CLOSE_GOING_AWAY: "lokid is stopping"}
CLOSE_SECONDS = 5.0  # how long closing a slow client may take
KEEPALIVE_SECONDS = 20.0
PING = '{"type":"ping","data":{}}'


@attrs.frozen
class HubStatistics:
    clients: int
    clients_total: int
    published: int
    delivered: int
    closed_slow: int


class WsClient:
    """One connection: its topics and its bounded queue of encoded messages."""

    def __init__(self, hub: DashboardHub) -> None:
        self.hub = hub
        self.types: frozenset[str] = frozenset()
        self.families: frozenset[str] = frozenset()
        self.slow = False
        self.close_code: int | None = None  # set when the server ends the connection
        self.close_reason = ""
        self.ended = trio.Event()
        self._send, self.inbox = trio.open_memory_channel[str](CLIENT_QUEUE)

    def wants(self, message_type: str) -> bool:
        if not self.types and not self.families:
            return True
        if message_type in self.types:
            return True
        family, dot, _ = message_type.partition(".")
        return bool(dot) and family in self.families

    def subscribe(self, topics: Iterable[str]) -> list[str]:
        """Replace the topics; the normalised list (empty: everything)."""
        types: set[str] = set()
        families: set[str] = set()
        for topic in topics:
            if topic.endswith(".*"):
                families.add(topic[:-2])
            else:
                types.add(topic)
        self.types, self.families = frozenset(types), frozenset(families)
        return sorted(types) + sorted(f"{family}.*" for family in families)

    def offer(self, text: str) -> bool:
        """Queue `text`; False (and the client marked slow) when its queue is full."""
        if self.slow:
            return False
        try:
            self._send.send_nowait(text)
        except trio.WouldBlock:
            self.slow = True
            self.hub.closed_slow += 1
            self.end(CLOSE_SLOW)  # its handler stops sending and closes with 1013
            return False
        except trio.ClosedResourceError:
            return False
        return True

    def end(self, code: int, reason: str | None = None) -> None:
        """Make the handler close the connection with `code` and `reason` (by default
        `CLOSE_REASONS[code]`); the first call wins."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason if reason is not None else CLOSE_REASONS[code]
            self.ended.set()

    def close(self) -> None:
        self._send.close()


class DashboardHub:
    """Fan-out of dashboard messages to the connected `/ws` clients (module rules)."""

    def __init__(self) -> None:
        self.clients: set[WsClient] = set()
        self.clients_total = 0
        self.published = 0
        self.delivered = 0
        self.closed_slow = 0
        self.stopping = False

    def connect(self) -> WsClient:
        """A new connection's client; already ended (1001) once the daemon is stopping, so
        a handshake that slips in after `close_all` cannot hold the listener's drain."""
        client = WsClient(self)
        self.clients.add(client)
        self.clients_total += 1
        if self.stopping:
            client.end(CLOSE_GOING_AWAY)
        return client

    def close_all(self) -> int:
        """End every connection with 1001 (the daemon is stopping), and every later one at
        once; how many were open."""
        self.stopping = True
        for client in self.clients:
            client.end(CLOSE_GOING_AWAY)
        return len(self.clients)

    def disconnect(self, client: WsClient) -> None:
        self.clients.discard(client)
        client.close()

    def publish(self, message_type: str, data: Any) -> None:
        """Send `{"type": message_type, "data": data}` to every client that wants it.

        Raises `ValueError` for a type not in `MESSAGE_TYPES` (a bug: no topic could
        select it, and the docs would not list it)."""
        if message_type not in MESSAGE_TYPES:
            raise ValueError(f"{message_type!r} is not a /ws message type")
        self._fan_out(message_type, json.dumps({"type": message_type, "data": data}))

    def offer_event(self, encoded: EncodedEvent) -> None:
        """An event bus listener: forward session, phase and agent events."""
        event_type = encoded.event.type
        if event_type.partition(".")[0] in FORWARDED_FAMILIES and self.clients:
            self._fan_out(event_type, f'{{"type":{json.dumps(event_type)},"data":{encoded.json}}}')

    def _fan_out(self, message_type: str, text: str) -> None:
        self.published += 1
        for client in list(self.clients):
            if client.wants(message_type) and client.offer(text):
                self.delivered += 1

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            clients=len(self.clients),
            clients_total=self.clients_total,
            published=self.published,
            delivered=self.delivered,
            closed_slow=self.closed_slow,
        )


def install_ws(surface: Surface, hub: DashboardHub) -> None:
    @surface.websocket(
        "/ws",
        "Live updates: board, registry and session events as {type, data} messages",
        tags=("websocket",),
        requires="read",
    )
    async def dashboard_ws() -> None:
        await websocket.accept()
        with surface.gate.stream(websocket.scope) as grant:
            client = hub.connect()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_sender, client)
                    nursery.start_soon(_stop_when_ended, client, nursery.cancel_scope)
                    if grant.token_id is not None:
                        nursery.start_soon(_end_when_token_ends, grant, client)
                    await _receiver(client)
                    nursery.cancel_scope.cancel()
                if client.close_code is not None:  # a stuck client may not take the close
                    with trio.move_on_after(CLOSE_SECONDS):
                        await websocket.close(client.close_code, client.close_reason)
            finally:
                hub.disconnect(client)


async def _sender(client: WsClient) -> None:
    while True:
        with trio.move_on_after(KEEPALIVE_SECONDS) as quiet:
            text = await client.inbox.receive()
        await websocket.send(PING if quiet.cancelled_caught else text)


async def _end_when_token_ends(grant: TokenStream, client: WsClient) -> None:
    """Close with 1008 once the connection's token is revoked or expires."""
    reason = await grant.wait()
    client.end(CLOSE_POLICY, f"UNAUTHORIZED: {reason}")


async def _stop_when_ended(client: WsClient, scope: trio.CancelScope) -> None:
    await client.ended.wait()
    scope.cancel()


async def _receiver(client: WsClient) -> None:
    while True:
        raw = await websocket.receive()
        if len(raw) > MAX_CLIENT_MESSAGE:
            await websocket.close(CLOSE_TOO_BIG, f"messages are limited to {MAX_CLIENT_MESSAGE}")
            return
        answer = _handle(client, raw)
        if answer is not None:
            client.offer(json.dumps(answer))


def _handle(client: WsClient, raw: str | bytes) -> dict[str, Any] | None:
    """The answer to one client message (None: none)."""
    try:
        message = loads_bounded(raw, unique_keys=True)
    except UnusableJson as exc:  # parsed: too deep, an integer too long, a key twice
        return _error(f"not usable JSON: {exc}")
    except (ValueError, UnicodeDecodeError):
        return _error('not JSON: send {"type": "subscribe", "topics": [...]} or ping')
    if not isinstance(message, dict):
        return _error("a message must be a JSON object with a type")
    kind = message.get("type")
    if kind == "ping":
        return {"type": "pong", "data": {}}
    if kind == "pong":  # an answer to our keep-alive
        return None
    if kind == "subscribe":
        topics = message.get("topics", [])
        problem = _topics_problem(topics)
        if problem is not None:
            return _error(problem)
        return {"type": "subscribed", "data": {"topics": client.subscribe(topics)}}
    return _error(f"unknown message type {str(kind)[:50]!r}; known: subscribe, ping, pong")


def _topics_problem(topics: object) -> str | None:
    """Why `topics` cannot be subscribed to (None: it can)."""
    if not isinstance(topics, list):
        return 'topics must be a list of message types, e.g. ["task.*", "session.completed"]'
    if len(topics) > MAX_TOPICS:
        return f"topics must be at most {MAX_TOPICS}; got {len(topics)}"
    for index, topic in enumerate(topics):
        if not isinstance(topic, str):
            return f"topics[{index}] must be a string; got {json.dumps(topic)[:50]}"
        family, dot, rest = topic.partition(".")
        if topic in MESSAGE_TYPES or (dot and rest == "*" and family in TOPIC_FAMILIES):
            continue
        shown = topic if len(topic) <= MAX_TOPIC_LENGTH else topic[:MAX_TOPIC_LENGTH] + "…"
        hint = " (an empty list means everything)" if topic in ("*", "") else ""
        families = ", ".join(f"{f}.*" for f in sorted(TOPIC_FAMILIES))
        return (
            f"topics[{index}] {shown!r} matches no message: use a message type "
            f"(e.g. task.moved, session.completed) or a family: {families}{hint}"
        )
    return None


def _error(message: str) -> dict[str, Any]:
    return {"type": "error", "data": {"message": message}}
