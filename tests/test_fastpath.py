"""The inline HTTP/1.1 path: what it serves, what it hands to Hypercorn, and same answers."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from lokid.actors.listener import HttpListener
from lokid.http.errors import ApiError
from lokid.http.fastpath import SEND_SECONDS, parse_simple_request
from lokid.http.gate import Admission, Gate
from lokid.http.surface import (
    BODY_SECONDS,
    LeanResponse,
    Param,
    Receive,
    Scope,
    Send,
    Surface,
    error_answer,
    json_response,
    lean_json,
    path_param,
)


@pytest.mark.parametrize(
    ("head", "simple"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x", True),
        (b"HEAD /health?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0", True),
        (b"GET /health HTTP/1.0\r\nHost: x", False),  # only HTTP/1.1
        (b"POST /things HTTP/1.1\r\nHost: x", True),  # a change without a body
        (b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: 12", True),
        (b"PUT /things/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0", True),
        (b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577", True),  # 413 inline
        (b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: 123456789", False),  # huge
        (b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1", False),
        (b"POST /things HTTP/1.1\r\nHost: x\r\nContent-Length: -1", False),
        (b"OPTIONS /things HTTP/1.1\r\nHost: x", False),
        (b"GET /health HTTP/1.1", False),  # no Host
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked", False),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\n folded", False),  # obs-fold
        (b"GET /he%61lth HTTP/1.1\r\nHost: x", False),  # escapes: Hypercorn decodes
        (b"GET http://x/health HTTP/1.1\r\nHost: x", False),  # absolute form
        (b"GET /health HTTP/1.1\r\nHost : x", False),  # space before the colon
        # what Hypercorn refuses with 400 is not simple either
        (b"GET /health HTTP/1.1\r\nHost: x\r\nHost: y", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\rb", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX A: b", False),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX(A: b", False),
        (b"GET /health HTTP/1.1\r\nHost: x\nX-A: b", False),  # a bare LF inside
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: caf\xc3\xa9\tb", True),  # obs-text, tab
    ],
)
def test_only_certainly_simple_requests_are_inline(head: bytes, simple: bool) -> None:
    assert (parse_simple_request(head) is not None) is simple


def test_connection_close_and_query_are_kept() -> None:
    request = parse_simple_request(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nConnection: Close")
    assert request is not None
    assert (request.path, request.query, request.close) == ("/a", b"b=1", True)


def make_surface() -> Surface:
    surface = Surface("t", "0")

    @surface.lean(
        "GET", "/fast", "lean", responses={200: "ok"}, params=[Param("q", "query")], requires="read"
    )
    async def fast(scope: Scope) -> LeanResponse:
        return json_response(200, {"path": scope["path"], "query": scope["query_string"].decode()})

    @surface.stream("GET", "/stream", "stream", responses={200: "ok"}, requires="read")
    async def stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for n in range(3):
            await send({"type": "http.response.body", "body": f"{n}\n".encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @surface.lean(
        "POST", "/things/{id}/echo", "lean with a body", responses={200: "ok"}, requires="write"
    )
    async def echo(scope: Scope) -> LeanResponse:
        return json_response(200, {"id": path_param(scope, "id"), "body": lean_json(scope)})

    @surface.route("POST", "/slow", "quart", responses={200: "ok"}, requires="write")
    async def slow() -> dict[str, Any]:
        return {"quart": True}

    return surface


async def exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):  # answered before all was sent
            await stream.send_all(data)
        chunks = []
        with trio.move_on_after(3):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


class Refusing(Gate):
    """A gate that lets nothing through (as auth without a token)."""

    async def admit(self, scope: dict[str, Any], requires: str) -> Admission:
        return Admission(error_answer(ApiError("UNAUTHORIZED", "no token")))


async def with_listener(inline: bool, data: bytes, *, gate: Gate | None = None) -> bytes:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    surface = make_surface()
    if gate is not None:
        surface.gate = gate
    listener = HttpListener("t", surface, [sock], inline=surface if inline else None)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            answer = await exchange(sock.getsockname()[1], data)
            nursery.cancel_scope.cancel()
    sock.close()
    return answer


def split(raw: bytes, heads: list[bool]) -> list[tuple[str, bytes]]:
    """(status, body) of each response of a keep-alive exchange; `heads`: answers to HEAD."""
    answers = []
    for is_head in heads:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(
            int(v)
            for k, _, v in (line.partition(b": ") for line in lines[1:])
            if k.lower() == b"content-length"
        )
        length = 0 if is_head else length
        answers.append((lines[0].decode().split(" ", 2)[1], rest[:length]))
        raw = rest[length:]
    assert raw == b"", raw
    return answers


CLOSE = b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "requests",
    [
        [b"GET /fast?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"HEAD /fast HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"POST /fast HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"],  # 405, via hand-over
        # a lean change with a body, its path parameter, then a pipelined GET
        [
            b'POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"a": 1}',
            b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n",
        ],
        [b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{x}"],  # 400
        [b"GET /things/t-1/echo HTTP/1.1\r\nHost: x\r\n\r\n"],  # 405 on a template
        # chunked: Hypercorn reads it; the lean handler answers on both paths
        [
            b"POST /things/t-2/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n"
        ],
        [b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"],  # 404 from Quart, via hand-over
        # a query parameter the route does not declare: 400 on lean, stream and Quart
        # routes; the refused change's body is read, so the next request is served
        [b"GET /fast?q=1&qq=2 HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET /stream?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"],
        [
            b'POST /things/t-1/echo?x HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"a": 1}',
            b"GET /fast?q=3 HTTP/1.1\r\nHost: x\r\n\r\n",
        ],
        [b"POST /slow?now=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"],
        # a head over 16 KiB (Hypercorn answers it), in one piece
        [b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"],
        # pipelined: inline, inline, then a hand-over on the same connection
        [
            b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /fast?q=2 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        ],
    ],
)
async def test_inline_and_hypercorn_give_the_same_answers(requests: list[bytes]) -> None:
    data = b"".join(requests) + CLOSE
    heads = [r.startswith(b"HEAD") for r in requests] + [False]
    inline = split(await with_listener(True, data), heads)
    plain = split(await with_listener(False, data), heads)
    assert inline == plain
    assert len(inline) == len(requests) + 1


async def test_stream_route_is_chunked_and_closes() -> None:
    raw = await with_listener(True, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"2\r\n0\n\r\n2\r\n1\n\r\n2\r\n2\n\r\n0\r\n\r\n"


async def test_a_lean_change_is_answered_inline_with_its_body() -> None:
    request = b"POST /things/t-9/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
    raw = await with_listener(True, request + b'{"ok": true}' + CLOSE)
    [(status, body), _] = split(raw, [False, False])
    assert status == "200"
    assert body == b'{"id":"t-9","body":{"ok":true}}'


async def test_a_body_over_the_limit_is_413_on_both_paths() -> None:
    big = b"x" * (1024 * 1024 + 1)
    request = b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    for inline in (True, False):
        raw = await with_listener(inline, request + big)
        assert raw.startswith(b"HTTP/1.1 413"), raw[:200]


async def test_a_query_parameter_the_route_does_not_declare_is_400_on_both_paths() -> None:
    requests = [
        b"GET /fast?q=1&qq=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /stream?q=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b'POST /things/t-1/echo?x HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n{"a": 1}',
        b"POST /slow?now=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /fast?q=3 HTTP/1.1\r\nHost: x\r\n\r\n",  # declared: served
    ]
    for inline in (True, False):
        answers = split(await with_listener(inline, b"".join(requests) + CLOSE), [False] * 6)
        refused = [json.loads(body)["error"] for _, body in answers[:4]]
        assert [status for status, _ in answers] == ["400"] * 4 + ["200"] * 2
        assert [(e["code"], e["details"]["field"]) for e in refused] == [
            ("BAD_REQUEST", "qq"),
            ("BAD_REQUEST", "q"),
            ("BAD_REQUEST", "x"),
            ("BAD_REQUEST", "now"),
        ]
        assert "it takes q" in refused[0]["message"]
        assert "it takes no query parameters" in refused[1]["message"]
        assert json.loads(answers[4][1]) == {"path": "/fast", "query": "q=3"}


def without_date(raw: bytes) -> bytes:
    return b"\r\n".join(line for line in raw.split(b"\r\n") if not line.startswith(b"date:"))


async def test_head_on_a_stream_route_is_its_head_on_both_paths() -> None:
    """200 and the stream's headers, no body; the connection stays usable."""
    data = b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n" + CLOSE
    inline = without_date(await with_listener(True, data))
    plain = without_date(await with_listener(False, data))
    assert inline == plain
    head, _, rest = inline.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 200 ")  # the next request's answer, no body between
    assert rest.endswith(b'{"path":"/fast","query":""}')


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100000 + b"]" * 100000,
        b'{"a":' * 990 + b"1" + b"}" * 990,
        b'{"n": ' + b"9" * 5000 + b"}",
    ],
)
async def test_json_too_deep_or_too_long_is_400_on_both_paths(body: bytes) -> None:
    request = b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    for inline in (True, False):
        [(status, answer), _] = split(
            await with_listener(inline, request + body + CLOSE), [False] * 2
        )
        assert status == "400", answer
        assert json.loads(answer)["error"]["message"].startswith("Request body is not usable JSON")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /fast HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nX(A: b\r\n\r\n",
    ],
)
async def test_a_head_hypercorn_refuses_is_refused_inline_too(head: bytes) -> None:
    inline = without_date(await with_listener(True, head))
    assert inline == without_date(await with_listener(False, head))
    assert inline.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "head",
    [
        b"GET /fast HTTP/1.1\nHost: x\nConnection: close\n\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\n\n",
        b"GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\n\r\n",
    ],
)
async def test_a_head_with_bare_lf_line_ends_is_answered_at_once(head: bytes) -> None:
    """Not after the keep-alive period: Hypercorn reads it as soon as it is seen."""
    for inline in (True, False):
        with trio.fail_after(2):
            answer = await with_listener(inline, head)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert answer.endswith(b'{"path":"/fast","query":""}')


ANNOUNCED = b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"


@pytest.mark.parametrize("length", [2_000_000, 123_456_789])
async def test_a_body_announced_over_the_limit_is_413_at_once_on_both_paths(length: int) -> None:
    """Without waiting for the body (none is sent), and the connection is closed."""
    for inline in (True, False):
        with trio.fail_after(2):
            raw = await with_listener(inline, ANNOUNCED % length)
        assert raw.startswith(b"HTTP/1.1 413 "), raw[:200]
        assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("length", [1_000_000, 2_000_000])
async def test_the_gate_refuses_before_the_body_is_read_on_both_paths(length: int) -> None:
    for inline in (True, False):
        with trio.fail_after(2):
            raw = await with_listener(inline, ANNOUNCED % length, gate=Refusing())
        assert raw.startswith(b"HTTP/1.1 401 "), raw[:200]


async def test_a_refusal_with_its_body_here_keeps_the_connection() -> None:
    data = ANNOUNCED % 2 + b"{}" + CLOSE
    for inline in (True, False):
        answers = split(await with_listener(inline, data, gate=Refusing()), [False] * 2)
        assert [status for status, _ in answers] == ["401", "401"]


@contextlib.asynccontextmanager
async def listening(
    inline: bool, surface: Surface | None = None
) -> AsyncIterator[tuple[HttpListener, int]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    surface = surface or make_surface()
    listener = HttpListener("t", surface, [sock], inline=surface if inline else None)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.run)
        yield listener, sock.getsockname()[1]
        nursery.cancel_scope.cancel()
    sock.close()


async def drip_answer(inline: bool, head: bytes) -> tuple[bytes, float]:
    """Send `head`, then one byte of body a second; the answer and when it came."""
    async with listening(inline) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(head)

            async def drip() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    for _ in range(1000):
                        await trio.sleep(1)
                        await stream.send_all(b" ")

            nursery.start_soon(drip)
            began = trio.current_time()
            answer = b""
            with trio.fail_after(BODY_SECONDS + 30):
                while not answer.endswith(b"}}") and (chunk := await stream.receive_some()):
                    answer += chunk
            nursery.cancel_scope.cancel()
    return answer, trio.current_time() - began


@pytest.mark.parametrize(
    "head",
    [
        b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
        b"POST /things/t-1/echo HTTP/1.0\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
        b"POST /things/t-1/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_a_body_that_drips_is_400_after_body_seconds_on_both_paths(
    head: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    for inline in (True, False):
        answer, waited = await drip_answer(inline, head)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"did not arrive within 60 s" in answer
        assert BODY_SECONDS <= waited < BODY_SECONDS + 2


async def test_a_client_that_never_reads_its_answers_is_let_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Pipelined requests whose answers are never read: after SEND_SECONDS of a write
    taking nothing, the connection is closed (it was held forever)."""
    surface = make_surface()

    @surface.lean("GET", "/big", "a large answer", responses={200: "ok"}, requires="read")
    async def big(scope: Scope) -> LeanResponse:
        return LeanResponse(200, b"x" * (4 * 1024 * 1024))

    for inline in (True, False):
        async with listening(inline, surface) as (listener, port):
            client = trio.socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await client.connect(("127.0.0.1", port))
            await client.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            await trio.sleep(1)
            assert listener.statistics().connections_open == 1
            await trio.sleep(SEND_SECONDS + 1)
            assert listener.statistics().connections_open == 0, inline
            client.close()


def reset_connections(port: int, count: int) -> None:
    """Connect and reset at once (SO_LINGER 0), as port scanners and TCP health checks do.

    Blocking calls with no checkpoint: a listener in this trio run accepts them only
    after all were reset, when reading the peer's address fails (ENOTCONN)."""
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()


@pytest.mark.parametrize("inline", [True, False])
async def test_connections_reset_before_they_are_served_cost_only_themselves(
    inline: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Each crashed the listener (`getpeername()`: ENOTCONN escaped into its nursery);
    a few dozen in a row went past the supervisor's restart intensity and stopped
    the daemon."""
    caplog.set_level(logging.DEBUG, logger="lokid.listener")
    with trio.fail_after(20):
        async with listening(inline) as (listener, port):
            reset_connections(port, 50)
            while listener.statistics().connections_total < 50:  # noqa: ASYNC110 - bounded
                await trio.sleep(0.01)
            while listener.statistics().connections_open:  # noqa: ASYNC110 - bounded
                await trio.sleep(0.01)
            stats = listener.statistics()
            assert stats.running
            assert (stats.connections_dropped, stats.connections_failed) == (50, 0)
            answer = await exchange(port, CLOSE)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    dropped = [r for r in caplog.records if "peer went away" in r.getMessage()]
    assert len(dropped) == 50
    assert {r.levelno for r in dropped} == {logging.DEBUG}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bug_in_one_connection_is_logged_and_closes_only_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    surface = make_surface()

    @surface.stream("GET", "/broken", "a bug", responses={200: "ok"}, requires="read")
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("a bug in one handler")

    with trio.fail_after(20):
        async with listening(True, surface) as (listener, port):
            answer = await exchange(port, CLOSE.replace(b"/fast", b"/broken"))
            assert answer == b""  # closed without an answer
            answer = await exchange(port, CLOSE)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            stats = listener.statistics()
            assert stats.running
            assert (stats.connections_failed, stats.connections_dropped) == (1, 0)
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "handling failed" in record.getMessage()
    assert record.exc_info is not None
    assert "a bug in one handler" in str(record.exc_info[1])


def one_answer(raw: bytes) -> tuple[str, bytes]:
    """(status, body) of the only response in `raw`: its whole body, nothing after it."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.split(b"\r\n")
    fields = {k.lower(): v for k, _, v in (line.partition(b": ") for line in lines[1:])}
    length = int(fields[b"content-length"])
    assert len(rest) == length, (raw[:300], len(rest), length)  # whole, and nothing more
    assert fields.get(b"connection", b"").lower() == b"close", head
    return lines[0].decode().split(" ", 2)[1], rest


AFTER_THE_LAST = [
    b"JUNK\r\n\r\n",
    b"GET /fast?q=2 HTTP/1.1\r\nHost: x\r\n\r\n",  # a second request: not served
    bytes(range(256)) * 64,  # 16 KiB of binary
]
LAST_REQUESTS = [
    b"GET /fast HTTP/1.0\r\n\r\n",  # HTTP/1.0: always Hypercorn
    b'POST /things/t-1/echo HTTP/1.0\r\nContent-Length: 8\r\n\r\n{"a": 1}',
    b"POST /slow HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}",  # a Quart route
    CLOSE,  # HTTP/1.1 with Connection: close: inline when the listener has the path
    b"POST /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
]
LAST_REQUEST_IDS = ["1.0-lean", "1.0-lean-body", "1.0-quart", "close-lean", "close-quart"]


@pytest.mark.parametrize("after", AFTER_THE_LAST, ids=["junk", "second-request", "binary"])
@pytest.mark.parametrize("request_", LAST_REQUESTS, ids=LAST_REQUEST_IDS)
async def test_bytes_after_the_last_request_are_ignored_on_both_paths(
    request_: bytes, after: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """After an HTTP/1.0 request (or Connection: close) a client must send nothing more.
    If it does, its request still gets its whole answer and the connection is closed:
    h11 raised "Got data when expecting EOF", and Hypercorn wrote a 400 instead of the
    answer, or cut the answer after its head."""
    caplog.set_level(logging.DEBUG, logger="lokid.listener")
    for inline in (True, False):
        with trio.fail_after(10):
            alone = one_answer(await with_listener(inline, request_))
            followed = one_answer(await with_listener(inline, request_ + after))
        assert alone[0] == "200", alone
        assert followed == alone
    assert not [r for r in caplog.records if r.levelno > logging.INFO]


async def test_bytes_that_come_while_the_last_request_is_answered_are_read_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes arriving after the request, while its answer is being made, are read (a
    client's EOF or reset stays visible; unread bytes would reset the close) and dropped,
    noted once at DEBUG; then the answer is written whole and the connection closed."""
    caplog.set_level(logging.DEBUG, logger="lokid.listener")
    surface = make_surface()
    release = trio.Event()

    @surface.lean("GET", "/wait", "answers when released", responses={200: "ok"}, requires="read")
    async def wait(scope: Scope) -> LeanResponse:
        await release.wait()
        return json_response(200, {"waited": True})

    def noted() -> int:
        return sum("after its last request" in r.getMessage() for r in caplog.records)

    with trio.fail_after(10):
        async with listening(True, surface) as (listener, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /wait HTTP/1.0\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()  # the request is parsed
                for _ in range(4):
                    await stream.send_all(b"X" * 65536)
                while not noted():  # noqa: ASYNC110 - bounded by fail_after
                    await trio.sleep(0.01)
                release.set()
                raw = b""
                while chunk := await stream.receive_some():
                    raw += chunk
            assert one_answer(raw) == ("200", b'{"waited":true}')
            assert listener.statistics().connections_failed == 0
    assert noted() == 1
    assert not [r for r in caplog.records if r.levelno > logging.INFO]


async def test_bytes_then_eof_after_the_last_request_still_get_the_answer() -> None:
    """A client that sends junk after its HTTP/1.0 request and then shuts its side
    gets the answer, as one that shuts its side right after the request does."""
    for inline in (True, False):
        async with listening(inline) as (_, port):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /fast HTTP/1.0\r\n\r\nJUNK")
                await stream.send_eof()
                raw = b""
                with trio.fail_after(10):
                    while chunk := await stream.receive_some():
                        raw += chunk
        status, body = one_answer(raw)
        assert status == "200"
        assert json.loads(body) == {"path": "/fast", "query": ""}
