"""HttpListener: serves one ASGI app on listening sockets with Hypercorn's trio stack.

We use Hypercorn's per-connection `TCPServer` (its HTTP/1.1, h2 and WebSocket
protocol code) under our own accept loop rather than `hypercorn.trio.serve`,
because we need three things it does not offer:

* sockets bound by us or passed by systemd, kept across listener restarts;
* the Unix control socket's peer check: each connection's SO_PEERCRED uid is
  read once at accept; the owner (our uid) and root get the app, with
  `scope["lokid.peer"] = {"pid", "uid", "gid"}`; anyone else gets 403 for
  every request on that connection, each recorded through `on_refused`
  (the audit log) first;
* a bound on open connections (`max_connections`): at the bound the accept
  loop waits and new connections queue in the kernel backlog.

Graceful stop (supervisor shutdown request): stop accepting, tell Hypercorn's
protocols to close idle keep-alive connections, give open requests
`graceful_timeout` seconds, then cancel what is left (e.g. SSE streams) -
including a Hypercorn write shielded from cancellation (`WriteShields`), so
a peer that stopped reading cannot hold the stop. A listener cancelled
before that (a hurried daemon stop) ends those writes at once.

One connection's error costs that connection only, never the listener (whose
crash would cut every other connection, SSE streams included, and whose
restarts past the supervisor's intensity stop the daemon):

* the peer gone (an `OSError` of `PEER_GONE_ERRNOS`, at accept, reading its
  addresses or credentials, or any later read, write, shutdown or close that
  the HTTP code did not take as the client leaving): the connection is
  closed, counted in `connections_dropped`, logged at DEBUG - port scanners
  and TCP health checks that close with a reset do this all day;
* any other error escaping one connection's handling (a bug): the connection
  is closed, counted in `connections_failed`, logged at ERROR with its
  traceback.

Only an error of the listening socket itself (an accept that fails for
another reason than one connection or a lack of resources) ends the listener.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import attrs
import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from lokid.http.errors import ApiError
from lokid.http.fastpath import SEND_SECONDS, InlineConnection
from lokid.http.surface import ASGIApp, Receive, Scope, Send, Surface, send_error
from lokid.sockets import peer_credentials, socket_url

log = logging.getLogger("lokid.listener")

# accept() errors that mean "out of resources, try again soon" (as trio.serve_listeners).
ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF = 0.1
PEER_GONE_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENOTCONN,  # getpeername() of a connection reset before we accepted it
        errno.EPIPE,
        errno.ESHUTDOWN,
        errno.ETIMEDOUT,
        errno.EPROTO,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
    }
)
"""Errors of one connection whose peer went away; Linux's accept() reports some of the
new connection's errors too (trio retries most of those itself)."""
H11_MAX_HEAD_BYTES = HypercornConfig().h11_max_incomplete_size  # h11 answers 431 above it

RefusalHook = Callable[[Scope, int, ApiError], Awaitable[ApiError]]
"""Called for each request of a refused socket peer (uid); answers the error to send."""


@attrs.frozen
class ListenerStatistics:
    name: str
    addresses: tuple[str, ...]
    running: bool
    connections_open: int
    connections_total: int
    max_connections: int
    peers_refused: int
    connections_dropped: int
    """Connections ended by their peer going away with an error (a reset), counted
    where it escaped the HTTP code: at accept, before the first read, or later."""
    connections_failed: int
    """Connections ended by an unexpected error in their handling (logged at ERROR)."""


class WriteShields:
    """Hypercorn's shields around its writes, with an end the listener sets.

    Hypercorn shields each write from cancellation, so a cancelled app task
    never leaves half a frame on the wire. But a peer that stops reading
    (`loki events -f | less` on the control socket) blocks a write for good,
    and a shielded one ignored the drain's deadline and every later cancel:
    the daemon never stopped. From `end_at(deadline)` on, every write in
    flight and every later one is cancelled at that deadline.
    """

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self._deadline = math.inf

    @contextlib.contextmanager
    def shield(self, seconds: float = math.inf) -> Iterator[trio.CancelScope]:
        """A shield for one write of at most `seconds`, ended by `end_at` too."""
        deadline = min(self._deadline, trio.current_time() + seconds)
        with trio.CancelScope(shield=True, deadline=deadline) as scope:
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def end_at(self, deadline: float) -> None:
        self._deadline = min(self._deadline, deadline)
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, deadline)


class _TCPServer(TCPServer):
    """Hypercorn's connection handler with a close that cannot collide with a write.

    Hypercorn's `_close` sends EOF without the lock its `protocol_send`
    holds; a client hanging up while a response was being written made the
    app's write fail with `BusyResourceError` ("Error in ASGI Framework" in
    the log). Here EOF is sent only when no write is in flight (taken
    without waiting, so a stuck write cannot stall the close), and the
    stream is closed in every case, even when cancelled. A write is shielded
    from the app's cancellation, but bounded: it ends with the listener's drain
    (`WriteShields`), and a write the client takes nothing of for
    `SEND_SECONDS` closes the connection.
    """

    def __init__(self, *args: Any, shields: WriteShields) -> None:
        super().__init__(*args)
        self.shields = shields

    async def run(self) -> None:
        # Hypercorn swallows the OSError of its own getpeername(): a peer gone before
        # it is served raises here instead, for the listener to count it as dropped.
        self.stream.socket.getpeername()
        self._abandon = trio.CancelScope()  # cancelled when a write is cut off
        with self._abandon:
            await super().run()

    async def _read_data(self) -> None:
        _ignore_bytes_after_the_last_request(self.protocol.protocol)
        _answer_protocol_errors_with_a_body(self.protocol.protocol)
        await super()._read_data()
        # The client is gone (EOF, reset). Hypercorn's idle timer would hold the
        # connection - its slot of `max_connections`, its fd, its count in the
        # metrics - for `keep_alive_timeout` more; a request still being answered
        # (its app task) is waited for as before.
        await self.idle_task.stop()

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn's write path, without a scheduling pass when the lock is free.

        `trio.Lock.acquire` always yields, so every SSE write paid one extra
        trip through the run queue (measured: 3 task steps per delivery
        instead of 2, ~9 % CPU). `send_all` still checkpoints.
        """
        if not isinstance(event, RawData):
            await super().protocol_send(event)
            return
        try:
            self.send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self.send_lock.acquire()
        try:
            # Shielded from the app's cancellation (a half-written answer breaks the
            # connection), but bounded: a client that takes nothing is gone, and the
            # listener's drain ends every write (`WriteShields`).
            with self.shields.shield(SEND_SECONDS) as write:
                await self.stream.send_all(event.data)
            if write.cancelled_caught:  # the stream is in an unknown state: drop it
                self._abandon.cancel()  # its requests, its idle timer
                raise trio.ClosedResourceError("write cut off (client not reading, or stop)")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            self.send_lock.release()

    async def _close(self) -> None:
        try:
            if not self.send_lock.locked():
                self.send_lock.acquire_nowait()
                try:
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, AttributeError
                    ):
                        await self.stream.send_eof()
                finally:
                    self.send_lock.release()
        finally:
            await self.stream.aclose()


def _ignore_bytes_after_the_last_request(protocol: object) -> None:
    """Bytes a client sends after its last request are dropped, not a protocol error.

    After an HTTP/1.0 request (without keep-alive) or one with `Connection:
    close`, the client has said that request is its last: h11 then expects
    EOF (`their_state` MUST_CLOSE), and raised "Got data when expecting EOF"
    for anything more (pipelined junk, a second request). Hypercorn took that
    as a malformed request: it wrote a 400 before the app's answer, or cut
    the answer after its head, and closed. RFC 9112 §9.6 says a server must
    not process requests after the one that asked to close; it need not
    refuse the one it got. So the extra bytes are read and dropped (reading
    on keeps a client's EOF or reset visible, and unread bytes in the kernel
    at close would reset the connection): h11 is told there is nothing yet
    (NEED_DATA) while the answer is written, and that the client is gone
    (ConnectionClosed) once it is, and Hypercorn closes the connection as it
    does after every last request. Dropping is logged once, at DEBUG. Bounded:
    what h11 holds is at most the one read that brought the request; later
    reads are dropped as they come.
    """
    if not isinstance(protocol, H11Protocol) or not isinstance(protocol.connection, h11.Connection):
        return
    connection = protocol.connection
    parse = connection.next_event
    receive = connection.receive_data
    noted = [False]

    def note() -> None:
        if not noted[0]:
            noted[0] = True
            log.debug(
                "client %s sent bytes after its last request (HTTP/1.0 or Connection: close);"
                " they are ignored",
                protocol.client or "(Unix socket)",
            )

    def receive_data(data: bytes) -> None:
        if data and connection.their_state is h11.MUST_CLOSE:
            note()
            return
        receive(data)

    def next_event() -> Any:
        if connection.their_state is h11.MUST_CLOSE:
            data, closed = connection.trailing_data  # a copy: only on this rare path
            if data:
                note()
                if closed or connection.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
                    return h11.ConnectionClosed()
                return h11.NEED_DATA
        return parse()

    connection.receive_data = receive_data  # type: ignore[method-assign]
    connection.next_event = next_event  # type: ignore[method-assign]


def _answer_protocol_errors_with_a_body(protocol: object) -> None:
    """Hypercorn's own 400/431 (a head h11 cannot parse) with the seed's error body.

    h11 refuses a malformed head (no `Host`, a bad request line, a bare LF,
    a head over the size limit...) before any app code runs, and Hypercorn
    answered it with the status alone. Here the connection keeps h11's
    reason, and the answer carries it in the error body every other refusal
    has. Only an HTTP/1.1 connection's protocol has this path (h2 is not
    offered without TLS).
    """
    if not isinstance(protocol, H11Protocol) or not isinstance(protocol.connection, h11.Connection):
        return
    connection = protocol.connection
    parse = connection.next_event
    reason = ["the request's head could not be parsed"]

    def next_event() -> Any:
        try:
            return parse()
        except h11.RemoteProtocolError as exc:
            reason[0] = str(exc) or reason[0]
            raise

    async def send_error_response(status_code: int) -> None:
        error = ApiError.for_status(status_code, protocol_error_message(status_code, reason[0]))
        body = error.body_bytes()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *protocol.config.response_headers("h11"),
        ]
        await protocol._send_h11_event(h11.Response(status_code=status_code, headers=headers))
        await protocol._send_h11_event(h11.Data(data=body))
        await protocol._send_h11_event(h11.EndOfMessage())

    connection.next_event = next_event  # type: ignore[method-assign]
    protocol._send_error_response = send_error_response  # type: ignore[method-assign]


def protocol_error_message(status: int, reason: str) -> str:
    """The message for a head h11 refused; `reason` is h11's own, without the bytes it quotes."""
    if status == 431:
        return f"request head too large (over {H11_MAX_HEAD_BYTES} bytes)"
    return f"malformed HTTP request: {reason.partition(': bytearray(')[0]}"


def hypercorn_config(graceful_timeout: float) -> HypercornConfig:
    config = HypercornConfig()
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = 75.0  # longer than common client pools' idle time
    config.accesslog = None
    config.errorlog = logging.getLogger("lokid.hypercorn")
    config.include_server_header = False
    return config


class HttpListener:
    def __init__(
        self,
        name: str,
        app: ASGIApp,
        sockets: list[socket.socket],
        *,
        check_peer: bool = False,
        inline: Surface | None = None,
        on_refused: RefusalHook | None = None,
        max_connections: int = 4096,
        graceful_timeout: float = 5.0,
    ) -> None:
        self.name = name
        self.app = app
        self.sockets = sockets
        self.check_peer = check_peer
        self.on_refused = on_refused
        self.inline = inline if not check_peer else None
        self._idle_scopes: set[trio.CancelScope] = set()
        self._shields = WriteShields()  # a new one per run
        self._stopping = False
        self._drain_by = math.inf  # `drain_by`: the drain ends then at the latest
        self.max_connections = max_connections
        self.graceful_timeout = graceful_timeout
        self.addresses = tuple(socket_url(s) for s in sockets)
        self._config = hypercorn_config(graceful_timeout)
        self._wrapped = wrap_app(app, self._config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
        self._running = False
        self._open = 0
        self._total = 0
        self._refused = 0
        self._dropped = 0
        self._failed = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        stop: trio.Event | None = getattr(task_status, "shutdown_requested", None)
        context = WorkerContext(None)
        slots = trio.Semaphore(self.max_connections)
        listeners = [
            # dup: the trio socket owns (and closes) its fd; the original stays ours for restarts.
            trio.SocketListener(trio.socket.from_stdlib_socket(s.dup()))
            for s in self.sockets
        ]
        self._running = True
        self._stopping = False
        self._shields = WriteShields()
        try:
            async with trio.open_nursery() as guard:
                guard.start_soon(self._end_writes_when_cancelled)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(
                                self._accept_loop, listener, connections, slots, context
                            )
                        task_status.started(self)
                        if stop is None:
                            await trio.sleep_forever()
                        await stop.wait()
                        acceptors.cancel_scope.cancel()
                    self._stopping = True
                    for scope in list(self._idle_scopes):  # idle inline keep-alive connections
                        scope.cancel()
                    for listener in listeners:
                        await listener.aclose()
                    await context.terminated.set()
                    drained = min(trio.current_time() + self.graceful_timeout, self._drain_by)
                    self._shields.end_at(drained)
                    connections.cancel_scope.deadline = drained
                guard.cancel_scope.cancel()
        finally:
            self._running = False
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    def drain_by(self, deadline: float) -> None:
        """End the coming drain at trio time `deadline` at the latest.

        The daemon sets one deadline for all its listeners when its stop begins:
        they are stopped one after the other, and each drain of `graceful_timeout`
        counted from its own start added up past `shutdown_grace` (peers that
        stopped reading on two listeners held the stop twice as long).
        """
        self._drain_by = min(self._drain_by, deadline)

    async def _end_writes_when_cancelled(self) -> None:
        """A listener cancelled (a hurried daemon stop) ends its shielded writes now,
        not at its drain's deadline, which may be seconds later: a peer that stopped
        reading must not hold a hurried stop. At a normal end nothing is left to end."""
        try:
            await trio.sleep_forever()
        finally:
            self._shields.end_at(trio.current_time())

    async def _accept_loop(
        self,
        listener: trio.SocketListener,
        connections: trio.Nursery,
        slots: trio.Semaphore,
        context: WorkerContext,
    ) -> None:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno in PEER_GONE_ERRNOS:  # that connection only
                    self._count_dropped(exc)
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning("%s: accept failed (%s); retrying", self.name, os.strerror(exc.errno))
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            connections.start_soon(self._serve_connection, stream, slots, context)

    async def _serve_connection(
        self, stream: trio.SocketStream, slots: trio.Semaphore, context: WorkerContext
    ) -> None:
        """Serve one connection; its errors end it alone (see the module docstring).

        Only cancellation (the listener's drain or stop) goes on to the nursery.
        """
        self._open += 1
        self._total += 1
        try:
            await self._serve(stream, context)
        except* (OSError, trio.BrokenResourceError) as errors:
            gone, other = errors.split(_peer_gone)
            if gone is not None:
                self._count_dropped(gone)
            if other is not None:
                self._count_failed(other)
        except* Exception as errors:
            self._count_failed(errors)
        finally:
            _close_quietly(stream)  # the handlers close it; this is for the error paths
            self._open -= 1
            slots.release()

    def _count_dropped(self, error: BaseException) -> None:
        self._dropped += 1
        log.debug("%s: connection dropped, its peer went away: %s", self.name, _describe(error))

    def _count_failed(self, error: BaseException) -> None:
        self._failed += 1
        error = _unwrap(error)
        log.error(
            "%s: a connection's handling failed (%s); it is closed, the listener goes on",
            self.name,
            _describe(error),
            exc_info=error,
        )

    async def _serve(self, stream: trio.SocketStream, context: WorkerContext) -> None:
        """Hand the connection to the inline path or to Hypercorn (both close it)."""
        app = self._wrapped
        if self.check_peer:
            app = wrap_app(self._peer_app(stream), self._config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]

        async def hypercorn(connection: trio.abc.HalfCloseableStream) -> None:
            server = _TCPServer(
                app,
                self._config,
                context,
                ConnectionState({}),
                connection,
                shields=self._shields,
            )
            await server.run()

        if self.inline is not None:
            inline = InlineConnection(
                self.inline,
                stream,
                hypercorn,
                keep_alive=self._config.keep_alive_timeout,
                idle_scopes=self._idle_scopes,
                stopping=lambda: self._stopping,
            )
            await inline.serve()
        else:
            await hypercorn(stream)

    def _peer_app(self, stream: trio.SocketStream) -> ASGIApp:
        """The app for this control-socket peer: ours, or one refusing every request.

        Credentials that cannot be read (the peer is gone) raise `OSError`: the
        connection is dropped, not answered, and not counted as a refused peer.
        """
        pid, uid, gid = peer_credentials(stream.socket)  # type: ignore[arg-type]
        if uid in (os.getuid(), 0):
            peer = {"pid": pid, "uid": uid, "gid": gid}

            async def owner_app(scope: Scope, receive: Receive, send: Send) -> None:
                scope["lokid.peer"] = peer
                await self.app(scope, receive, send)

            return owner_app
        self._refused += 1
        log.warning("%s: refusing peer uid %s (pid %s)", self.name, uid, pid)
        owners = "root" if os.getuid() == 0 else f"uid {os.getuid()} and root"
        error = ApiError("FORBIDDEN", f"uid {uid} may not use the control socket (only {owners})")

        async def refuse_app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            answer = error
            if self.on_refused is not None:
                answer = await self.on_refused(scope, uid, error)
            await send_error(send, answer)

        return refuse_app

    def statistics(self) -> ListenerStatistics:
        return ListenerStatistics(
            name=self.name,
            addresses=self.addresses,
            running=self._running,
            connections_open=self._open,
            connections_total=self._total,
            max_connections=self.max_connections,
            peers_refused=self._refused,
            connections_dropped=self._dropped,
            connections_failed=self._failed,
        )


def _peer_gone(error: BaseException) -> bool:
    """Whether `error` says a connection's peer went away (not a bug of ours).

    trio reports a socket's errors on a stream as `BrokenResourceError` from the
    `OSError`; a `BrokenResourceError` of anything else (a channel) is a bug.
    """
    if isinstance(error, trio.BrokenResourceError):
        error = error.__cause__ or error
    return isinstance(error, OSError) and error.errno in PEER_GONE_ERRNOS


def _unwrap(error: BaseException) -> BaseException:
    """The one error in a group of one (as `except*` wraps a lone error), else `error`."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    """A one-line account of a connection's error (a group: its first leaf)."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}"


def _close_quietly(stream: trio.SocketStream) -> None:
    """Close a connection's socket (again: closing is idempotent), without a
    scheduling step; an error of a peer already gone changes nothing."""
    with contextlib.suppress(OSError):
        stream.socket.close()
