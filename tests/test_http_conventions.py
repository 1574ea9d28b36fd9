"""Every error of every route is the seed's error body (DESIGN.md §4), on both paths."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio

from lokid.errors import Unavailable, ValidationFailed
from lokid.http.control import control_app
from lokid.http.convert import dumps
from lokid.http.gate import Gate
from lokid.http.surface import (
    MAX_BODY_BYTES,
    LeanResponse,
    Scope,
    Surface,
    json_body,
    json_response,
)

from .asgi import Answer, call


def make_surface() -> Surface:
    surface = Surface("Test API", "0")

    @surface.lean("GET", "/fast", "lean route", responses={200: "ok"}, requires="read")
    async def fast(scope: Scope) -> LeanResponse:
        return json_response(200, {"fast": True})

    @surface.lean(
        "GET", "/fast/broken", "lean route that crashes", responses={200: "ok"}, requires="read"
    )
    async def fast_broken(scope: Scope) -> LeanResponse:
        raise RuntimeError("secret internals")

    @surface.route(
        "POST", "/things", "create a thing", responses={201: "created"}, requires="write"
    )
    async def create() -> tuple[dict[str, Any], int]:
        body = await json_body()
        if "name" not in body:
            raise ValidationFailed("name is required", field="name")
        return {"name": body["name"]}, 201

    @surface.route("GET", "/things/{thing_id}", "one thing", responses={200: "ok"}, requires="read")
    async def get_thing(thing_id: str) -> dict[str, Any]:
        if thing_id == "boom":
            raise RuntimeError("Traceback secret")
        if thing_id == "busy":
            raise Unavailable("store is down")
        return {"id": thing_id}

    return surface


def assert_error(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["details"], dict)
    error: dict[str, Any] = body["error"]
    return error


async def test_lean_and_quart_routes_answer() -> None:
    surface = make_surface()
    assert (await call(surface, "GET", "/fast")).json() == {"fast": True}
    created = await call(surface, "POST", "/things", body=b'{"name": "x"}')
    assert (created.status, created.json()) == (201, {"name": "x"})
    assert (await call(surface, "GET", "/things/7")).json() == {"id": "7"}


async def test_unknown_route_is_404() -> None:
    error = assert_error(await call(make_surface(), "GET", "/nope"), 404, "NOT_FOUND")
    assert error["message"] == "No route for GET /nope"


async def test_errors_name_the_path_as_sent_under_a_mount() -> None:
    """On the control socket the Dashboard API is mounted at /dashboard: a message that
    named the path without it pointed at the API's routes instead."""
    mounted = control_app(make_surface(), make_surface())
    cases = [
        ("GET", "/dashboard/nope", 404, "No route for GET /dashboard/nope"),
        ("POST", "/dashboard/fast", 405, "POST is not allowed on /dashboard/fast; allowed"),
        ("DELETE", "/dashboard/things", 405, "DELETE is not allowed on /dashboard/things;"),
        ("GET", "/nope", 404, "No route for GET /nope"),
    ]
    for method, path, status, message in cases:
        error = assert_error(await call(mounted, method, path), status, error_code(status))
        assert error["message"].startswith(message), (path, error["message"])


def error_code(status: int) -> str:
    return {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}[status]


async def test_trailing_slash_is_not_a_redirect() -> None:
    assert_error(await call(make_surface(), "GET", "/things/7/"), 404, "NOT_FOUND")


async def test_wrong_method_on_quart_route_is_405_with_allow() -> None:
    answer = await call(make_surface(), "DELETE", "/things")
    error = assert_error(answer, 405, "METHOD_NOT_ALLOWED")
    assert "POST" in error["details"]["allowed"]
    assert "POST" in answer.headers["allow"]


async def test_wrong_method_on_lean_route_is_405_with_allow() -> None:
    answer = await call(make_surface(), "POST", "/fast")
    error = assert_error(answer, 405, "METHOD_NOT_ALLOWED")
    assert error["details"]["allowed"] == ["GET", "HEAD"]
    assert answer.headers["allow"] == "GET, HEAD"


async def test_head_on_lean_route_has_no_body() -> None:
    answer = await call(make_surface(), "HEAD", "/fast")
    assert answer.status == 200
    assert answer.body == b""
    assert answer.headers["content-length"] == str(len(b'{"fast":true}'))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "Request body is not valid JSON: Expecting property name"),
        (b"[1, 2]", "Request body must be a JSON object"),
        (b'"text"', "Request body must be a JSON object"),
        (b"\xff\xfe", "Request body is not UTF-8 text"),
        (
            b'{"name": "a\x01b"}',
            "Request body is not valid JSON: Invalid control character at line",
        ),
        # parsed by json, but past what lokid takes: a 400, not a RecursionError's 500
        (b"[" * 100000 + b"]" * 100000, "Request body is not usable JSON: nested more than 100"),
        (b'{"a":' * 990 + b"1" + b"}" * 990, "Request body is not usable JSON: nested more than"),
        (b'{"n": ' + b"9" * 5000 + b"}", "Request body is not usable JSON: an integer has more"),
        # ambiguous: a proxy or a log may read the first, `json.loads` keeps the last
        (
            b'{"name": "a", "name": "b"}',
            'Request body is not usable JSON: the key "name" appears twice in one object',
        ),
    ],
)
async def test_malformed_json_is_400(body: bytes, message: str) -> None:
    answer = await call(make_surface(), "POST", "/things", body=body)
    error = assert_error(answer, 400, "BAD_REQUEST")
    assert error["message"].startswith(message)


async def test_empty_body_counts_as_empty_object() -> None:
    error = assert_error(await call(make_surface(), "POST", "/things"), 422, "VALIDATION_ERROR")
    assert error["details"] == {"field": "name"}


@pytest.mark.parametrize("declared", [True, False])
async def test_oversized_body_is_413(declared: bool) -> None:
    body = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
    # declared: content-length announces the size; else the body arrives chunked, unannounced.
    headers = {} if declared else {"transfer-encoding": "chunked"}
    answer = await call(
        make_surface(), "POST", "/things", body=body, headers=headers, send_length=declared
    )
    error = assert_error(answer, 413, "PAYLOAD_TOO_LARGE")
    assert error["details"]["limit"] == MAX_BODY_BYTES


@pytest.mark.parametrize("path", ["/things/boom", "/fast/broken"])
async def test_crash_is_500_without_internals(path: str) -> None:
    answer = await call(make_surface(), "GET", path)
    error = assert_error(answer, 500, "INTERNAL_ERROR")
    assert "secret" not in answer.body.decode()
    assert "Traceback" not in answer.body.decode()
    assert error["message"] == "internal error; see the daemon log"


async def test_unavailable_is_503() -> None:
    error = assert_error(await call(make_surface(), "GET", "/things/busy"), 503, "UNAVAILABLE")
    assert error["message"] == "store is down"


async def handshake(surface: Surface, path: str) -> Answer:
    """A WebSocket handshake to `path`, refused as HTTP (the `websocket.http.response`
    extension, as Hypercorn offers it): the answer."""
    path, _, query = path.partition("?")
    scope: Scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 57374),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
    }
    sent: list[dict[str, Any]] = []
    events = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop()
        await trio.sleep_forever()  # the client waits for the answer
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with trio.fail_after(5):
        await surface(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "websocket.http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "websocket.http.response.body")
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body)


def with_websocket(surface: Surface) -> Surface:
    @surface.websocket("/live", "a WebSocket that crashes before accept", requires="read")
    async def live() -> None:
        raise RuntimeError("secret internals")

    return surface


async def test_a_handshake_with_a_query_parameter_it_does_not_declare_is_refused() -> None:
    """As on every route (it was accepted on `/ws`); `token` is the one a WebSocket takes."""
    surface = with_websocket(make_surface())
    error = assert_error(await handshake(surface, "/live?token=t&foo=1"), 400, "BAD_REQUEST")
    assert error["details"] == {"field": "foo"}
    assert error["message"] == "'foo' is not a query parameter of this route (it takes token)"
    # `?token=` alone passes the check: the view runs (and this one crashes)
    assert (await handshake(surface, "/live?token=t")).status == 500


@pytest.mark.parametrize(
    ("path", "status", "code", "message"),
    [
        ("/nope", 404, "NOT_FOUND", "No WebSocket route for /nope (WebSockets here: /live)"),
        (
            "/fast",
            400,
            "BAD_REQUEST",
            "/fast is not a WebSocket: send it a plain HTTP request (WebSockets here: /live)",
        ),
        ("/things/7", 400, "BAD_REQUEST", "/things/7 is not a WebSocket"),
    ],
)
async def test_a_websocket_handshake_to_a_path_without_one_is_refused_clearly(
    path: str, status: int, code: str, message: str
) -> None:
    error = assert_error(await handshake(with_websocket(make_surface()), path), status, code)
    assert error["message"].startswith(message)
    plain = assert_error(await handshake(make_surface(), "/nope"), 404, "NOT_FOUND")
    assert plain["message"] == "No WebSocket route for /nope (no WebSocket is served here)"


async def test_a_websocket_view_that_crashes_is_500_without_internals() -> None:
    answer = await handshake(with_websocket(make_surface()), "/live")
    error = assert_error(answer, 500, "INTERNAL_ERROR")
    assert error["message"] == "internal error; see the daemon log"
    assert "secret" not in answer.body.decode()


def documented(surface: Surface) -> set[tuple[str, str]]:
    doc = surface.openapi()
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def implemented(surface: Surface) -> set[tuple[str, str]]:
    """Every (method, path) the app really answers: its dispatch tables."""
    return surface.dispatched()


def test_openapi_documents_exactly_the_implemented_routes() -> None:
    surface = make_surface()
    assert implemented(surface) == documented(surface)
    # A route added behind the table's back is caught:
    surface.quart.add_url_rule("/sneaky", "sneaky", lambda: "x", methods=["GET"])
    assert ("GET", "/sneaky") in implemented(surface) - documented(surface)


async def test_openapi_json_is_served_and_valid_shape() -> None:
    answer = await call(make_surface(), "GET", "/openapi.json")
    doc = answer.json()
    assert doc["openapi"] == "3.1.0"
    thing = doc["paths"]["/things/{thing_id}"]["get"]
    assert thing["parameters"] == [
        {"name": "thing_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    assert thing["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/fast", "/fast"),
        ("/things", "/things"),
        ("/things/t-1", "/things/{thing_id}"),
        ("/things/t-1/more", None),
        ("/things/", None),
        ("/nowhere", None),
    ],
)
def test_route_path_names_the_declared_route_of_a_path(path: str, route: str | None) -> None:
    assert make_surface().route_path(path) == route


def test_route_declared_twice_is_refused() -> None:
    surface = make_surface()
    with pytest.raises(ValueError, match="declared twice"):
        surface.lean("GET", "/fast", "again", responses={200: "ok"}, requires="read")(
            make_surface()._lean[("GET", "/fast")]
        )


class FakeDaemon:
    def core_problems(self) -> dict[str, str]:
        return {}

    def readiness_problems(self) -> dict[str, str]:
        return {"daemon": "starting"}

    def uptime_seconds(self) -> float:
        return 1.0

    async def status(self) -> dict[str, Any]:
        return {"status": "idle"}


@pytest.mark.parametrize("which", ["api", "dashboard"])
def test_daemon_surfaces_document_every_route(which: str) -> None:
    surface = daemon_surface(which)
    assert implemented(surface) == documented(surface)
    assert ("GET", "/health") in documented(surface)


def daemon_surface(which: str) -> Surface:
    from lokid.actors.store import StoreActor
    from lokid.http.api import create_api_surface
    from lokid.http.dashboard import create_dashboard_surface

    if which == "api":
        return create_api_surface(FakeDaemon(), StoreActor(Path("unused.db")))
    return create_dashboard_surface(FakeDaemon())


@pytest.mark.parametrize("which", ["api", "dashboard"])
async def test_every_route_refuses_a_query_parameter_it_does_not_declare(
    which: str, tmp_path: Path
) -> None:
    """Generated from the route table: a new route cannot silently ignore a typo'd filter.

    The refusal comes before the handler (none of these would work against `FakeDaemon`).
    Open routes (probes, the web page's files) take any query.
    """
    from lokid.config import Config
    from lokid.daemon import Daemon

    daemon = Daemon(Config(loki_home=tmp_path))  # built, not started: its full route tables
    surface = daemon.api if which == "api" else daemon.dashboard
    surface.gate = Gate()  # open, no audit writer (the daemon is not running)
    checked = 0
    for route in surface.routes:
        if route.path in surface._websocket_paths:
            continue
        path = re.sub(r"{\w+}", "x-1", route.path)
        declared = {p.name for p in route.params if p.location == "query"}
        query = "&".join(f"{name}=" for name in sorted(declared)[:1]) + "&zz_typo=1"
        answer = await call(surface, route.method, f"{path}?{query.lstrip('&')}")
        if route.requires == "open":
            assert answer.status != 400 or "zz_typo" not in answer.body.decode(), route
            continue
        error = assert_error(answer, 400, "BAD_REQUEST")
        assert error["details"] == {"field": "zz_typo"}, (route, error)
        assert error["message"].startswith("'zz_typo' is not a query parameter of this route")
        checked += 1
    assert checked >= 10


async def test_not_ready_is_503_with_the_reason() -> None:
    from lokid.http.api import create_api_surface

    answer = await call(create_api_surface(FakeDaemon()), "GET", "/health/ready")
    assert answer.status == 503
    assert answer.json() == {"ready": False, "details": {"daemon": "starting"}}


async def test_a_quart_route_the_gate_did_not_judge_is_a_404_not_served() -> None:
    """The safety net under the gate: should the gate ever read a path differently from
    Quart's router (as with `//api/x` before), the route's own view must not run."""
    surface = make_surface()
    ran: list[str] = []

    @surface.route(
        "DELETE", "/things/{thing_id}", "admin only", responses={200: "ok"}, requires="admin"
    )
    async def delete_thing(thing_id: str) -> dict[str, Any]:
        ran.append(thing_id)
        return {}

    misjudged = surface.requirement
    surface.requirement = lambda method, path: "authenticated"  # type: ignore[method-assign]
    error = assert_error(await call(surface, "DELETE", "/things/7"), 404, "NOT_FOUND")
    assert error["message"] == "No route for DELETE /things/7" and ran == []
    surface.requirement = misjudged  # type: ignore[method-assign]
    assert (await call(surface, "DELETE", "/things/7")).status == 200 and ran == ["7"]


@pytest.mark.parametrize("which", ["api", "dashboard"])
def test_every_quart_view_has_the_requirement_of_its_route(which: str, tmp_path: Path) -> None:
    """A view registered on Quart without one would always be a 404 (the safety net)."""
    from lokid.config import Config
    from lokid.daemon import Daemon

    daemon = Daemon(Config(loki_home=tmp_path))
    surface = daemon.api if which == "api" else daemon.dashboard
    endpoints = {r.endpoint for r in surface.quart.url_map.iter_rules() if r.endpoint != "static"}
    assert endpoints <= set(surface._endpoint_requires)
    assert endpoints or which == "api"  # the API's routes are all lean


async def test_merged_slashes_are_not_the_route() -> None:
    answer = await call(make_surface(), "GET", "//things/7")
    assert assert_error(answer, 404, "NOT_FOUND")["message"] == "No route for GET //things/7"


@pytest.mark.parametrize(
    ("path", "allowed"), [("/things", ["POST"]), ("/fast", ["GET", "HEAD"]), ("/things/1", None)]
)
async def test_options_is_405_on_quart_and_lean_routes_alike(
    path: str, allowed: list[str] | None
) -> None:
    """Not Quart's automatic empty text/html 200 (a CORS preflight is the gate's)."""
    answer = await call(make_surface(), "OPTIONS", path)
    error = assert_error(answer, 405, "METHOD_NOT_ALLOWED")
    if allowed is not None:
        assert error["details"]["allowed"] == allowed
    assert answer.headers["allow"] == ", ".join(error["details"]["allowed"])


@pytest.mark.parametrize(("method", "path"), [("GET", "/nothing"), ("GET", "/things")])
async def test_quart_errors_are_not_stored_by_caches(method: str, path: str) -> None:
    answer = await call(make_surface(), method, path)
    assert answer.status in (404, 405)
    assert answer.headers["cache-control"] == "no-store"


def test_a_lone_surrogate_that_reaches_an_answer_is_sent_as_u_fffd() -> None:
    """The last net under the checks where names are read: valid UTF-8, never a 500."""
    assert dumps({"path": "/tmp/bad\udcffname", "ok": "é"}) == (
        '{"path":"/tmp/bad\ufffdname","ok":"é"}'.encode()
    )
