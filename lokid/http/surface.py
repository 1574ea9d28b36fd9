"""One API surface: a route table, a lean ASGI path and a Quart-Trio app behind it.

Why two paths: Quart costs roughly 40 % of a trivial request (request and
response objects, context locals, signals), and Hypercorn in front of it
most of the rest. Routes that matter for speed are *lean*: plain handlers
`scope -> LeanResponse`, found by (method, path) - `{name}` templates
included, with a body read whole into `scope["lokid.body"]` - before Quart
is entered, and served on the inline HTTP/1.1 path (`lokid.http.fastpath`)
without Hypercorn at all. Everything else is an ordinary Quart view. Both
kinds are declared through the same `Route` records, which are also the
single source of `/openapi.json`, so a route cannot exist without being
documented (a test compares `Surface.dispatched()` with the document).

Error bodies are the seed's on both paths (see `lokid.http.errors`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import attrs
import trio
from quart import Quart, Response, has_request_context, has_websocket_context, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from lokid import idempotency
from lokid.actors.store import SYNC_FOLLOWS
from lokid.errors import InvalidQuery, LokiError
from lokid.http.convert import dumps
from lokid.http.errors import STATUS_BY_CODE, ApiError
from lokid.http.gate import (
    AUTHENTICATED,
    OPEN,
    PRINCIPAL,
    REQUIREMENTS,
    Admission,
    Gate,
    local_path,
    origin_form,
)
from lokid.jsontypes import UnusableJson, json_error_text, loads_bounded
from lokid.ratelimit import is_exempt
from lokid.session_records import refuse_unknown

log = logging.getLogger("lokid.http")

MAX_BODY_BYTES = 1024 * 1024  # DESIGN.md §4: larger bodies are 413
BODY_SECONDS = 60.0
"""How long a request body may take to arrive, whole (Quart's BODY_TIMEOUT, for every route)."""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestObserver(Protocol):
    """A surface's per-request hook (`lokid.http.metrics.RouteObserver`): latency until
    the response head. The ASGI path wraps `send` with `timed`; the inline path calls
    `observe`. Must stay cheap: it runs on every request."""

    def timed(self, scope: Scope, send: Send) -> Send: ...

    def observe(self, scope: Scope, status: int, seconds: float) -> None: ...


JSON_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


@attrs.frozen
class Param:
    name: str
    location: str  # "query" | "path" | "header"
    schema: Mapping[str, Any] = attrs.field(factory=lambda: {"type": "string"})
    required: bool = False
    description: str = ""
    explode: bool | None = None  # an array in the query: False = one comma-separated value


WEBSOCKET_TOKEN = Param(
    "token",
    "query",
    description="The API token, for clients that cannot send an Authorization header on a "
    "WebSocket handshake (browsers); the header wins when both are sent",
)
"""Every WebSocket route's one query parameter (`lokid.http.gate`, security.md)."""

Link = tuple[str, str, Mapping[str, str]]
"""An OpenAPI link of a route's 2xx answer: (method, path, {parameter: runtime expression})."""


@attrs.frozen
class Route:
    """What the OpenAPI document says about one (method, path)."""

    method: str
    path: str  # OpenAPI style: /api/sessions/{id}
    summary: str
    responses: Mapping[int, str]
    params: tuple[Param, ...] = ()
    request_body: Mapping[str, Any] | None = None
    response_schema: Mapping[str, Any] | None = None
    tags: tuple[str, ...] = ()
    lean: bool = False
    media_type: str = "application/json"
    requires: str = AUTHENTICATED  # what the gate demands: see lokid.http.gate.REQUIREMENTS
    # status -> {media type: schema}: answers that are not the 2xx JSON default or the
    # error body (a web page, an event stream, a probe's 503); {} = no body
    content: Mapping[int, Mapping[str, Mapping[str, Any]]] = attrs.field(factory=dict)
    links: Mapping[str, Link] = attrs.field(factory=dict)  # name -> link, on the 2xx answer

    @property
    def operation_id(self) -> str:
        return operation_id(self.method, self.path)


def operation_id(method: str, path: str) -> str:
    words = re.sub(r"[{}]", "", path).strip("/").replace("/", "_").replace("-", "_")
    return f"{method.lower()}_{words or 'root'}"


@attrs.frozen
class LeanResponse:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


LeanHandler = Callable[[Scope], Awaitable[LeanResponse]]
H = TypeVar("H")


def json_response(status: int, payload: Any) -> LeanResponse:
    """A JSON answer; a remembered one given again (`idempotency.Replayed`) says so."""
    headers = tuple(
        (name.lower().encode(), value.encode())
        for name, value in idempotency.replay_headers(payload).items()
    )
    return LeanResponse(status, dumps(payload), headers)


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": list(STATUS_BY_CODE)},
                "message": {"type": "string", "minLength": 1},
                "details": {
                    "type": "object",
                    "description": "field: the query parameter, header or body field at fault; "
                    "required_scope (403); allowed (405); limit (413); reason (401, 403)",
                },
                "retry_after": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "RATE_LIMITED only: seconds, as the Retry-After header",
                },
            },
        }
    },
}

# -- schema fragments: what the validators accept, in JSON Schema -----------------------

SPACE = (
    "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a"
    "\\u2028\\u2029\\u202f\\u205f\\u3000"
)
"""What `str.strip()` removes (`str.isspace()`), as the body of a regex class: spelled
out, because `\\s` differs between regex engines (ECMA's lacks U+001C-U+001F)."""
CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
"""Unicode category Cc, as the body of a regex class."""


def stripped_text(most: int, forbidden: str = "", **extra: Any) -> dict[str, Any]:
    """A string the server strips, then wants 1..`most` characters long, none `forbidden`
    (a regex class body). Leading and trailing white space may be anything it strips."""
    first = f"[^{SPACE}{forbidden}]"
    middle = f"[^{forbidden}]" if forbidden else "[\\s\\S]"
    pattern = f"^[{SPACE}]*{first}(?:{middle}{{0,{most - 2}}}{first})?[{SPACE}]*$"
    return {"type": "string", "pattern": pattern, **extra}


def not_blank(most: int | None = None, **extra: Any) -> dict[str, Any]:
    """A string with something besides white space (the server checks `text.strip()`)."""
    bounds = {"maxLength": most} if most is not None else {}
    return {"type": "string", "minLength": 1, "pattern": f"[^{SPACE}]", **bounds, **extra}


_UPPER = {"k": "K\\u212a"}  # str.lower() turns the Kelvin sign into k too


def words(*choices: str, blank: bool = False, **extra: Any) -> dict[str, Any]:
    """One of `choices`, compared after `strip().lower()`; `blank`: nothing but white
    space is a valid value too."""

    def any_case(word: str) -> str:
        return "".join(f"[{c}{_UPPER.get(c, c.upper())}]" if c.isalpha() else c for c in word)

    alternatives = "|".join(any_case(c) for c in choices) + ("|" if blank else "")
    return {
        "type": "string",
        "pattern": f"^[{SPACE}]*(?:{alternatives})[{SPACE}]*$",
        "examples": list(choices),
        **extra,
    }


IDEMPOTENCY_KEY: dict[str, Any] = {
    "type": "string",
    "pattern": f"^[{SPACE}]*[!-~](?:[ -~]{{0,253}}[!-~])?[{SPACE}]*$",
    "description": "1-255 printable ASCII characters (surrounding white space is dropped)",
}
"""The `Idempotency-Key` header as `lokid.idempotency.validate_key` reads it."""

BOOLEAN_PARAM: dict[str, Any] = {
    "anyOf": [
        {"type": "boolean"},
        words("1", "true", "yes", "on", "0", "false", "no", "off", blank=True),
    ],
    "description": "true: 1, true, yes, on, or the bare name; false: 0, false, no, off (any case)",
}
"""A query flag as `bool_param` reads it."""


class Surface:
    """An ASGI application for one listener (HTTP API or Dashboard API)."""

    def __init__(self, title: str, version: str, *, description: str = "") -> None:
        self.title = title
        self.version = version
        self.description = description
        self.routes: list[Route] = []
        self.gate = Gate()  # open; the daemon installs its own (auth, limits, CORS, audit)
        self.observer: RequestObserver | None = None  # request metrics; the daemon sets it
        self._exact_routes: dict[tuple[str, str], Route] = {}
        self._exact_paths: set[str] = set()  # the paths of routes without a template
        self._templates: list[tuple[re.Pattern[str], Route]] = []
        self._lean: dict[tuple[str, str], LeanHandler] = {}
        self._raw: dict[tuple[str, str], ASGIApp] = {}
        self._lean_paths: dict[str, list[str]] = {}
        self._lean_templates: list[tuple[re.Pattern[str], Route, LeanHandler]] = []
        self._quart_paths: dict[str, list[str]] = {}
        self._quart_templates: list[tuple[re.Pattern[str], str]] = []
        self._websocket_paths: set[str] = set()
        self._endpoint_requires: dict[str, str] = {}  # Quart endpoint -> the route's `requires`
        self.quart: Quart = QuartTrio(f"lokid-{title.lower().replace(' ', '-')}")
        self._configure_quart(self.quart)
        self.quart.before_request(self._served_as_admitted)
        self.quart.before_websocket(self._served_as_admitted)
        self._openapi_bytes: bytes | None = None
        self.lean(
            "GET",
            "/openapi.json",
            "This listener's OpenAPI 3.1 document",
            responses={200: "The document"},
            tags=("meta",),
            requires="read",
        )(self._openapi_handler)

    # -- declaring routes -------------------------------------------------------

    def lean(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        responses: Mapping[int, str],
        params: Iterable[Param] = (),
        request_body: Mapping[str, Any] | None = None,
        response_schema: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        requires: str,
        media_type: str = "application/json",
        content: Mapping[int, Mapping[str, Mapping[str, Any]]] | None = None,
        links: Mapping[str, Link] | None = None,
    ) -> Callable[[LeanHandler], LeanHandler]:
        """A handler answered before Quart: `scope -> LeanResponse`.

        `{name}` segments of `path` match one path segment each; the handler
        finds them in `scope["path_params"]`, and a request body (read whole,
        at most `MAX_BODY_BYTES`) in `scope["lokid.body"]` (see `lean_json`).
        """
        route = Route(
            method,
            path,
            summary,
            responses,
            tuple(params),
            request_body,
            response_schema=response_schema,
            tags=tuple(tags),
            lean=True,
            media_type=media_type,
            requires=requires,
            content=content or {},
            links=links or {},
        )
        if "{" not in path:
            return self._declare(route, self._lean)

        def register(handler: LeanHandler) -> LeanHandler:
            pattern = self._add(route)
            assert pattern is not None
            self._lean_templates.append((pattern, route, handler))
            return handler

        return register

    def stream(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        responses: Mapping[int, str],
        params: Iterable[Param] = (),
        media_type: str = "text/event-stream",
        event_schema: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        requires: str,
    ) -> Callable[[ASGIApp], ASGIApp]:
        """A raw ASGI handler for a long-lived response (no framework on the hot path).

        `event_schema` describes one event of the 200 stream (for `text/event-stream`,
        as OpenAPI before 3.2 reads `schema`: `{data, event, id, retry}`).
        """
        route = Route(
            method,
            path,
            summary,
            responses,
            tuple(params),
            response_schema=event_schema or {"type": "string"},
            tags=tuple(tags),
            lean=True,
            media_type=media_type,
            requires=requires,
        )
        return self._declare(route, self._raw)

    def route(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        responses: Mapping[int, str],
        params: Iterable[Param] = (),
        request_body: Mapping[str, Any] | None = None,
        response_schema: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        requires: str,
        links: Mapping[str, Link] | None = None,
    ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
        """An ordinary Quart view; `{name}` path segments become its arguments."""
        route = Route(
            method,
            path,
            summary,
            responses,
            tuple(params),
            request_body,
            response_schema,
            tuple(tags),
            requires=requires,
            links=links or {},
        )

        def register(view: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            pattern = self._add(route)
            if pattern is None:  # a lean route on the same path must not answer 405 for it
                self._quart_paths.setdefault(path, []).append(method)
            else:
                self._quart_templates.append((pattern, method))
            rule = re.sub(r"{(\w+)}", r"<\1>", path)
            endpoint = f"{method.lower()}:{path}"
            self._endpoint_requires[endpoint] = route.requires
            self.quart.add_url_rule(rule, endpoint, view, methods=[method])
            return view

        return register

    def websocket(
        self,
        path: str,
        summary: str,
        *,
        tags: Iterable[str] = (),
        requires: str,
    ) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., Awaitable[None]]]:
        """A Quart WebSocket view (documented as the GET of its upgrade)."""
        route = Route(
            "GET",
            path,
            summary + " (WebSocket: connect with an Upgrade request)",
            {101: "Switching Protocols", 400: "Not a WebSocket upgrade request"},
            (WEBSOCKET_TOKEN,),
            tags=tuple(tags),
            requires=requires,
            media_type="application/json",
        )

        async def not_an_upgrade() -> dict[str, Any]:
            """A plain GET of the path (Quart's own answer would be werkzeug's vague 400)."""
            raise ApiError(
                "BAD_REQUEST",
                f"{path} is a WebSocket: open it with an Upgrade: websocket request "
                "(GET with Connection: Upgrade, Sec-WebSocket-Key and Sec-WebSocket-Version: 13)",
            )

        def register(view: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
            self._add(route)
            self._websocket_paths.add(path)
            for endpoint in (f"ws:{path}", f"http:{path}"):
                self._endpoint_requires[endpoint] = route.requires
            self.quart.add_websocket(path, f"ws:{path}", view)
            self.quart.add_url_rule(path, f"http:{path}", not_an_upgrade, methods=["GET"])
            return view

        return register

    def _declare(self, route: Route, table: dict[tuple[str, str], H]) -> Callable[[H], H]:
        """Register a lean or raw handler: documented, looked up by (method, path)."""

        def register(handler: H) -> H:
            self._add(route)
            table[(route.method, route.path)] = handler
            self._lean_paths.setdefault(route.path, []).append(route.method)
            return handler

        return register

    def _add(self, route: Route) -> re.Pattern[str] | None:
        """Record a route (documented, its requirement known); its path pattern if templated."""
        if any(r.method == route.method and r.path == route.path for r in self.routes):
            raise ValueError(f"route {route.method} {route.path} declared twice")
        if route.requires not in REQUIREMENTS:
            raise ValueError(
                f"route {route.method} {route.path}: requires={route.requires!r} is not one of "
                f"{', '.join(REQUIREMENTS)}"
            )
        self.routes.append(route)
        self._openapi_bytes = None
        if "{" not in route.path:
            self._exact_routes[(route.method, route.path)] = route
            self._exact_paths.add(route.path)
            return None
        pattern = _template(route.path)
        self._templates.append((pattern, route))
        return pattern

    def requirement(self, method: str, path: str) -> str:
        """What the gate demands for (method, path): the declared route's `requires`.

        HEAD is GET's. An undeclared route needs any valid token (so that
        without one, route names are not probed: 401 before 404), except
        under `/health`, which is open.
        """
        route = self.route_of(method, path)
        if route is not None:
            return route.requires
        return OPEN if is_exempt(path) else AUTHENTICATED

    def _not_a_websocket(self, scope: Scope) -> ApiError:
        """Why a WebSocket handshake to a path without a WebSocket route is refused:
        404 for a path nothing answers, 400 for one that answers plain HTTP."""
        root = str(scope.get("root_path", ""))  # `/dashboard` on the control socket
        path = local_path(scope)
        known = ", ".join(root + p for p in sorted(self._websocket_paths))
        hint = f"WebSockets here: {known}" if known else "no WebSocket is served here"
        if self.route_path(path) is None:
            return ApiError("NOT_FOUND", f"No WebSocket route for {root}{path} ({hint})")
        return ApiError(
            "BAD_REQUEST",
            f"{root}{path} is not a WebSocket: send it a plain HTTP request ({hint})",
        )

    def route_path(self, path: str) -> str | None:
        """The declared route path `path` is an instance of (any method), e.g.
        `/api/tasks/{id}` for `/api/tasks/task-1`; None if no route has it."""
        if path in self._exact_paths:
            return path
        for pattern, route in self._templates:
            if pattern.fullmatch(path):
                return route.path
        return None

    def route_of(self, method: str, path: str) -> Route | None:
        """The declared route answering (method, path); HEAD is GET's. None if undeclared."""
        if method == "HEAD":
            method = "GET"
        found = self._exact_routes.get((method, path))
        if found is not None:
            return found
        for pattern, route in self._templates:
            if route.method == method and pattern.fullmatch(path):
                return route
        return None

    def query_refusal(self, scope: Scope) -> ApiError | None:
        """A 400 naming the first query parameter the request's route does not declare.

        Ignoring it would make a typo look applied: `?colum=done` listing every
        column, `?nwo=true` pausing after the run instead of now (DESIGN.md §4).
        An undeclared route is left to the 404/405 that follows. Open routes (`/health*`
        probes, the web page's files) take any query: a probe or a browser adding
        `?v=2` must not get an error for it.
        """
        raw: bytes = scope.get("query_string", b"")
        if not raw:
            return None
        route = self.route_of(scope.get("method", "GET"), local_path(scope))  # a handshake: GET
        if route is None or route.requires == OPEN:
            return None
        pairs = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        try:
            refuse_unknown((name for name, _ in pairs), query_names(route.params))
        except InvalidQuery as exc:
            return ApiError.from_loki(exc)
        return None

    async def admit(self, scope: Scope) -> Admission:
        """The gate's verdict on a request to this surface (see `lokid.http.gate`)."""
        scope[REQUIRED] = self.requirement(scope.get("method", "GET"), local_path(scope))
        return await self.gate.admit(scope, scope[REQUIRED])

    async def _served_as_admitted(self) -> None:
        """Quart's router must land on a route demanding what the gate demanded.

        The gate judges the path as sent and Quart routes it its own way; should
        the two ever read a path differently (as they once did `//api/...` and
        absolute-form targets), a route the gate did not judge is a 404, never
        a scope check skipped.
        """
        current = request if has_request_context() else websocket
        rule = current.url_rule
        if rule is None:
            return  # Quart's 404 or 405 follows
        if current.scope.get(REQUIRED) != self._endpoint_requires.get(rule.endpoint):
            method, path = _target()
            log.error("%s %s: routed to %s, not the route the gate judged", method, path, rule)
            raise ApiError("NOT_FOUND", f"No route for {method} {path}")

    # -- ASGI -------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = origin_form(scope)
        if scope["type"] == "websocket":
            admission = await self.admit(scope)
            if admission.answer is not None:
                # Accepted, then closed with 1008 and the reason: a handshake refused
                # before accept reaches a browser as a bare 1006, which a page cannot
                # tell from a network failure.
                await send({"type": "websocket.accept", "headers": list(admission.headers)})
                reason = _close_reason(admission.answer)
                await send({"type": "websocket.close", "code": 1008, "reason": reason})
                return
            scope[PRINCIPAL] = admission.principal
            if admission.headers:  # the rate-limit (and CORS) headers, on every answer
                send = _with_headers(send, admission.headers)
            if local_path(scope) not in self._websocket_paths:
                await _refuse_handshake(scope, send, self._not_a_websocket(scope))
                return
            refusal = self.query_refusal(scope)
            if refusal is not None:
                await _refuse_handshake(scope, send, refusal)
                return
        if scope["type"] == "http":
            if self.observer is not None:
                send = self.observer.timed(scope, send)
            admission = await self.admit(scope)
            if admission.answer is not None:
                status, headers, body = admission.answer
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            scope[PRINCIPAL] = admission.principal
            if admission.headers:
                send = _with_headers(send, admission.headers)
            if admission.audit:
                send = self.gate.audited_send(scope, admission, send)
            refusal = self.query_refusal(scope)
            if refusal is not None:
                await send_error(send, refusal)
                return
            path = local_path(scope)
            method = scope["method"]
            match = self.lean_match(method, path) if method != "HEAD" else None
            if match is not None:
                handler, scope["path_params"] = match
                if method not in BODYLESS_METHODS:
                    try:
                        scope[BODY] = await _read_body(scope, receive)
                    except ApiError as exc:
                        await send_error(send, exc)
                        return
                await self._serve_lean(handler, scope, send, audited=admission.audit)
                return
            raw = self._raw.get((method, path))
            if raw is not None:
                await raw(scope, receive, send)
                return
            lean_methods, quart_methods = self._methods_on(path)
            if lean_methods and method not in quart_methods:
                has_lean_get = "GET" in lean_methods
                every = {*lean_methods, *quart_methods, *(("HEAD",) if has_lean_get else ())}
                allowed = ", ".join(sorted(every))
                if method == "HEAD" and has_lean_get:
                    match = self.lean_match("GET", path)
                    if match is None:  # GET is a stream (raw) route
                        await _stream_head(self._raw[("GET", path)], scope, receive, send)
                        return
                    handler, scope["path_params"] = match
                    await self._serve_lean(handler, scope, send, head=True)
                    return
                error = ApiError(
                    "METHOD_NOT_ALLOWED",
                    f"{scope['method']} is not allowed on {scope['path']}; allowed: {allowed}",
                    {"allowed": allowed.split(", ")},
                )
                await send_error(send, error, [(b"allow", allowed.encode())])
                return
        await self.quart(scope, receive, send)  # type: ignore[arg-type]

    async def _serve_lean(
        self,
        handler: LeanHandler,
        scope: Scope,
        send: Send,
        *,
        head: bool = False,
        audited: bool = False,
    ) -> None:
        status, headers, body = await self.lean_answer(handler, scope, audited=audited)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def lean_answer(
        self, handler: LeanHandler, scope: Scope, *, audited: bool = False
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Run a lean handler: (status, headers, body), errors in the seed's body.

        `audited`: the gate records the outcome before it is sent, so the
        handler's store writes need no fsync of their own (`SYNC_FOLLOWS`).
        """
        follows = SYNC_FOLLOWS.set(trio.lowlevel.current_task()) if audited else None
        try:
            response = await handler(scope)
        except ApiError as exc:
            return error_answer(exc)
        except LokiError as exc:
            return error_answer(ApiError.from_loki(exc))
        except Exception:
            log.exception("lean handler %s %s failed", scope["method"], scope["path"])
            return error_answer(ApiError("INTERNAL_ERROR", "internal error; see the daemon log"))
        finally:
            if follows is not None:
                SYNC_FOLLOWS.reset(follows)
        # JSON unless the handler names its own type (the web dashboard's files)
        base = (
            JSON_HEADERS
            if not response.headers or response.headers[0][0] != b"content-type"
            else []
        )
        headers = [*base, *response.headers]
        if response.status not in (204, 304):  # RFC 9110 §8.6: a 304's would be the 200's
            headers.append((b"content-length", str(len(response.body)).encode()))
        return response.status, headers, response.body

    def lean_match(self, method: str, path: str) -> tuple[LeanHandler, dict[str, str]] | None:
        """The lean handler of (method, path) and its path parameters (HEAD uses GET's)."""
        if method == "HEAD":
            method = "GET"
        handler = self._lean.get((method, path))
        if handler is not None:
            return handler, {}
        for pattern, route, candidate in self._lean_templates:
            if route.method == method and (found := pattern.fullmatch(path)) is not None:
                return candidate, found.groupdict()
        return None

    def dispatched(self) -> set[tuple[str, str]]:
        """Every (method, path template) a handler really answers, from the dispatch
        tables themselves (lean, templates, streams, Quart's URL map): a test compares
        it with the OpenAPI document."""
        routes = set(self._lean) | set(self._raw)
        routes |= {(route.method, route.path) for _, route, _ in self._lean_templates}
        for rule in self.quart.url_map.iter_rules():
            if rule.endpoint == "static":
                continue
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
            methods = rule.methods or {"GET"}  # a WebSocket rule: its upgrade GET
            routes |= {(m, path) for m in methods if m not in ("HEAD", "OPTIONS")}
        return routes

    def _methods_on(self, path: str) -> tuple[set[str], set[str]]:
        """The methods lean and Quart routes answer on `path` (for 405 and its Allow)."""
        lean = set(self._lean_paths.get(path, ()))
        lean.update(r.method for pattern, r, _ in self._lean_templates if pattern.fullmatch(path))
        quart = set(self._quart_paths.get(path, ()))
        quart.update(m for pattern, m in self._quart_templates if pattern.fullmatch(path))
        return lean, quart

    def stream_route(self, method: str, path: str) -> ASGIApp | None:
        """The streaming (raw) handler of (method, path), for the inline path."""
        return self._raw.get((method, path))

    # -- OpenAPI ------------------------------------------------------------------

    async def _openapi_handler(self, scope: Scope) -> LeanResponse:
        if self._openapi_bytes is None:
            self._openapi_bytes = dumps(self.openapi())
        return LeanResponse(200, self._openapi_bytes)

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for route in self.routes:
            statuses = {
                **route.responses,
                **_COMMON_ERRORS,
                **({} if route.requires == OPEN else _GATE_ERRORS),
            }
            responses = {
                str(status): _response_doc(route, status, statuses[status])
                for status in sorted(statuses)
            }
            if route.links:
                success = min(s for s in statuses if 200 <= s < 300)
                responses[str(success)]["links"] = {
                    name: {"operationId": operation_id(method, path), "parameters": dict(values)}
                    for name, (method, path, values) in route.links.items()
                }
            operation: dict[str, Any] = {
                "operationId": route.operation_id,
                "summary": route.summary,
                "tags": list(route.tags),
                "responses": responses,
                "security": [] if route.requires == OPEN else [{"bearerAuth": []}],
                "x-required-scope": route.requires,
            }
            params = list(route.params) + [
                Param(name, "path", required=True)
                for name in re.findall(r"{(\w+)}", route.path)
                if all(p.name != name for p in route.params)
            ]
            if params:
                operation["parameters"] = [_param_doc(p) for p in params]
            if route.request_body is not None:
                body = dict(route.request_body)
                # An empty body counts as {} (`parse_json_object`): it is a valid request
                # exactly when the schema requires no field.
                operation["requestBody"] = {
                    "required": bool(body.get("required")),
                    "content": {"application/json": {"schema": body}},
                }
                if not body.get("required"):
                    operation["requestBody"]["description"] = "May be left out: {} is assumed"
            paths.setdefault(route.path, {})[route.method.lower()] = operation
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version, "description": self.description},
            "paths": paths,
            "components": {
                "schemas": {"Error": ERROR_SCHEMA},
                "securitySchemes": {
                    "bearerAuth": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "A lokid API token (loki_...); required when "
                        "LOKI_ENTERPRISE_AUTH is on. Scopes: read, write, audit, admin.",
                    }
                },
            },
        }

    # -- Quart set-up -------------------------------------------------------------

    @staticmethod
    def _configure_quart(app: Quart) -> None:
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
        app.config["BODY_TIMEOUT"] = BODY_SECONDS
        # OPTIONS is a 405 naming the methods, as on lean routes (a CORS preflight is the
        # gate's, before any route); Quart's own was an empty text/html 200.
        app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
        app.config["PROPAGATE_EXCEPTIONS"] = False
        app.json.sort_keys = False  # type: ignore[attr-defined]
        app.json.compact = True  # type: ignore[attr-defined]
        app.url_map.strict_slashes = True
        app.url_map.merge_slashes = False  # `//api/x` is not `/api/x`: the gate sees it as sent

        @app.errorhandler(ApiError)
        async def _api_error(exc: ApiError) -> Response:
            return quart_error(exc)

        @app.errorhandler(LokiError)
        async def _loki_error(exc: LokiError) -> Response:
            return quart_error(ApiError.from_loki(exc))

        @app.errorhandler(HTTPException)
        async def _http_error(exc: HTTPException) -> Response:
            return quart_error(_from_werkzeug(exc))

        @app.errorhandler(Exception)
        async def _crash(exc: Exception) -> Response:
            log.error("%s %s failed", *_target(), exc_info=exc)
            return quart_error(ApiError("INTERNAL_ERROR", "internal error; see the daemon log"))


_COMMON_ERRORS = {
    400: "Malformed request (bad JSON or query value)",
    404: "No such route or resource",
    405: "Method not allowed on this path",
    413: "Request body larger than 1 MiB",
    500: "Internal error (a bug; details are in the daemon log)",
    503: (
        "Unavailable (starting, stopping, the store is down, or the component serving "
        "the route is down for a while: details say which and when it is retried)"
    ),
}


_GATE_ERRORS = {
    401: "No valid token (when auth is on)",
    403: "The token lacks the route's scope (details.required_scope)",
    429: "Rate limited (when on): retry_after and Retry-After say when to retry",
}


def _response_doc(route: Route, status: int, text: str) -> dict[str, Any]:
    """One documented answer: the route's own content for `status`, else the error body
    for 4xx/5xx, nothing for 204/304, else `response_schema` as `media_type`."""
    doc: dict[str, Any] = {"description": text}
    if status in route.content:
        content = route.content[status]
    elif status >= 400:
        content = {"application/json": {"$ref": "#/components/schemas/Error"}}
    elif status in (204, 304) or status < 200:
        content = {}
    else:
        content = {route.media_type: route.response_schema or {"type": "object"}}
    if content:
        doc["content"] = {media: {"schema": dict(schema)} for media, schema in content.items()}
    return doc


def _param_doc(param: Param) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": param.name,
        "in": param.location,
        "required": param.required or param.location == "path",
        "schema": dict(param.schema),
    }
    if param.explode is not None:
        doc["style"] = "form"
        doc["explode"] = param.explode
    if param.description:
        doc["description"] = param.description
    return doc


def _target() -> tuple[str, str]:
    """(method, path) of the request Quart is handling; a WebSocket's method is
    `WebSocket`. Error handlers run for both kinds, and `request` exists only for HTTP."""
    # The ASGI path: as sent, with its mount's root path (`/dashboard` on the control
    # socket). Werkzeug's `request.path` would show `//api/x` as `/api/x`.
    if has_request_context():
        return request.method, str(request.scope["path"])
    if has_websocket_context():
        return "WebSocket", str(websocket.scope["path"])
    return "-", "-"


def _from_werkzeug(exc: HTTPException) -> ApiError:
    status = exc.code or 500
    method, path = _target()
    if status == 404:
        return ApiError("NOT_FOUND", f"No route for {method} {path}")
    if status == 405:
        allowed = sorted(getattr(exc, "valid_methods", None) or [])
        return ApiError(
            "METHOD_NOT_ALLOWED",
            f"{method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            {"allowed": allowed},
            headers={"Allow": ", ".join(allowed)},
        )
    if status == 413:
        return body_too_large()
    if status == 408:  # Quart's BODY_TIMEOUT
        return body_too_slow()
    return ApiError.for_status(status, exc.description or exc.name)


def quart_error(exc: ApiError) -> Response:
    response = Response(exc.body_bytes(), status=exc.status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"  # as every lean and gate error
    for name, value in exc.headers.items():
        response.headers[name] = value
    return response


BODY = "lokid.body"  # scope key: a lean handler's request body (bytes)
REQUIRED = "lokid.required"  # scope key: what the gate demanded of the request
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


WS_REASON_BYTES = 123  # the most a WebSocket close frame's reason may hold (RFC 6455)


def _close_reason(answer: tuple[int, list[tuple[bytes, bytes]], bytes]) -> str:
    """`CODE: message` of a refusal's error body, cut to fit a close frame."""
    try:
        error = json.loads(answer[2])["error"]
        text = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        text = f"refused ({answer[0]})"
    raw = text.encode()[:WS_REASON_BYTES]
    return raw.decode("utf-8", "ignore")


async def _refuse_handshake(scope: Scope, send: Send, error: ApiError) -> None:
    """Answer a WebSocket handshake with `error` as a plain HTTP response (the ASGI
    `websocket.http.response` extension, which Hypercorn offers); without it, a close
    before accept, which the server answers with a bare 403."""
    answer = error_answer(error)
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": _close_reason(answer)})
        return
    status, headers, body = answer
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


async def _stream_head(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """HEAD on a stream route: its GET's status and headers, no body.

    The handler runs until it sends its answer's head, so a bad query is the same 400
    and a full server the same 503 as for GET, and is then cancelled: it sends no
    event, and its subscription ends at once.
    """
    with trio.CancelScope() as cancel_scope:

        async def head_only(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                cancel_scope.cancel()

        await app(scope, receive, head_only)


def _template(path: str) -> re.Pattern[str]:
    """`/api/tasks/{id}/move` -> a pattern whose named groups are the `{...}` segments."""
    return re.compile(re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path)))


def body_too_large() -> ApiError:
    return ApiError(
        "PAYLOAD_TOO_LARGE",
        f"Request body is larger than the limit of {MAX_BODY_BYTES} bytes",
        {"limit": MAX_BODY_BYTES},
    )


def body_too_slow() -> ApiError:
    return ApiError("BAD_REQUEST", f"Request body did not arrive within {BODY_SECONDS:g} s")


def announced_too_large(length: str | None) -> bool:
    """Whether a Content-Length value announces more than `MAX_BODY_BYTES`."""
    digits = (length or "").strip()
    return digits.isdigit() and (len(digits) > 12 or int(digits) > MAX_BODY_BYTES)


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    """The whole request body from ASGI `receive`: 413 past `MAX_BODY_BYTES` (at once
    when announced), 400 when it takes more than `BODY_SECONDS` (a byte now and then
    does not hold a request open)."""
    if announced_too_large(header(scope, "content-length")):
        raise body_too_large()
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_SECONDS):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ApiError("BAD_REQUEST", "The client went away before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise body_too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    raise body_too_slow()


def lean_json(scope: Scope) -> dict[str, Any]:
    """A lean handler's request body as a JSON object (`json_body`'s rules)."""
    return parse_json_object(scope.get(BODY, b""))


def path_param(scope: Scope, name: str) -> str:
    params: dict[str, str] = scope.get("path_params", {})
    return params[name]


def header(scope: Scope, name: str) -> str | None:
    """A request header (the first if repeated), by case-insensitive name."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return str(value.decode("latin-1"))
    return None


def idempotency_key(scope: Mapping[str, Any]) -> idempotency.Key | None:
    """The request's `Idempotency-Key`, scoped to its caller (`lokid.idempotency`): the
    token the gate admitted it with, or `OWNER` for a caller that needs none. None
    without the header; 400 when it is unusable or sent more than once (which of two
    keys a proxy or the client meant is unknowable, and guessing could create twice)."""
    wanted = idempotency.HEADER.lower().encode("latin-1")
    values = [value for key, value in scope.get("headers", ()) if key.lower() == wanted]
    if len(values) > 1:
        raise InvalidQuery(
            f"Send one {idempotency.HEADER} header, not several", field=idempotency.HEADER
        )
    raw = values[0].decode("latin-1") if values else None
    value = idempotency.validate_key(raw)
    if value is None:
        return None
    principal = scope.get(PRINCIPAL)
    token = principal.token if principal is not None else None
    return idempotency.Key(value, token.id if token is not None else idempotency.OWNER)


_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


def _with_headers(send: Send, extra: Iterable[tuple[bytes, bytes]]) -> Send:
    """`send` adding `extra` headers to the response start (the gate's rate-limit and CORS):
    an HTTP answer's, a WebSocket's accept (101), or a refused handshake's."""
    added = list(extra)

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] in _STARTS:
            message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return sending


def error_answer(exc: ApiError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    body = exc.body_bytes()
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    headers = [*JSON_HEADERS, *extra, (b"content-length", str(len(body)).encode())]
    return exc.status, headers, body


async def send_error(
    send: Send, exc: ApiError, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = exc.body_bytes()
    extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                *JSON_HEADERS,
                *extra,
                *headers,
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def json_body() -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413/415 in the seed's shape.

    An empty body counts as `{}` so that `POST /x` without a body works for
    routes whose fields are all optional.
    """
    raw: bytes = await request.get_data(cache=True, as_text=False)  # type: ignore[assignment]
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; empty = `{}`; else a 400 in the seed's shape."""
    if not raw.strip():
        return {}
    try:
        value = loads_bounded(raw.decode("utf-8"), unique_keys=True)
    except UnicodeDecodeError:
        raise ApiError("BAD_REQUEST", "Request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        message = f"Request body is not valid JSON: {json_error_text(exc)}"
        raise ApiError("BAD_REQUEST", message) from None
    except UnusableJson as exc:  # too deep, or a number of thousands of digits
        raise ApiError("BAD_REQUEST", f"Request body is not usable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError("BAD_REQUEST", "Request body must be a JSON object")
    return value


# -- query strings (lean and raw handlers) ------------------------------------------


def query_names(documented: Iterable[Param]) -> tuple[str, ...]:
    """The names of a route's query parameters, as its OpenAPI entry lists them."""
    return tuple(param.name for param in documented if param.location == "query")


def query_params(scope: Mapping[str, object]) -> dict[str, str]:
    """The query string as a dict (a repeated key: the last value wins, on every route:
    Quart views read it through here too). UTF-8, escaped or not; a byte that is not
    UTF-8 becomes U+FFFD."""
    raw = scope.get("query_string", b"")
    assert isinstance(raw, bytes)
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def int_param(
    params: Mapping[str, str], name: str, default: int | None, *, minimum: int, maximum: int
) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise InvalidQuery(f"{name} must be an integer, got {value!r}", field=name) from None
    if not minimum <= number <= maximum:
        raise InvalidQuery(
            f"{name} must be between {minimum} and {maximum}, got {number}", field=name
        )
    return number


def bool_param(params: Mapping[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on", ""):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise InvalidQuery(f"{name} must be true or false, got {value!r}", field=name)
