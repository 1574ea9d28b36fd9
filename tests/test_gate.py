"""The gate over in-memory ASGI: rate limits on the virtual clock, CORS, audit-before-answer.

A real store and audit writer on a temp file; the surface is a small one
built here, so each rule is seen on its own.
"""

from __future__ import annotations

import datetime as dt
import functools
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from lokid.actors.audit_writer import AuditWriter, list_audit
from lokid.actors.store import StoreActor
from lokid.cors import CorsPolicy
from lokid.http.control import control_app
from lokid.http.errors import ApiError
from lokid.http.gate import OPEN, PRINCIPAL, Gate, Principal
from lokid.http.surface import (
    LeanResponse,
    Param,
    Scope,
    Surface,
    json_body,
    json_response,
    query_params,
)
from lokid.ratelimit import RateLimiter, parse_rate_limit
from lokid.timefmt import iso
from lokid.tokens import TokenInfo, create_token, generate_token

from .asgi import Answer, call
from .test_audit import running

ORIGIN = "https://board.example"
TOKEN = generate_token()  # well-formed, so the gate must look it up


def make_surface(gate: Gate) -> Surface:
    surface = Surface("test", "0")
    surface.gate = gate

    @surface.lean("GET", "/health", "probe", responses={200: "ok"}, requires=OPEN)
    async def health(scope: Scope) -> LeanResponse:
        return json_response(200, {"status": "healthy"})

    @surface.lean("GET", "/things", "list", responses={200: "ok"}, requires="read")
    async def things(scope: Scope) -> LeanResponse:
        return json_response(200, {"things": []})

    @surface.route("POST", "/things", "create", responses={201: "ok"}, requires="write")
    async def create() -> tuple[dict[str, Any], int]:
        body = await json_body()
        return {"id": f"thing-{body.get('n', 0)}"}, 201

    @surface.route("DELETE", "/things/{id}", "delete", responses={204: "ok"}, requires="write")
    async def delete(id: str) -> tuple[str, int]:
        return "", 204

    @surface.lean(
        "GET",
        "/scan",
        "a read that may change something",
        responses={200: "ok"},
        params=[Param("register", "query")],
        requires="read",
    )
    async def scan(scope: Scope) -> LeanResponse:  # as GET /api/registry/discover?register
        if "register" not in query_params(scope):
            return json_response(200, {"registered": 0})
        await gate.demand(scope, "write")
        await gate.record(scope, 200, action="registry.discover", details={"registered": 1})
        return json_response(200, {"registered": 1})

    return surface


async def entries(store: StoreActor) -> list[dict[str, Any]]:
    answer = await store.read(lambda db: list_audit(db, limit=1000))
    return list(reversed(answer["entries"]))  # oldest first


@pytest.fixture
async def audited(tmp_path: pathlib.Path) -> AsyncIterator[tuple[StoreActor, AuditWriter]]:
    async with running(tmp_path / "lokid.db") as pair:
        yield pair


# -- audit ---------------------------------------------------------------------------


async def test_a_change_is_recorded_with_its_status_and_created_id_before_the_answer(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    surface = make_surface(Gate(store=store, audit=writer))
    seen_at_answer: list[int] = []
    app = surface

    async def spy(scope: Scope, receive: Any, send: Any) -> None:
        async def watching(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen_at_answer.append(writer.last_id)
            await send(message)

        await app(scope, receive, watching)

    answer = await call(spy, "POST", "/things", body=b'{"n": 7}')
    assert answer.status == 201
    assert seen_at_answer == [1]  # committed before the response started
    [entry] = await entries(store)
    assert entry["action"] == "post /things"  # not in the audit action table: the fallback
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/things", 201)
    assert entry["resource"] == "thing-7"
    assert entry["actor"] == "127.0.0.1" and entry["ip"] == "127.0.0.1"


async def test_reads_are_not_recorded_and_failed_changes_are(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    surface = make_surface(Gate(store=store, audit=writer))
    assert (await call(surface, "GET", "/things")).status == 200
    assert (await call(surface, "POST", "/things", body=b"{not json")).status == 400
    assert (await call(surface, "DELETE", "/things/t-1")).status == 204
    assert [(e["method"], e["status"]) for e in await entries(store)] == [
        ("POST", 400),
        ("DELETE", 204),
    ]


async def test_the_socket_owner_is_recorded_by_uid_under_the_mount(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    surface = make_surface(Gate(store=store, audit=writer))
    app = control_app(make_surface(Gate()), surface)

    async def as_owner(scope: Scope, receive: Any, send: Any) -> None:
        scope["lokid.peer"] = {"pid": 1, "uid": 1234, "gid": 1234}
        await app(scope, receive, send)

    assert (await call(as_owner, "DELETE", "/dashboard/things/t-9")).status == 204
    [entry] = await entries(store)
    assert entry["actor"] == "uid:1234" and entry["ip"] is None
    assert entry["path"] == "/dashboard/things/t-9"
    assert entry["details"] == {"via": "socket"}


async def test_an_audit_log_that_cannot_record_turns_the_answer_into_503(
    tmp_path: pathlib.Path,
) -> None:
    async with running(tmp_path / "lokid.db") as (store, writer):
        surface = make_surface(Gate(store=store, audit=writer))
    # The writer has stopped: nothing can be recorded, so nothing is answered as done.
    with trio.fail_after(30):
        answer = await call(surface, "DELETE", "/things/t-1")
    assert answer.status == 503
    error = answer.json()["error"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith("The request was carried out (status 204)")
    assert "audit log" in error["message"]


async def test_a_failed_request_whose_audit_fails_too_keeps_its_own_reason(
    tmp_path: pathlib.Path,
) -> None:
    async with running(tmp_path / "lokid.db") as (store, writer):
        surface = make_surface(Gate(store=store, audit=writer))
    with trio.fail_after(30):
        answer = await call(surface, "POST", "/things", body=b"[1]")  # not an object: 400/422
    assert answer.status == 503
    message = answer.json()["error"]["message"]
    assert message.startswith("The request failed (status 4")  # not "carried out"
    assert "JSON object" in message and "audit log could not record it" in message


async def test_refusals_are_recorded_with_their_reason(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    made = await store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
    surface = make_surface(Gate(auth_enabled=True, store=store, audit=writer))
    assert (await call(surface, "GET", "/things")).status == 401
    bearer = {"Authorization": f"Bearer {made['token']}"}
    assert (await call(surface, "GET", "/things", headers=bearer)).status == 200
    forbidden = await call(surface, "POST", "/things", headers=bearer)
    assert forbidden.status == 403
    assert forbidden.json()["error"]["details"]["required_scope"] == "write"
    refusals = await entries(store)
    assert [(e["action"], e["status"], e["actor"]) for e in refusals] == [
        ("auth.unauthorized", 401, "127.0.0.1"),
        ("auth.forbidden", 403, made["id"]),
    ]
    assert refusals[0]["details"] == {"reason": "missing", "action": "get /things"}
    assert refusals[1]["details"] == {"required_scope": "write", "action": "post /things"}


async def test_a_refused_socket_peer_is_recorded(audited: tuple[StoreActor, AuditWriter]) -> None:
    store, writer = audited
    gate = Gate(store=store, audit=writer)
    scope: Scope = {"type": "http", "method": "POST", "path": "/api/sessions", "headers": []}
    error = ApiError("FORBIDDEN", "uid 4242 may not use the control socket")
    assert await gate.refuse_stranger(scope, 4242, error) is error
    [entry] = await entries(store)
    assert (entry["actor"], entry["action"], entry["status"]) == (
        "uid:4242",
        "auth.forbidden",
        403,
    )
    assert entry["details"]["reason"] == "peer_uid"


async def test_a_websocket_without_a_token_is_closed_with_1008(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    made = await store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
    gate = Gate(auth_enabled=True, store=store, audit=writer)
    scope: Scope = {
        "type": "websocket",
        "path": "/ws",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 5),
    }
    assert (await gate.admit(scope, "read")).answer is not None
    with_query = {**scope, "query_string": f"token={made['token']}".encode()}
    assert (await gate.admit(with_query, "read")).answer is None
    with_header = {**scope, "headers": [(b"authorization", f"Bearer {made['token']}".encode())]}
    assert (await gate.admit(with_header, "read")).answer is None

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await make_surface(gate)(dict(scope), receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[1]["code"] == 1008
    assert sent[1]["reason"].startswith("UNAUTHORIZED: ")  # what the browser is told
    assert len(sent[1]["reason"].encode()) <= 123
    # Both refusals (the direct `admit` and the handshake) are in the log.
    assert [e["action"] for e in await entries(store)] == ["auth.unauthorized"] * 2


async def test_a_store_that_cannot_be_read_lets_nobody_in(tmp_path: pathlib.Path) -> None:
    store = StoreActor(tmp_path / "never-opened.db")
    surface = make_surface(Gate(auth_enabled=True, store=store))
    answer = await call(surface, "GET", "/things", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 503
    assert answer.json()["error"]["code"] == "UNAVAILABLE"


# -- rate limit (virtual clock) ------------------------------------------------------


def limited_gate(text: str = "3/60") -> Gate:
    return Gate(limiter=RateLimiter(parse_rate_limit(text)), wall_clock=lambda: 1_000_000.0)


async def test_the_limit_counts_down_then_429_with_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    surface = make_surface(limited_gate())
    answers = [await call(surface, "GET", "/things") for _ in range(4)]
    assert [a.status for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit"] == "3" for a in answers)
    refused = answers[-1]
    assert refused.headers["retry-after"] == "20"  # one request back every 60/3 s
    assert refused.json()["error"] == {
        "code": "RATE_LIMITED",
        "message": "Too many requests",
        "details": {},
        "retry_after": 20,
    }
    await trio.sleep(20)
    assert (await call(surface, "GET", "/things")).status == 200
    assert (await call(surface, "GET", "/things")).status == 429


async def test_health_is_never_limited_and_has_no_headers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    surface = make_surface(limited_gate("1/60"))
    for _ in range(5):
        answer = await call(surface, "GET", "/health")
        assert answer.status == 200 and "x-ratelimit-limit" not in answer.headers
    assert (await call(surface, "GET", "/things")).status == 200
    assert (await call(surface, "GET", "/things")).status == 429


async def test_clients_are_limited_apart_and_the_socket_owner_not_at_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    surface = make_surface(limited_gate("1/60"))

    async def from_address(address: str) -> Answer:
        async def app(scope: Scope, receive: Any, send: Any) -> None:
            scope["client"] = (address, 4000)
            await surface(scope, receive, send)

        return await call(app, "GET", "/things")

    assert (await from_address("10.0.0.1")).status == 200
    assert (await from_address("10.0.0.1")).status == 429
    assert (await from_address("10.0.0.2")).status == 200

    async def owner(scope: Scope, receive: Any, send: Any) -> None:
        scope["lokid.peer"] = {"pid": 1, "uid": 0, "gid": 0}
        await surface(scope, receive, send)

    for _ in range(3):
        answer = await call(owner, "GET", "/things")
        assert answer.status == 200 and "x-ratelimit-limit" not in answer.headers


async def test_limits_follow_the_token_not_the_address(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, _ = audited
    made = await store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
    gate = Gate(
        auth_enabled=True,
        store=store,
        limiter=RateLimiter(parse_rate_limit("2/3600")),
    )
    surface = make_surface(gate)
    bearer = {"Authorization": f"Bearer {made['token']}"}
    assert (await call(surface, "GET", "/things", headers=bearer)).status == 200
    assert (await call(surface, "GET", "/things")).status == 401  # the address's own budget
    assert (await call(surface, "GET", "/things", headers=bearer)).status == 200
    assert (await call(surface, "GET", "/things", headers=bearer)).status == 429
    assert (await call(surface, "GET", "/things")).status == 401  # one left for the address
    assert (await call(surface, "GET", "/things")).status == 429


# -- CORS ----------------------------------------------------------------------------


def preflight(origin: str, method: str = "POST", headers: str = "content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_a_preflight_is_answered_before_auth_for_listed_origins_only(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    gate = Gate(
        auth_enabled=True, store=store, audit=writer, cors=CorsPolicy.from_origins([ORIGIN])
    )
    surface = make_surface(gate)
    allowed = await call(surface, "OPTIONS", "/things", headers=preflight(ORIGIN))
    assert allowed.status == 204 and allowed.body == b""
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in allowed.headers
    stranger = await call(surface, "OPTIONS", "/things", headers=preflight("https://evil.example"))
    assert stranger.status == 403
    assert "access-control-allow-origin" not in stranger.headers
    odd_header = preflight(ORIGIN, headers="x-steal-cookies")
    assert (await call(surface, "OPTIONS", "/things", headers=odd_header)).status == 403
    assert await entries(store) == []  # preflights are neither auth failures nor changes


async def test_responses_carry_cors_headers_for_listed_origins_only() -> None:
    surface = make_surface(Gate(cors=CorsPolicy.from_origins([ORIGIN])))
    listed = await call(surface, "GET", "/things", headers={"Origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert listed.headers["vary"] == "Origin"
    other = await call(surface, "GET", "/things", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    assert other.headers["vary"] == "Origin"


async def test_with_cors_off_no_origin_is_echoed_and_preflights_are_refused() -> None:
    surface = make_surface(Gate())
    answer = await call(surface, "GET", "/things", headers={"Origin": ORIGIN})
    assert answer.status == 200 and "access-control-allow-origin" not in answer.headers
    refused = await call(surface, "OPTIONS", "/things", headers=preflight(ORIGIN))
    assert refused.status == 403 and "access-control-allow-origin" not in refused.headers


# -- what a web page could send on its own -------------------------------------------


async def test_with_auth_off_only_loopback_hosts_are_answered(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    surface = make_surface(Gate(store=store, audit=writer, loopback_hosts=True))
    for host in ("localhost:8420", "127.0.0.1:8420", "127.9.9.9", "[::1]:8420", "app.localhost"):
        assert (await call(surface, "GET", "/things", host=host)).status == 200, host
    rebound = await call(surface, "GET", "/things", host="attacker.example:8420")
    assert rebound.status == 403
    assert rebound.json()["error"]["details"]["reason"] == "host"
    probe = await call(surface, "GET", "/health", host="attacker.example")
    assert probe.status == 200  # probes are open
    [entry] = await entries(store)
    assert (entry["action"], entry["details"]["reason"]) == ("auth.forbidden", "host")


async def test_changes_from_a_foreign_origin_are_refused(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    gate = Gate(store=store, audit=writer, cors=CorsPolicy.from_origins([ORIGIN]))
    app = functools.partial(call, make_surface(gate), host="127.0.0.1:57374")
    plain = {"Content-Type": "text/plain"}  # a "simple" request: no preflight in a browser
    foreign = await app(
        "POST", "/things", body=b"{}", headers={**plain, "Origin": "http://evil.example"}
    )
    assert foreign.status == 403
    assert foreign.json()["error"]["details"] == {"reason": "cross_origin"}
    same = await app("POST", "/things", body=b"{}", headers={"Origin": "http://127.0.0.1:57374"})
    assert same.status == 201
    listed = await app("POST", "/things", body=b"{}", headers={"Origin": ORIGIN})
    assert listed.status == 201
    assert (await app("POST", "/things", body=b"{}")).status == 201  # curl, scripts
    cross = await app("DELETE", "/things/t-1", headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    read = await app("GET", "/things", headers={"Origin": "http://evil.example"})
    assert read.status == 200 and "access-control-allow-origin" not in read.headers
    recorded = [(e["action"], e["status"]) for e in await entries(store)]
    assert recorded == [
        ("auth.forbidden", 403),
        ("post /things", 201),
        ("post /things", 201),
        ("post /things", 201),
        ("auth.forbidden", 403),
    ]


async def test_refusals_of_web_pages_are_rate_limited_and_carry_the_headers(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    """A flood of cross-origin changes is limited like any other (each 403 would be a
    committed audit entry), and each 403 names the token and carries every header."""
    store, writer = audited
    made = await store.write(lambda db: create_token(db, {"name": "w", "scopes": ["write"]}))
    gate = Gate(
        auth_enabled=True,
        store=store,
        audit=writer,
        limiter=RateLimiter(parse_rate_limit("2/60")),
        cors=CorsPolicy.from_origins([ORIGIN]),
    )
    bearer = {"Authorization": f"Bearer {made['token']}", "Origin": "http://evil.example"}
    answers = [await call(make_surface(gate), "POST", "/things", headers=bearer) for _ in range(3)]
    assert [a.status for a in answers] == [403, 403, 429]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["1", "0", "0"]
    assert all(a.headers["vary"] == "Origin" for a in answers)
    refusals = await entries(store)
    assert [(e["action"], e["actor"]) for e in refusals] == [("auth.forbidden", made["id"])] * 2


async def test_refusals_of_foreign_hosts_are_rate_limited_and_readable_by_listed_origins(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    gate = Gate(
        store=store,
        audit=writer,
        loopback_hosts=True,
        limiter=RateLimiter(parse_rate_limit("2/60")),
        cors=CorsPolicy.from_origins([ORIGIN]),
    )
    surface = make_surface(gate)
    listed = {"Origin": ORIGIN}
    answers = [
        await call(surface, "POST", "/things", headers=listed, host="evil.example")
        for _ in range(3)
    ]
    assert [a.status for a in answers] == [403, 403, 429]
    assert answers[0].json()["error"]["details"] == {"reason": "host"}
    assert answers[0].headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    assert answers[0].headers["x-ratelimit-limit"] == "2"
    assert len(await entries(store)) == 2
    assert gate.statistics().rate_limited == 1


async def test_a_websocket_from_a_foreign_origin_is_refused() -> None:
    gate = Gate()
    scope: Scope = {
        "type": "websocket",
        "path": "/ws",
        "query_string": b"",
        "headers": [(b"host", b"localhost:57374"), (b"origin", b"http://evil.example")],
        "client": ("127.0.0.1", 5),
    }
    assert (await gate.admit(scope, "read")).answer is not None
    scope["headers"] = [(b"host", b"localhost:57374"), (b"origin", b"http://localhost:57374")]
    assert (await gate.admit(scope, "read")).answer is None


async def test_a_401_names_the_bearer_scheme(audited: tuple[StoreActor, AuditWriter]) -> None:
    store, writer = audited
    surface = make_surface(Gate(auth_enabled=True, store=store, audit=writer))
    missing = await call(surface, "GET", "/things")
    assert missing.headers["www-authenticate"] == 'Bearer realm="lokid"'
    wrong = await call(surface, "GET", "/things", headers={"Authorization": f"Bearer {TOKEN}"})
    assert wrong.headers["www-authenticate"] == 'Bearer realm="lokid", error="invalid_token"'


async def test_several_authorization_headers_are_malformed_whichever_comes_first(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    """Authorization is a singleton: of two, neither is used (which one did a proxy in
    front check?), not the first as a dict of headers would."""
    store, writer = audited
    made = await store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
    gate = Gate(auth_enabled=True, store=store, audit=writer)
    valid, other = f"Bearer {made['token']}".encode(), f"Bearer {TOKEN}".encode()
    for first, second in [(valid, other), (other, valid), (valid, valid)]:
        scope: Scope = {
            "type": "http",
            "method": "GET",
            "path": "/things",
            "query_string": b"",
            "headers": [(b"host", b"test"), (b"authorization", first), (b"Authorization", second)],
            "client": ("127.0.0.1", 5),
        }
        admission = await gate.admit(scope, "read")
        assert admission.answer is not None and admission.answer[0] == 401
        body = admission.answer[2]
        assert b'"reason":"malformed"' in body and b"one Authorization header" in body
    scope["headers"] = [(b"host", b"test"), (b"authorization", valid)]
    assert (await gate.admit(scope, "read")).answer is None


async def test_demand_and_record_for_a_read_that_changes_something(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    gate = Gate(auth_enabled=True, store=store, audit=writer)
    reader = await store.write(lambda db: create_token(db, {"name": "r", "scopes": ["read"]}))
    editor = await store.write(lambda db: create_token(db, {"name": "w", "scopes": ["write"]}))

    async def admitted(token: str) -> Scope:
        scope: Scope = {
            "type": "http",
            "method": "GET",
            "path": "/api/registry/discover",
            "query_string": b"register=true",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 5),
        }
        admission = await gate.admit(scope, "read")
        assert admission.answer is None
        scope[PRINCIPAL] = admission.principal
        return scope

    with pytest.raises(ApiError) as refused:
        await gate.demand(await admitted(reader["token"]), "write")
    assert refused.value.status == 403 and refused.value.details == {"required_scope": "write"}
    scope = await admitted(editor["token"])
    await gate.demand(scope, "write")
    await gate.record(scope, 200, action="registry.discover", details={"registered": 2})
    recorded = [(e["actor"], e["action"], e["status"], e["details"]) for e in await entries(store)]
    assert recorded == [
        (
            reader["id"],
            "auth.forbidden",
            403,
            {"required_scope": "write", "action": "get /api/registry/discover"},
        ),
        (editor["id"], "registry.discover", 200, {"registered": 2}),
    ]


CROSS_SITE = [
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},  # what a browser sends for an <img> GET
    {"Origin": "http://evil.example"},
]


@pytest.mark.parametrize("auth", [False, True])
async def test_a_read_that_changes_something_is_refused_to_a_web_page_like_a_post(
    audited: tuple[StoreActor, AuditWriter], auth: bool
) -> None:
    store, writer = audited
    gate = Gate(auth_enabled=auth, store=store, audit=writer, loopback_hosts=not auth)
    editor = await store.write(lambda db: create_token(db, {"name": "w", "scopes": ["write"]}))
    token = {"Authorization": f"Bearer {editor['token']}"} if auth else {}
    app = functools.partial(call, make_surface(gate), host="127.0.0.1:57374")
    for page in CROSS_SITE:
        refused = await app("GET", "/scan?register=true", headers={**token, **page})
        assert refused.status == 403, page
        assert refused.json()["error"]["details"] == {"reason": "cross_origin"}
        read = await app("GET", "/scan", headers={**token, **page})  # reading is no change
        assert (read.status, read.json()) == (200, {"registered": 0})
    own_page = {"Origin": "http://127.0.0.1:57374", "Sec-Fetch-Site": "same-origin"}
    for allowed in (own_page, {}):  # the dashboard's page; curl, scripts
        answer = await app("GET", "/scan?register=true", headers={**token, **allowed})
        assert (answer.status, answer.json()) == (200, {"registered": 1})
    actor = editor["id"] if auth else "127.0.0.1"
    recorded = [(e["actor"], e["action"], e["details"]) for e in await entries(store)]
    forbidden = {"action": "get /scan", "reason": "cross_origin"}
    assert recorded == [
        *[(actor, "auth.forbidden", forbidden)] * len(CROSS_SITE),
        *[(actor, "registry.discover", {"registered": 1})] * 2,
    ]


async def test_a_read_that_changes_something_names_its_caller_like_any_change(
    audited: tuple[StoreActor, AuditWriter],
) -> None:
    store, writer = audited
    gate = Gate(store=store, audit=writer)  # auth, limit and CORS off: reads pass unlooked at
    surface = make_surface(gate)
    app = control_app(make_surface(Gate()), surface)

    async def as_owner(scope: Scope, receive: Any, send: Any) -> None:
        scope["lokid.peer"] = {"pid": 1, "uid": 1234, "gid": 1234}
        await app(scope, receive, send)

    assert (await call(surface, "GET", "/scan?register=true")).status == 200
    assert (await call(surface, "POST", "/things", body=b"{}")).status == 201
    assert (await call(as_owner, "GET", "/dashboard/scan?register=true")).status == 200
    assert (await call(as_owner, "DELETE", "/dashboard/things/t-1")).status == 204
    recorded = [(e["action"], e["actor"], e["ip"]) for e in await entries(store)]
    assert recorded == [
        ("registry.discover", "127.0.0.1", "127.0.0.1"),
        ("post /things", "127.0.0.1", "127.0.0.1"),
        ("registry.discover", "uid:1234", None),
        ("delete /things/t-1", "uid:1234", None),
    ]


# -- streams opened with a token (virtual clock) -----------------------------------


async def test_open_streams_end_when_their_token_is_revoked_or_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    gate = Gate(utc_clock=lambda: now)
    lasting = TokenInfo("tok-a", "a", frozenset({"read"}))
    expiring = TokenInfo("tok-b", "b", frozenset({"read"}), iso(now + dt.timedelta(minutes=1)))

    def opened_with(token: TokenInfo) -> Scope:
        return {PRINCIPAL: Principal(token.id, "127.0.0.1", token=token)}

    with (
        gate.stream(opened_with(lasting)) as first,
        gate.stream(opened_with(lasting)) as second,
        gate.stream(opened_with(expiring)) as third,
        gate.stream({PRINCIPAL: Principal("127.0.0.1", "127.0.0.1", owner=True)}) as owners,
    ):
        assert gate.token_streams == 3  # the owner's has no token to revoke
        with trio.fail_after(120):
            assert await third.wait() == "Token expired"
        assert trio.current_time() == pytest.approx(60)  # at expires_at, not before
        assert gate.token_revoked("tok-a") == 2
        with trio.fail_after(1):
            assert [await first.wait(), await second.wait()] == ["Token revoked"] * 2
        assert gate.token_revoked("tok-a") == 0
        with trio.move_on_after(10 * 365 * 86400) as forever:
            await owners.wait()
        assert forever.cancelled_caught
    assert gate.token_streams == 0  # nothing kept once closed
