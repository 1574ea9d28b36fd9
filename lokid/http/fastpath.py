"""An inline HTTP/1.1 path for the hottest routes, in front of Hypercorn.

Why: under SSE fan-out, trio (which has no priorities) makes every task step
of a request wait a whole pass of the run queue. Hypercorn spends ~15 task
steps on a `/health` request (a task per request, an idle-timeout task
restarted per request, a lock per write); a request answered inline by the
connection's own task takes 2 (read, write). See docs/performance.md.

Rules:

* Only what is certainly simple is served here: a request for a lean route
  (any method; `{name}` templates included) or a streaming route (`GET`) of
  the listener's `Surface`, HTTP/1.1, CRLF line ends, one `Host`, header
  names that are tokens, no control character in the request line or a
  header, a body only with a `Content-Length` (no `Transfer-Encoding`), no
  `Expect`, no `Upgrade`, no obs-fold, origin-form target without percent
  escapes, head under 16 KiB. Anything else - the first time it is seen on
  a connection - hands the connection, with every byte already read, to
  Hypercorn for good. Correctness beyond the simple case is Hypercorn's.
* The gate runs here as on the ASGI path (`Surface.admit`), before the body
  is read (a caller without a token cannot make us wait for one), and a
  change's audit entry is committed before its answer is written
  (`Gate.audit_answer`). A body announced over `MAX_BODY_BYTES` is a 413 at
  once; a body is read within `BODY_SECONDS`. An answer sent with a body
  unread closes the connection (after `LINGER_SECONDS` taking what still
  comes, so that the close does not reset the answer away).
* Handlers are the very same as on the ASGI path (`Surface.lean_answer`,
  the raw stream handlers), so both paths give identical answers; tests
  compare them.
* A peer that resets the connection is a client gone, at any step: a read
  or a write that fails ends the connection quietly; only the addresses'
  reading, before the first request, raises (`OSError`) for the listener
  to count the connection as dropped.
* Keep-alive between requests is bounded by `keep_alive` seconds; the
  listener cancels idle connections when it stops.
* A streaming response is sent with chunked encoding; the connection
  closes when the stream ends. A client that goes away is seen as
  `http.disconnect` by the handler (its socket reads EOF or an error);
  writes after that are dropped.
"""

from __future__ import annotations

import http
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from lokid.http.errors import ApiError
from lokid.http.gate import PRINCIPAL
from lokid.http.surface import (
    BODY,
    BODY_SECONDS,
    MAX_BODY_BYTES,
    ASGIApp,
    LeanHandler,
    Scope,
    Surface,
    body_too_large,
    body_too_slow,
    error_answer,
)

MAX_HEAD_BYTES = 16 * 1024
LINGER_SECONDS = 2.0
SEND_SECONDS = 75.0
"""How long one write may wait for a client that takes nothing (it then counts as gone):
a client that pipelines requests and never reads its answers is not held forever."""
RECEIVE_BYTES = 65536

Handoff = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


INLINE_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE"})
HEAD_END = re.compile(rb"\n\r?\n")
"""Where a head ends as Hypercorn (h11) reads it: bare LF line ends count too."""
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""What may not appear in a request line or header (CR, LF, NUL, ...; a tab may)."""
TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
"""A header name (RFC 9110 §5.1)."""


@attrs.frozen
class SimpleRequest:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    close: bool
    length: int = 0  # Content-Length of the body


def parse_simple_request(head: bytes) -> SimpleRequest | None:
    """The request if it is one the inline path may serve, else None (hand over)."""
    lines = head.split(b"\r\n")
    if any(CONTROL.search(line) for line in lines):
        return None  # a bare CR or LF, a NUL: Hypercorn refuses it with 400
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in INLINE_METHODS:
        return None
    target = parts[1]
    if not target.startswith(b"/"):
        return None
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line or line[:1] in (b" ", b"\t"):
            return None
        name, sep, value = line.partition(b":")
        if not sep or TOKEN.fullmatch(name) is None:
            return None
        headers.append((name.lower(), value.strip()))
    close = False
    has_host = False
    length = 0
    seen_length = False
    for name, value in headers:
        if name in (b"transfer-encoding", b"upgrade", b"expect"):
            return None
        if name == b"content-length":
            if not value.isdigit() or len(value) > 8 or seen_length:
                return None  # odd, repeated or huge: Hypercorn answers it properly
            seen_length = True
            length = int(value)
        if name == b"host":
            if has_host:
                return None  # two Hosts: Hypercorn refuses it with 400
            has_host = True
        if name == b"connection" and b"close" in value.lower():
            close = True
    path, _, query = target.partition(b"?")
    if not has_host or b"%" in path or b"#" in path:
        return None
    try:
        text = path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if length and parts[0] in (b"GET", b"HEAD"):
        return None
    return SimpleRequest(parts[0].decode(), text, query, headers, close, length)


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream that first gives back bytes already read (for the hand-over)."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket  # Hypercorn reads peer and local addresses from it
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class InlineConnection:
    """Serves one TCP connection: simple requests inline, the rest via `handoff`."""

    def __init__(
        self,
        surface: Surface,
        stream: trio.SocketStream,
        handoff: Handoff,
        *,
        keep_alive: float,
        idle_scopes: set[trio.CancelScope],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.surface = surface
        self.stream = stream
        self.handoff = handoff
        self.keep_alive = keep_alive
        self.idle_scopes = idle_scopes
        self.stopping = stopping
        self.buffer = bytearray()
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None

    async def serve(self) -> None:
        """Serve the connection until it ends; the stream is closed in every case.

        Raises `OSError` when the peer is gone (reset) before its addresses could
        be read: the listener counts and logs the connection as dropped.
        """
        try:
            sock = self.stream.socket
            self.client = _address(sock.getpeername())
            self.server = _address(sock.getsockname())
            while not self.stopping():  # a stopping listener takes no further request
                got = await self._read_head()
                if got is None:
                    return
                head, complete = got
                request = parse_simple_request(head) if complete else None
                lean = stream = None
                if request is not None:
                    lean = self.surface.lean_match(request.method, request.path)
                    stream = self.surface.stream_route(request.method, request.path)
                if request is None or (lean is None and stream is None):
                    replay = head + b"\r\n\r\n" + self.buffer if complete else head
                    await self.handoff(ReplayStream(self.stream, replay))
                    return
                if not await self._serve_one(request, lean, stream):
                    return
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _serve_one(
        self,
        request: SimpleRequest,
        lean: tuple[LeanHandler, dict[str, str]] | None,
        stream: ASGIApp | None,
    ) -> bool:
        """Answer one request (the gate first, then its body); False: close the connection."""
        scope = self._scope(request)
        started = time.perf_counter()  # request metrics (`_observe`)
        admission = await self.surface.admit(scope)
        if admission.answer is not None:
            # Refused before its body is read (no token makes us wait for one): the
            # connection is kept only when the whole body is here already.
            self._observe(scope, admission.answer[0], started)
            if self._drop_buffered(request.length):
                return await self._send_answer(request, *admission.answer)
            await self._send_answer(request, *admission.answer, close=True)
            await self._linger()
            return False
        scope[PRINCIPAL] = admission.principal  # a revoke ends a stream (Gate.stream)
        close = False
        refusal = self.surface.query_refusal(scope)
        if refusal is not None:
            close = not self._drop_buffered(request.length)
        elif request.length > MAX_BODY_BYTES:
            refusal, close = body_too_large(), True  # at once, its body unread
        elif request.length:
            received = await self._read_body(request.length)
            if received is None:
                return False
            if isinstance(received, ApiError):
                refusal, close = received, True
            else:
                scope[BODY] = received
        if refusal is None and stream is not None:
            await self._stream(scope, stream, admission.headers, started)
            return False
        if refusal is not None:
            answer = error_answer(refusal)
        else:
            assert lean is not None
            handler, scope["path_params"] = lean
            answer = await self.surface.lean_answer(handler, scope, audited=admission.audit)
        if admission.audit:
            answer = await self.surface.gate.audit_answer(scope, admission, *answer)
        status, headers, body = answer
        self._observe(scope, status, started)
        kept = await self._send_answer(
            request, status, [*headers, *admission.headers], body, close=close
        )
        if close:
            await self._linger()
        return kept

    async def _linger(self) -> None:
        """Before closing with request bytes unread: end our side, then take what the
        client still sends for a moment. Closing a socket with unread bytes resets
        the connection, which can destroy the answer before the client reads it."""
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(RECEIVE_BYTES):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    def _drop_buffered(self, length: int) -> bool:
        """Skip an unread body of `length` bytes if it has all arrived; False if not
        (the connection cannot be reused: the rest of it is still to come)."""
        if len(self.buffer) < length:
            return False
        del self.buffer[:length]
        return True

    async def _read_head(self) -> tuple[bytes, bool] | None:
        """(the next request head without its blank line, True), or None: closed, idle, stopped.

        A head that grows past `MAX_HEAD_BYTES`, or that ends with bare LFs, comes
        back as (all bytes read so far, False): the caller hands it to Hypercorn,
        which answers properly.
        """
        end = None
        with trio.move_on_after(self.keep_alive) as idle:
            self.idle_scopes.add(idle)
            try:
                while (end := HEAD_END.search(self.buffer)) is None:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        partial = bytes(self.buffer)
                        self.buffer.clear()
                        return partial, False
                    try:
                        chunk = await self.stream.receive_some(RECEIVE_BYTES)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return None
                    if not chunk:
                        return None
                    if not self.buffer:
                        # A request began: its whole head must arrive within one more period
                        # (a byte now and then does not keep a connection forever).
                        idle.deadline = trio.current_time() + self.keep_alive
                    self.buffer += chunk
            finally:
                self.idle_scopes.discard(idle)
        if end is None:  # idle, or stopped, before a whole head arrived
            return None
        start, stop = end.span()
        if stop - start != 3 or self.buffer[start - 1 : start] != b"\r":
            partial = bytes(self.buffer)  # a bare LF ends it: not one to read here
            self.buffer.clear()
            return partial, False
        head = bytes(self.buffer[: start - 1])
        del self.buffer[:stop]
        return head, True

    async def _read_body(self, length: int) -> bytes | ApiError | None:
        """The next `length` bytes (the body); a 400 when they take more than
        `BODY_SECONDS` (as on every other route); None: the client is gone."""
        with trio.move_on_after(BODY_SECONDS):
            while len(self.buffer) < length:
                try:
                    chunk = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None
                if not chunk:
                    return None
                self.buffer += chunk
            body = bytes(self.buffer[:length])
            del self.buffer[:length]
            return body
        return body_too_slow()

    def _scope(self, request: SimpleRequest) -> Scope:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": "http",
            "path": request.path,
            "raw_path": request.path.encode(),
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.server,
            "extensions": {},
        }

    async def _send_answer(
        self,
        request: SimpleRequest,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        close: bool = False,
    ) -> bool:
        """One whole response; False when the connection is to be closed (the client's
        `Connection: close`, or `close`: what is left of its request was not read)."""
        close = close or request.close
        if close:
            headers = [*headers, (b"connection", b"close")]
        payload = _status_line(status, headers) + (b"" if request.method == "HEAD" else body)
        try:
            with trio.fail_after(SEND_SECONDS):
                await self.stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return False
        return not close

    def _observe(self, scope: Scope, status: int, started: float) -> None:
        """Tell the surface's request observer (metrics), if any, about an answer."""
        observer = self.surface.observer
        if observer is not None:
            observer.observe(scope, status, time.perf_counter() - started)

    async def _stream(
        self,
        scope: Scope,
        app: ASGIApp,
        extra_headers: tuple[tuple[bytes, bytes], ...],
        started: float,
    ) -> None:
        """Run a streaming handler on this connection; it closes when the handler returns."""
        state = _StreamState()

        async def receive() -> dict[str, Any]:
            if not state.request_delivered:
                state.request_delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            while not state.gone:  # the client sends nothing more; EOF or an error = gone
                try:
                    chunk = await self.stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                state.gone = not chunk
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if state.gone or state.finished:
                return
            if message["type"] == "http.response.start":
                self._observe(scope, message["status"], started)
                headers = [*message.get("headers", []), *extra_headers]
                state.chunked = all(name.lower() != b"content-length" for name, _ in headers)
                if state.chunked:
                    headers.append((b"transfer-encoding", b"chunked"))
                headers.append((b"connection", b"close"))
                await self._write(_status_line(message["status"], headers), state)
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                more = message.get("more_body", False)
                data = body
                if state.chunked:
                    data = (f"{len(body):x}\r\n".encode() + body + b"\r\n") if body else b""
                    if not more:
                        data += b"0\r\n\r\n"
                state.finished = not more
                await self._write(data, state)

        await app(scope, receive, send)

    async def _write(self, data: bytes, state: _StreamState) -> None:
        try:
            with trio.fail_after(SEND_SECONDS):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            state.gone = True


@attrs.define
class _StreamState:
    request_delivered: bool = False
    chunked: bool = True
    finished: bool = False
    gone: bool = False


def _status_line(status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}".encode()]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
