"""The gate: what every request passes before its handler (DESIGN.md §4 and §7).

One `Gate` serves every surface of a daemon (both TCP listeners and the
control socket, lean, streaming and Quart routes alike), so no route can
be reached around it. Rules, in order:

1. **CORS preflight** (`OPTIONS` with `Origin` and
   `Access-Control-Request-Method`) is answered here, before auth (browsers
   send preflights without credentials): 204 with the CORS headers for a
   listed origin asking for an allowed method and headers, else 403.
2. **Who is calling** (cheap: a cached token, no store read for a malformed one).
   * A control-socket peer (`scope["lokid.peer"]`, whose uid the listener
     checked) is the owner: actor `uid:<n>`, every scope. A token it sends
     is ignored.
   * Auth off: the client address (actor = address), every scope.
   * Auth on: `Authorization: Bearer <token>` (a WebSocket may instead pass
     `?token=`). Routes that require `open` (`/health*`) skip this.
3. **Rate limit** (when configured; never `/health*` or the socket), keyed
   by token id, else by client address. It is checked before every 401/403
   decision, so guessing tokens and floods of refused requests are limited
   too. Refused: 429.
4. **Web pages** (TCP only, `_browser_guard`): a change or WebSocket from a
   foreign origin, or (auth off) a non-loopback `Host`: 403, whose actor is
   the caller as identified (a valid token's id).
5. **Authorisation.** No valid token: 401. A valid token without the
   route's scope: 403 with `details.required_scope`.
6. **Audit.** A 401 or 403 is recorded before it is sent. A mutating
   request (any method but GET, HEAD, OPTIONS) that reached its handler is
   recorded with its final status before its response starts
   (`audited_send`). A read that changes something asks the gate again as a
   change (`demand`: the browser guard, the scope) and is recorded by its
   handler (`record`). If the audit log cannot record it, the answer becomes
   503: nothing is answered unaudited. 429s and preflights are not
   recorded (a flood must not become an audit-log flood).

Every response carries the rate-limit headers (when on) and the CORS
headers (when on), refusals included; errors use the seed's body.

Token lookups are cached (`TokenCache`: valid tokens only, at most
`TOKEN_CACHE_SIZE` for `TOKEN_CACHE_SECONDS`); a revoke through the API
clears the cache, expiry is checked on every use.

A long-lived answer (a WebSocket, an SSE stream) is admitted once, at its
start, so the gate also keeps the ones opened with a token (`Gate.stream`,
by token id): a revoke through the API ends them at once
(`Gate.token_revoked`), and each ends by itself when its token expires
(`TokenStream.wait` sleeps until `expires_at`). The registry holds one
entry per open stream, removed when the stream ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from lokid import idempotency, ratelimit
from lokid.actors.audit_writer import AuditWriter
from lokid.actors.store import StoreActor
from lokid.audit import classify
from lokid.cors import CorsPolicy, is_preflight
from lokid.errors import LokiError
from lokid.http.errors import ApiError
from lokid.ratelimit import RateLimiter
from lokid.timefmt import iso, utc_now
from lokid.tokens import (
    SCOPES,
    AuthFailure,
    FailureReason,
    TokenInfo,
    authenticate,
    token_sha256,
    touch_last_used,
)

log = logging.getLogger("lokid.gate")

OPEN = "open"  # no token, no limit, no audit: /health*
AUTHENTICATED = "authenticated"  # any valid token (unknown routes: 404 only after auth)
REQUIREMENTS: tuple[str, ...] = (OPEN, AUTHENTICATED, *SCOPES)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PAGE_SCHEME = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
PRINCIPAL = "lokid.principal"  # scope key: the admitted request's `Principal` (None: not known)

TOKEN_CACHE_SIZE = 1024
TOKEN_CACHE_SECONDS = 30.0
MAX_AUDITED_BODY = 64 * 1024  # a created resource's id is read from at most this much body

Header = tuple[bytes, bytes]
Answer = tuple[int, list[Header], bytes]  # (status, headers, body), as Surface.lean_answer
Send = Callable[[dict[str, Any]], Any]

_JSON_HEADERS: list[Header] = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
]


@attrs.frozen
class Principal:
    """Who a request comes from, as far as the gate could tell."""

    actor: str  # token id, `uid:<n>`, or the client address (`-` when unknown)
    ip: str | None
    token: TokenInfo | None = None
    owner: bool = False  # control-socket peer, or auth off: every scope


@attrs.frozen
class Admission:
    """The gate's verdict: an `answer` to send instead of the handler, or go ahead.

    When going ahead, `headers` go on the handler's response and `audit`
    says whether its outcome must be recorded (`Gate.audited_send`). With an
    `answer`, `headers` are its rate-limit and CORS headers alone, for a refused
    WebSocket handshake (accepted, then closed: its accept carries them).
    """

    answer: Answer | None
    headers: tuple[Header, ...] = ()
    principal: Principal | None = None
    audit: bool = False


PASS = Admission(None)


@attrs.frozen
class GateStatistics:
    auth_enabled: bool
    rate_limit: str | None
    cors_origins: int
    admitted: int
    unauthorized: int
    forbidden: int
    rate_limited: int
    preflights: int
    audited: int
    audit_failures: int
    token_cache: int


class TokenStream:
    """A long-lived answer (WebSocket, SSE stream) opened with a token: its handler
    `wait`s on this and ends the stream when the token stops being valid."""

    def __init__(self, token_id: str | None, deadline: float) -> None:
        self.token_id = token_id  # None: no token (the owner, auth off): never ended
        self.deadline = deadline  # trio time at which the token expires (inf: never)
        self.reason: str | None = None  # the 401 message, once ended
        self._ended = trio.Event()

    def end(self, reason: str) -> None:
        """End the stream (`reason`: the 401 message); the first call wins."""
        if self.reason is None:
            self.reason = reason
            self._ended.set()

    async def wait(self) -> str:
        """Until the token is revoked or expires (forever without a token); the 401
        message that says which (`Token revoked`, `Token expired`)."""
        with trio.move_on_at(self.deadline):
            await self._ended.wait()
        self.end(AuthFailure(FailureReason.EXPIRED).message)  # no-op when revoked
        assert self.reason is not None
        return self.reason


class TokenCache:
    """Valid tokens by SHA-256, least recently used first; bounded in size and age."""

    def __init__(self, size: int = TOKEN_CACHE_SIZE, ttl: float = TOKEN_CACHE_SECONDS) -> None:
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[TokenInfo, float]] = OrderedDict()

    def get(self, digest: str, now: float) -> TokenInfo | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        info, stored = entry
        if now - stored > self.ttl:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return info

    def put(self, digest: str, info: TokenInfo, now: float) -> None:
        self._entries[digest] = (info, now)
        self._entries.move_to_end(digest)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Gate:
    """CORS, authentication, scopes, rate limit and audit for every request (module rules)."""

    def __init__(
        self,
        *,
        auth_enabled: bool = False,
        store: StoreActor | None = None,
        audit: AuditWriter | None = None,
        limiter: RateLimiter | None = None,
        cors: CorsPolicy | None = None,
        loopback_hosts: bool = False,
        clock: Callable[[], float] = trio.current_time,
        wall_clock: Callable[[], float] = time.time,
        utc_clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        if auth_enabled and store is None:
            raise ValueError("a gate with auth on needs the store (tokens live there)")
        self.auth_enabled = auth_enabled
        self.store = store
        self.audit = audit
        self.limiter = limiter
        self.cors = cors or CorsPolicy()
        self.loopback_hosts = loopback_hosts
        self.clock = clock
        self.wall_clock = wall_clock
        self.utc_clock = utc_clock
        self.tokens = TokenCache()
        self._streams: dict[str, set[TokenStream]] = {}  # token id -> its open streams
        self._counts = dict.fromkeys(
            (
                "admitted",
                "unauthorized",
                "forbidden",
                "rate_limited",
                "preflights",
                "audited",
                "audit_failures",
            ),
            0,
        )

    @property
    def idle(self) -> bool:
        """True when the gate has nothing to do for a read request (the common fast case)."""
        return not self.auth_enabled and self.limiter is None and not self.cors.enabled

    # -- the verdict -------------------------------------------------------------

    async def admit(self, scope: dict[str, Any], requires: str) -> Admission:
        """The verdict for one HTTP request or WebSocket handshake (module rules 1-5)."""
        method: str = scope.get("method", "GET")
        mutating = scope["type"] == "http" and method not in READ_METHODS
        peer = scope.get("lokid.peer")
        if requires == OPEN and method != "OPTIONS" and not self.cors.enabled:
            self._counts["admitted"] += 1
            return PASS  # /health*: nothing to check, nothing to add
        headers: dict[str, str] = {}
        if peer is None:  # TCP: reachable by browsers
            headers = _header_map(scope)
            if method == "OPTIONS" and is_preflight(
                method, headers.get("origin"), headers.get("access-control-request-method")
            ):
                return self._preflight(headers)  # CORS off: refused like any unlisted origin
        if self.idle:  # no auth, limit or CORS: the browser guard and the audit of changes
            return await self._admit_idle(scope, headers, peer, requires, mutating)
        cors_headers: list[Header] = []
        if peer is None and self.cors.enabled:
            cors_headers = self.cors.response_headers(headers.get("origin"))
        if requires == OPEN:
            self._counts["admitted"] += 1
            return Admission(None, tuple(cors_headers)) if cors_headers else PASS

        extra = list(cors_headers)
        try:
            principal, failure = await self._identify(scope, headers, peer)
        except LokiError as exc:  # the token table cannot be read: nobody is let in
            return Admission(_answer(ApiError.from_loki(exc), extra), tuple(extra))
        if self.limiter is not None and peer is None:
            key = ratelimit.client_key(
                principal.token.id if principal.token else None, principal.ip
            )
            decision = self.limiter.check(key, self.clock())
            extra += ratelimit.headers(decision, wall_now=self.wall_clock())
            if not decision.allowed:
                self._counts["rate_limited"] += 1
                error = ApiError(
                    ratelimit.ERROR_CODE,
                    ratelimit.ERROR_MESSAGE,
                    extra=ratelimit.error_details(decision),
                )
                return Admission(_answer(error, extra), tuple(extra))
        if peer is None:  # after the limit: a flood of refused pages is limited too
            refusal = self._browser_guard(scope, headers, mutating)
            if refusal is not None:
                self._counts["forbidden"] += 1
                return await self._refuse(scope, principal, refusal, extra)
        if failure is not None:
            self._counts["unauthorized"] += 1
            return await self._refuse(scope, principal, failure, extra)
        if not principal.owner and requires != AUTHENTICATED:
            assert principal.token is not None
            if not principal.token.grants(requires):
                self._counts["forbidden"] += 1
                error = ApiError(
                    "FORBIDDEN",
                    f"This token lacks the {requires!r} scope needed for {method} "
                    f"{_full_path(scope)}",
                    {"required_scope": requires, "scopes": sorted(principal.token.scopes)},
                )
                return await self._refuse(scope, principal, error, extra)
        self._counts["admitted"] += 1
        return Admission(None, tuple(extra), principal, audit=mutating and self.audit is not None)

    async def _admit_idle(
        self,
        scope: dict[str, Any],
        headers: dict[str, str],
        peer: Any,
        requires: str,
        mutating: bool,
    ) -> Admission:
        """`admit` with auth, limit and CORS off: only the browser guard can refuse, and
        only a change needs its caller named (for its audit entry)."""
        if peer is None and requires != OPEN:
            refusal = self._browser_guard(scope, headers, mutating)
            if refusal is not None:
                self._counts["forbidden"] += 1
                principal, _ = await self._identify(scope, headers, peer)
                return await self._refuse(scope, principal, refusal, [])
        self._counts["admitted"] += 1
        if not mutating or self.audit is None or requires == OPEN:
            return PASS
        principal, _ = await self._identify(scope, headers, peer)
        return Admission(None, (), principal, audit=True)

    def _browser_guard(
        self, scope: dict[str, Any], headers: dict[str, str], mutating: bool
    ) -> ApiError | None:
        """Why a request a web page may have made on its own must be refused, or None.

        A page in the user's browser can send simple cross-origin requests
        (a `POST` without preflight, a WebSocket handshake) to loopback, and
        with DNS rebinding even read answers. So: a change or a WebSocket
        from an origin that is neither this listener nor a listed CORS origin
        is refused; and with auth off (`loopback_hosts`), so is any request
        whose `Host` is not a loopback name. A read that changes something
        passes here as a read, and its handler's `demand` asks again as a change.
        """
        host = headers.get("host")
        if self.loopback_hosts and host is not None and not _is_loopback_host(host):
            return ApiError(
                "FORBIDDEN",
                f"Host {host[:100]!r} is not a loopback name: with auth off lokid answers only "
                "requests addressed to localhost (a guard against DNS rebinding)",
                {"reason": "host"},
            )
        if not mutating and scope["type"] != "websocket":
            return None
        origin = headers.get("origin")
        if origin is None:
            if headers.get("sec-fetch-site") == "cross-site":
                return ApiError(
                    "FORBIDDEN",
                    "Cross-site request refused (Sec-Fetch-Site: cross-site)",
                    {"reason": "cross_origin"},
                )
            return None
        if _header_count(scope, b"origin") > 1:  # a browser sends one: which one counts is a guess
            return ApiError(
                "FORBIDDEN",
                "Cross-origin request refused: send one Origin header, not several",
                {"reason": "cross_origin"},
            )
        scheme = _PAGE_SCHEME.get(scope.get("scheme", "http"), "http")  # a page's WS: ws://
        if host is not None and origin.lower() == f"{scheme}://{host}".lower():
            return None  # same origin: this listener's own page
        if self.cors.allowed(origin):
            return None
        return ApiError(
            "FORBIDDEN",
            f"Cross-origin request refused: origin {origin[:200]!r} is not this listener and "
            "not in LOKI_CORS_ORIGINS",
            {"reason": "cross_origin"},
        )

    def _preflight(self, headers: dict[str, str]) -> Admission:
        self._counts["preflights"] += 1
        answer = self.cors.preflight(
            headers.get("origin"),
            headers.get("access-control-request-method"),
            headers.get("access-control-request-headers"),
        )
        if answer is None:
            error = ApiError(
                "FORBIDDEN",
                "CORS preflight refused: the origin, method or a requested header is not allowed",
                {"origin": headers.get("origin", "")[:200]},
            )
            return Admission(_answer(error, [(b"vary", b"Origin")]))
        return Admission((answer.status, list(answer.headers), b""))

    async def _identify(
        self, scope: dict[str, Any], headers: dict[str, str], peer: Any
    ) -> tuple[Principal, ApiError | None]:
        owner = self._owner(scope, peer)
        if owner is not None:
            return owner, None
        ip = _client_ip(scope)
        anonymous = Principal(ip or "-", ip)
        raw = _presented_token(scope, headers)
        if raw is None:
            return anonymous, ApiError(
                "UNAUTHORIZED",
                "Authentication required: send Authorization: Bearer <token>",
                {"reason": "missing"},
            )
        if isinstance(raw, ApiError):
            return anonymous, raw
        result = await self._lookup(raw)
        if isinstance(result, AuthFailure):
            who = Principal(result.token_id or anonymous.actor, ip)
            return who, ApiError("UNAUTHORIZED", result.message, {"reason": result.reason.value})
        return Principal(result.id, ip, token=result), None

    def _owner(self, scope: dict[str, Any], peer: Any) -> Principal | None:
        """The caller who needs no token: the control-socket peer (`uid:<n>`), or with auth
        off the client address; None when a token decides."""
        if peer is not None:
            return Principal(f"uid:{peer['uid']}", None, owner=True)
        if not self.auth_enabled:
            ip = _client_ip(scope)
            return Principal(ip or "-", ip, owner=True)
        return None

    def _caller(self, scope: dict[str, Any]) -> Principal:
        """Who an admitted request comes from. A read the gate let through without
        looking (nothing to check: `PASS`) has no `PRINCIPAL`; it is named here as
        the rest of the audit log names that caller."""
        principal: Principal | None = scope.get(PRINCIPAL)
        if principal is not None:
            return principal
        ip = _client_ip(scope)
        return self._owner(scope, scope.get("lokid.peer")) or Principal(ip or "-", ip)

    async def _lookup(self, raw: str) -> TokenInfo | AuthFailure:
        assert self.store is not None
        digest = token_sha256(raw)
        now = self.clock()
        utc = self.utc_clock()
        info = self.tokens.get(digest, now)
        if info is None:
            result = await self.store.read(lambda db: authenticate(db, raw, now=utc))
            if isinstance(result, AuthFailure):
                return result
            info = result
            self.tokens.put(digest, info, now)
        elif info.expires_at is not None and info.expires_at <= iso(utc):
            self.tokens.clear()  # re-read: the store says why (expired)
            return await self.store.read(lambda db: authenticate(db, raw, now=utc))
        if info.needs_touch(utc):
            touched = attrs.evolve(info, last_used_at=iso(utc))
            self.tokens.put(digest, touched, now)  # one touch per interval, not one per request
            try:
                await self.store.write(lambda db: touch_last_used(db, info.id, utc))
            except LokiError as exc:
                log.warning("could not record last use of token %s: %s", info.id, exc)
        return info

    async def _refuse(
        self, scope: dict[str, Any], principal: Principal, error: ApiError, extra: list[Header]
    ) -> Admission:
        """A 401/403, recorded in the audit log before it is answered."""
        details = {k: v for k, v in error.details.items() if k in ("reason", "required_scope")}
        headers = tuple(extra)  # what a refused WebSocket handshake's accept carries
        if error.status == 401:  # RFC 9110: a 401 names the scheme to use
            challenge = 'Bearer realm="lokid"'
            if details.get("reason") not in (None, "missing"):
                challenge += ', error="invalid_token"'
            extra = [*extra, (b"www-authenticate", challenge.encode())]
        try:
            await self._record(scope, principal, error.status, None, details, auth_failure=True)
        except LokiError as exc:
            return Admission(_answer(_audit_down(exc, None), extra), headers)
        return Admission(_answer(error, extra), headers)

    # -- audit -------------------------------------------------------------------

    def audited_send(self, scope: dict[str, Any], admission: Admission, send: Send) -> Send:
        """Wrap `send` so that the response is recorded before its first byte goes out.

        The response start (and its body, up to `MAX_AUDITED_BODY`, to learn a
        created resource's id) is held back until the entry is committed.
        """
        assert admission.principal is not None
        principal = admission.principal
        held: list[dict[str, Any]] = []
        held_bytes = 0
        done = False

        async def audited(message: dict[str, Any]) -> None:
            nonlocal held_bytes, done
            if done:
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body":
                held_bytes += len(message.get("body", b""))
                if message.get("more_body", False) and held_bytes < MAX_AUDITED_BODY:
                    return
            elif message["type"] == "http.response.start":
                return
            done = True
            start = next((m for m in held if m["type"] == "http.response.start"), None)
            status = int(start["status"]) if start is not None else 500
            body = b"".join(m.get("body", b"") for m in held if m["type"] == "http.response.body")
            details = _answer_details(start.get("headers", ()) if start is not None else ())
            try:
                await self._record(scope, principal, status, body, details)
            except LokiError as exc:
                error = _audit_down(exc, status, body)
                code, headers, payload = _answer(error, list(admission.headers))
                await send({"type": "http.response.start", "status": code, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                held.clear()
                return
            for item in held:
                await send(item)
            held.clear()

        return audited

    async def audit_answer(
        self,
        scope: dict[str, Any],
        admission: Admission,
        status: int,
        headers: list[Header],
        body: bytes,
    ) -> Answer:
        """`audited_send` for a whole answer (the inline path): record it, then return it;
        a 503 in its place when the audit log cannot record it."""
        assert admission.principal is not None
        try:
            await self._record(scope, admission.principal, status, body, _answer_details(headers))
        except LokiError as exc:
            return _answer(_audit_down(exc, status, body), [])
        return status, headers, body

    async def _record(
        self,
        scope: dict[str, Any],
        principal: Principal,
        status: int,
        body: bytes | None,
        details: dict[str, Any],
        *,
        auth_failure: bool = False,
        action: str | None = None,
        resource: str | None = None,
    ) -> None:
        if self.audit is None:
            return
        method = scope.get("method", "WEBSOCKET" if scope["type"] == "websocket" else "GET")
        path = _full_path(scope)
        route = classify(method, local_path(scope))
        action = action or route.action  # what the request attempted
        resource = resource or route.resource
        if auth_failure:
            details = {**details, "action": action}
            action = "auth.unauthorized" if status == 401 else "auth.forbidden"
        elif resource is None and body and 200 <= status < 300:
            resource = _created_id(body)
        if scope.get("lokid.peer") is not None:
            details = {**details, "via": "socket"}
        try:
            await self.audit.record(
                actor=principal.actor,
                action=action,
                resource=resource,
                method=method,
                path=path,
                status=status,
                ip=principal.ip,
                details=details,
            )
        except LokiError:
            self._counts["audit_failures"] += 1
            raise
        self._counts["audited"] += 1

    async def refuse_stranger(self, scope: dict[str, Any], uid: int, error: ApiError) -> ApiError:
        """Record a control-socket request from a uid that is not the owner's; the answer."""
        self._counts["forbidden"] += 1
        principal = Principal(f"uid:{uid}", None)
        details = {"reason": "peer_uid", "via": "socket"}
        try:
            await self._record(scope, principal, error.status, None, details, auth_failure=True)
        except LokiError as exc:
            return _audit_down(exc, None)
        return error

    async def demand(
        self, scope: dict[str, Any], requires: str, *, action: str | None = None
    ) -> None:
        """For a handler whose need depends on its input (a read that may also change
        something, e.g. `GET /api/registry/discover?register=true`): raise a 403
        (recorded) unless the change is one a `POST` would be let through for. So, as
        for any change, one a web page may have sent on its own (a foreign `Origin`,
        `Sec-Fetch-Site: cross-site`: an `<img>` sends a GET) is refused with auth on
        or off; then the caller must hold `requires`. `action`: what the change is
        recorded as when admitted (`record`), so a refusal names the same attempt."""
        principal = self._caller(scope)
        if scope.get("lokid.peer") is None:
            refusal = self._browser_guard(scope, _header_map(scope), mutating=True)
            if refusal is not None:
                await self._forbid(scope, principal, refusal, action)
        if principal.owner:
            return
        if principal.token is not None and principal.token.grants(requires):
            return
        await self._forbid(
            scope,
            principal,
            ApiError(
                "FORBIDDEN",
                f"This token lacks the {requires!r} scope needed for "
                f"{scope.get('method', 'GET')} {_full_path(scope)} with these parameters",
                {"required_scope": requires},
            ),
            action,
        )

    async def _forbid(
        self, scope: dict[str, Any], principal: Principal, error: ApiError, action: str | None
    ) -> NoReturn:
        """Record a 403 a handler decided (`demand`), then raise it (a 503 instead when
        the audit log cannot record it)."""
        self._counts["forbidden"] += 1
        details = {k: v for k, v in error.details.items() if k in ("reason", "required_scope")}
        try:
            await self._record(
                scope, principal, 403, None, details, auth_failure=True, action=action
            )
        except LokiError as exc:
            raise _audit_down(exc, None) from None
        raise error

    async def record(
        self,
        scope: dict[str, Any],
        status: int,
        *,
        action: str | None = None,
        resource: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Record a change a read route made (see `demand`) before its answer is sent;
        raises the 503 `ApiError` if the audit log cannot record it."""
        principal = self._caller(scope)
        try:
            await self._record(
                scope, principal, status, None, details or {}, action=action, resource=resource
            )
        except LokiError as exc:
            raise _audit_down(exc, status) from None

    def forget_tokens(self) -> None:
        """Drop cached token lookups (after a revoke: the next request re-reads the store)."""
        self.tokens.clear()

    def token_revoked(self, token_id: str) -> int:
        """After a revoke: forget cached lookups, and end every stream opened with the
        token (a WebSocket closes with 1008, an SSE stream ends); how many."""
        self.forget_tokens()
        streams = self._streams.pop(token_id, set())
        for stream in streams:
            stream.end(AuthFailure(FailureReason.REVOKED).message)
        return len(streams)

    @contextlib.contextmanager
    def stream(self, scope: Mapping[str, Any]) -> Iterator[TokenStream]:
        """Keep an admitted long-lived answer known by its token while it is open, so a
        revoke can end it (`token_revoked`); its handler waits on what this yields."""
        principal: Principal | None = scope.get(PRINCIPAL)
        token = principal.token if principal is not None else None
        if token is None:
            yield TokenStream(None, math.inf)
            return
        deadline = self.clock() + token.seconds_left(self.utc_clock())
        stream = TokenStream(token.id, deadline)
        self._streams.setdefault(token.id, set()).add(stream)
        try:
            yield stream
        finally:
            streams = self._streams.get(token.id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[token.id]

    @property
    def token_streams(self) -> int:
        """Open streams authenticated with a token (what a revoke may have to end)."""
        return sum(len(streams) for streams in self._streams.values())

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            auth_enabled=self.auth_enabled,
            rate_limit=str(self.limiter.rate) if self.limiter is not None else None,
            cors_origins=len(self.cors.origins),
            token_cache=len(self.tokens),
            **self._counts,
        )


# -- helpers ----------------------------------------------------------------------------


def _header_map(scope: dict[str, Any]) -> dict[str, str]:
    """Request headers by lower-case name (a repeated header: the first wins)."""
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key not in found:
            found[key] = value.decode("latin-1")
    return found


@functools.lru_cache(maxsize=256)  # a few distinct Host values; parsing one costs ~10 µs
def _is_loopback_host(host: str) -> bool:
    """Whether a `Host` header names this machine: localhost (and *.localhost), 127/8, ::1."""
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _header_count(scope: dict[str, Any], name: bytes) -> int:
    """How many lines of the header `name` (lower case) the request has."""
    return sum(1 for key, _ in scope.get("headers", ()) if key.lower() == name)


def _presented_token(scope: dict[str, Any], headers: dict[str, str]) -> str | ApiError | None:
    """The raw token of a request, None when none was sent, or why the header is unusable."""
    value = headers.get("authorization")
    if value is None:
        if scope["type"] == "websocket":
            tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            return tokens[-1] if tokens else None
        return None
    if _header_count(scope, b"authorization") > 1:
        # A singleton field (RFC 9110 §11.6.2): with two, which one a proxy in front
        # checked or replaced is unknowable, so neither is trusted.
        return ApiError(
            "UNAUTHORIZED",
            "Send one Authorization header, not several",
            {"reason": "malformed"},
        )
    scheme, _, credentials = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return ApiError(
            "UNAUTHORIZED",
            "Authorization header must be 'Bearer <token>'",
            {"reason": "malformed"},
        )
    return credentials.strip()


def _client_ip(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    if isinstance(client, (tuple, list)) and client:
        return str(client[0])
    return None


def _full_path(scope: dict[str, Any]) -> str:
    return str(scope.get("path", ""))  # ASGI: the full path, root_path included


def origin_form(scope: dict[str, Any]) -> dict[str, Any]:
    """`scope` with an absolute-form target (`GET http://host/api/x`) made origin-form.

    RFC 9112 §3.2.2: a server must accept the absolute form, and then use the
    target's authority, not the `Host` header. Hypercorn passes the whole URL as
    `path`; left so, the gate would judge an undeclared path (any token passes)
    while Quart's router found the declared route behind it. Every path check
    (gate, router, metrics) must see the one path, so this runs before all of them.
    """
    path = str(scope.get("path", ""))
    if path.startswith("/") or scope.get("type") not in ("http", "websocket"):
        return scope
    target = urlsplit(path)
    if target.scheme.lower() not in ("http", "https", "ws", "wss") or not target.netloc:
        return scope  # `*` or nonsense: no route has it (404)
    fixed = dict(scope)
    fixed["path"] = target.path or "/"
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        fixed["raw_path"] = urlsplit(raw).path or b"/"
    fixed["headers"] = [
        *((k, v) for k, v in scope.get("headers", ()) if k.lower() != b"host"),
        (b"host", target.netloc.encode("latin-1", "replace")),
    ]
    return fixed


def local_path(scope: dict[str, Any]) -> str:
    """The request path within its surface: `path` without the mount's `root_path`."""
    path = _full_path(scope)
    root = str(scope.get("root_path", ""))
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root) :] or "/"
    return path


_REPLAYED = idempotency.REPLAYED_HEADER.lower().encode()


def _answer_details(headers: Iterable[Header]) -> dict[str, Any]:
    """What an answer's headers add to its audit entry: `replay` for an answer given
    again for an `Idempotency-Key` (no second creation happened)."""
    replayed = any(name.lower() == _REPLAYED and value == b"true" for name, value in headers)
    return {"replay": True} if replayed else {}


def _created_id(body: bytes) -> str | None:
    """The `id` of a JSON object answer (what a create made), else None."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def _audit_down(exc: LokiError, status: int | None, body: bytes | None = None) -> ApiError:
    """The 503 for an answer whose audit entry could not be recorded (`body`: the answer's)."""
    if status is None:
        message = "The audit log cannot record this request right now; try again"
    elif status >= 400:  # nothing was carried out: keep the handler's own reason
        cause = _error_message(body)
        message = (
            f"The request failed (status {status}{': ' + cause if cause else ''}), and the "
            "audit log could not record it either"
        )
    else:
        message = (
            f"The request was carried out (status {status}) but the audit log could not "
            "record it; see the daemon log"
        )
    return ApiError("UNAVAILABLE", message, {"audit": str(exc)[:200]})


def _error_message(body: bytes | None) -> str | None:
    """The `message` of an error body, if `body` is one (cut to 300 characters)."""
    try:
        message = json.loads(body or b"")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message[:300] if isinstance(message, str) else None


def _answer(error: ApiError, extra: Iterable[Header]) -> Answer:
    body = error.body_bytes()
    headers = [
        *_JSON_HEADERS,
        *((k.lower().encode(), v.encode()) for k, v in error.headers.items()),
        *extra,
        (b"content-length", str(len(body)).encode()),
    ]
    return error.status, headers, body
