"""Drive an ASGI app in memory (no sockets), the way Hypercorn's tests drive its protocols."""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio

from lokid.http.surface import ASGIApp


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: ASGIApp,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunk: int = 65536,
    send_length: bool = True,
    host: str = "test",
) -> Answer:
    query = b""
    if "?" in path:
        path, raw_query = path.split("?", 1)
        query = raw_query.encode()
    header_list = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if send_length and body and b"content-length" not in {k for k, _ in header_list}:
        header_list.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", host.encode()), *header_list],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8420),
        "extensions": {},
    }
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    events = [
        {"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
        for i, piece in enumerate(pieces)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        await trio.sleep_forever()  # the client stays connected until the response is sent
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(
        start["status"],
        {k.decode().lower(): v.decode() for k, v in start["headers"]},
        data,
    )
