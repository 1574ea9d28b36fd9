"""Enterprise routes and the task lists over in-memory ASGI: a `Surface` with a real store,
audit writer and gate (no sockets, no daemon). Query parameters are checked against the
route's own documented list (never another route's), bad values answer the seed's error
body naming the parameter with a precise message."""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio

from lokid.actors.audit_writer import AuditWriter
from lokid.actors.store import StoreActor
from lokid.http.enterprise import install_enterprise
from lokid.http.gate import Gate
from lokid.http.sessions import install_session_reads, install_task_reads
from lokid.http.surface import Surface

from .asgi import Answer, call
from .child_status import StubChildStatus


@attrs.frozen
class Rig:
    surface: Surface
    store: StoreActor
    audit: AuditWriter

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await call(self.surface, "GET", path, **kwargs)

    async def post(self, path: str, body: Any, **kwargs: Any) -> Answer:
        return await call(self.surface, "POST", path, body=json.dumps(body).encode(), **kwargs)


@contextlib.asynccontextmanager
async def rig(tmp_path: pathlib.Path) -> AsyncIterator[Rig]:
    """Store and audit writer running; the enterprise, session and task read routes."""
    store = StoreActor(tmp_path / "lokid.db")
    audit = AuditWriter(store)
    statuses = [StubChildStatus() for _ in range(2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for actor, status in zip((store, audit), statuses, strict=True):
                nursery.start_soon(functools.partial(actor.run, task_status=status))
                await status.started_event.wait()
            surface = Surface("test", "0")
            gate = Gate(auth_enabled=False, store=store, audit=audit)
            surface.gate = gate
            install_enterprise(surface, store, audit, gate, rate_limit=False)
            install_session_reads(surface, store)
            install_task_reads(surface, store)
            yield Rig(surface, store, audit)
            for status in reversed(statuses):
                status.shutdown_requested.set()


def error_of(answer: Answer, status: int, code: str) -> dict[str, Any]:
    assert answer.status == status, answer.body
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"code", "message", "details"}
    assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


# -- each route's own query parameters ---------------------------------------------------------

SESSION_WORDS = ("starting", "running", "paused")


@pytest.mark.parametrize(
    "query",
    [
        "/api/enterprise/tokens?status=revoked",
        "/api/enterprise/tokens?status=running",
        "/api/tasks/queue?status=pending",
        "/api/tasks/active?status=completed",
        "/api/tasks/active?status=",
    ],
)
async def test_a_status_on_a_list_without_that_filter_is_400_naming_it(
    tmp_path: pathlib.Path, query: str
) -> None:
    """Neither checked against the session statuses nor accepted and ignored."""
    async with rig(tmp_path) as r:
        error = error_of(await r.get(query), 400, "BAD_REQUEST")
        assert error["details"]["field"] == "status"
        assert "not a query parameter" in error["message"], error
        assert "limit, offset" in error["message"]
        assert not any(word in error["message"] for word in SESSION_WORDS), error


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("/api/enterprise/tokens?sort=name", "sort"),
        ("/api/enterprise/audit?actor=tok-1", "actor"),
        ("/api/tasks?session=s-1", "session"),
        ("/api/tasks/queue?project_id=x", "project_id"),
        ("/api/sessions?provider=claude", "provider"),
        ("/api/sessions/s-1/tasks?column=done", "column"),
        ("/api/tasks?status=running", "status"),  # a session word on a task list
    ],
)
async def test_a_parameter_a_route_does_not_document_is_400(
    tmp_path: pathlib.Path, query: str, field: str
) -> None:
    async with rig(tmp_path) as r:
        error = error_of(await r.get(query), 400, "BAD_REQUEST")
        assert error["details"]["field"] == field


async def test_the_documented_parameters_are_taken(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        for query in (
            "/api/enterprise/tokens?limit=5&offset=0",
            "/api/enterprise/audit?start=2020-01-01&end=2030-01-01&action=token.*&limit=5&offset=0",
            "/api/tasks?status=pending&limit=5&offset=0",
            "/api/tasks/active?limit=5&offset=0",
            "/api/tasks/queue?limit=5&offset=0",
            "/api/sessions?status=running&limit=5&offset=0",
        ):
            answer = await r.get(query)
            assert answer.status == 200, (query, answer.body)


@pytest.mark.parametrize(
    "route", ["/api/enterprise/audit", "/api/enterprise/tokens", "/api/tasks", "/api/sessions"]
)
async def test_a_repeated_query_key_takes_its_last_value_on_every_route(
    tmp_path: pathlib.Path, route: str
) -> None:
    """Quart views as lean routes (docs/http.md): `?limit=abc&limit=2` is limit 2, and
    `?limit=2&limit=abc` names the bad last value."""
    async with rig(tmp_path) as r:
        answer = await r.get(f"{route}?limit=abc&limit=2")
        assert answer.status == 200, answer.body
        assert answer.json()["limit"] == 2
        error = error_of(await r.get(f"{route}?limit=2&limit=abc"), 400, "BAD_REQUEST")
        assert error["details"]["field"] == "limit"


@pytest.mark.parametrize(
    "route", ["/api/enterprise/audit", "/api/enterprise/tokens", "/api/tasks", "/api/sessions"]
)
async def test_a_query_value_in_raw_utf8_is_echoed_as_sent(
    tmp_path: pathlib.Path, route: str
) -> None:
    async with rig(tmp_path) as r:
        answer = await r.get(f"{route}?limit=caf\u00e9")  # raw UTF-8 bytes, not escaped
        error = error_of(answer, 400, "BAD_REQUEST")
        assert "'caf\u00e9'" in error["message"], error


# -- precise messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route", ["/api/enterprise/audit", "/api/enterprise/tokens", "/api/tasks", "/api/sessions"]
)
async def test_a_huge_offset_is_told_the_bound(tmp_path: pathlib.Path, route: str) -> None:
    async with rig(tmp_path) as r:
        error = error_of(
            await r.get(f"{route}?offset=100000000000000000000000"), 400, "BAD_REQUEST"
        )
        assert error["details"]["field"] == "offset"
        assert error["message"].startswith("offset must be between 0 and "), error
        assert "integer" not in error["message"] and "1000000000000" not in error["message"]


async def test_an_end_on_the_last_day_there_is_lists_everything(tmp_path: pathlib.Path) -> None:
    async with rig(tmp_path) as r:
        made = await r.post("/api/enterprise/tokens", {"name": "ci", "scopes": ["read"]})
        assert made.status == 201, made.body  # audited: one entry
        everything = await r.get("/api/enterprise/audit?end=9999-12-31")
        assert everything.status == 200, everything.body
        assert everything.json()["total"] == 1
        never = await r.get("/api/enterprise/audit?end=0001-01-01T00:30%2B01:00")
        error = error_of(never, 400, "BAD_REQUEST")
        assert error["details"]["field"] == "end" and "9999-12-31 UTC" in error["message"]


# -- Idempotency-Key on token creation --------------------------------------------------------


async def stored_tokens(store: StoreActor) -> list[tuple[str, str]]:
    rows = await store.read(
        lambda db: db.execute("SELECT id, token_sha256 FROM api_tokens ORDER BY id").fetchall()
    )
    return [(row[0], row[1]) for row in rows]


async def test_a_token_create_with_a_key_happens_once_and_its_secret_is_shown_once(
    tmp_path: pathlib.Path,
) -> None:
    body = {"name": "ci-bot", "scopes": ["read", "write"], "expires_days": 30}
    key = {"Idempotency-Key": "tok-once-1"}
    async with rig(tmp_path) as r:
        first = await r.post("/api/enterprise/tokens", body, headers=key)
        assert first.status == 201, first.body
        made = first.json()
        assert made["token"].startswith("loki_") and "message" not in made

        again = await r.post("/api/enterprise/tokens", dict(reversed(body.items())), headers=key)
        assert again.status == 201, again.body
        replay = again.json()
        assert replay == {**made, "token": None, "message": replay["message"]}
        assert "secret" in replay["message"] and "revoke" in replay["message"]
        assert [token_id for token_id, _ in await stored_tokens(r.store)] == [made["id"]]

        other = await r.post("/api/enterprise/tokens", {**body, "name": "other"}, headers=key)
        error = error_of(other, 409, "CONFLICT")
        assert error["details"]["idempotencyKey"] == "tok-once-1"
        assert len(await stored_tokens(r.store)) == 1

        remembered = await r.store.read(
            lambda db: db.execute("SELECT response FROM idempotency_keys").fetchall()
        )
        assert made["token"] not in json.dumps(remembered)  # the secret is never stored


async def test_a_refused_token_body_stores_no_key_and_a_bad_key_is_400(
    tmp_path: pathlib.Path,
) -> None:
    key = {"Idempotency-Key": "tok-once-2"}
    async with rig(tmp_path) as r:
        bad = await r.post("/api/enterprise/tokens", {"name": "x", "scopes": []}, headers=key)
        assert error_of(bad, 422, "VALIDATION_ERROR")["details"]["field"] == "scopes"
        fixed = await r.post(
            "/api/enterprise/tokens", {"name": "x", "scopes": ["read"]}, headers=key
        )
        assert fixed.status == 201 and fixed.json()["token"]  # the key was still free
        blank = await r.post(
            "/api/enterprise/tokens", {"name": "y", "scopes": ["read"]},
            headers={"Idempotency-Key": " "},
        )  # fmt: skip
        assert error_of(blank, 400, "BAD_REQUEST")["details"]["field"] == "Idempotency-Key"
        without = [await r.post("/api/enterprise/tokens", {"name": "z", "scopes": ["read"]})
                   for _ in range(2)]  # fmt: skip
        assert [a.status for a in without] == [201, 201]
        assert len(await stored_tokens(r.store)) == 3
