"""`Idempotency-Key`s are scoped by route and by caller (`lokid.idempotency`).

The store functions on an in-memory database at the latest schema, the
migration that added the caller, and how a request's key is read
(`lokid.http.surface.idempotency_key`). End to end, on a daemon with auth
on: `tests/test_security_e2e.py`.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import sqlite_utils

from lokid import idempotency
from lokid.errors import Conflict, InvalidQuery
from lokid.http.gate import PRINCIPAL, Principal
from lokid.http.surface import idempotency_key
from lokid.migrations import MIGRATIONS, migrate
from lokid.tokens import TokenInfo

ROUTE = "POST /api/projects"
NOW = 1_800_000_000.0


def database(migrations: tuple[Any, ...] = MIGRATIONS) -> sqlite_utils.Database:
    db = sqlite_utils.Database(sqlite3.connect(":memory:", isolation_level=None))
    migrate(db, migrations)
    return db


def remember(db: sqlite_utils.Database, key: idempotency.Key, body: Any, answer: Any) -> None:
    digest = idempotency.body_digest(body)
    idempotency.remember(db, ROUTE, key, digest, 201, answer, now=NOW)


def lookup(db: sqlite_utils.Database, key: idempotency.Key, body: Any) -> Any:
    found = idempotency.lookup(db, ROUTE, key, idempotency.body_digest(body), now=NOW + 1)
    return None if found is None else found.body


def test_the_same_key_of_another_caller_is_another_request() -> None:
    db = database()
    body = {"name": "p"}
    alice = idempotency.Key("k-1", caller="tok-alice")
    remember(db, alice, body, {"id": "proj-1"})
    assert lookup(db, alice, body) == {"id": "proj-1"}
    # Bob's key is his own: no answer of Alice's, and no 409 telling him of her key.
    assert lookup(db, idempotency.Key("k-1", caller="tok-bob"), body) is None
    assert lookup(db, idempotency.Key("k-1", caller="tok-bob"), {"name": "other"}) is None
    assert lookup(db, idempotency.Key("k-1"), body) is None  # the owner is a caller too
    remember(db, idempotency.Key("k-1", caller="tok-bob"), body, {"id": "proj-2"})
    assert lookup(db, idempotency.Key("k-1", caller="tok-bob"), body) == {"id": "proj-2"}
    assert lookup(db, alice, body) == {"id": "proj-1"}


def test_a_callers_own_key_with_another_body_is_a_conflict_naming_the_key() -> None:
    db = database()
    key = idempotency.Key("k-2", caller="tok-alice")
    remember(db, key, {"name": "p"}, {"id": "proj-1"})
    with pytest.raises(Conflict) as raised:
        lookup(db, key, {"name": "q"})
    assert raised.value.details == {"idempotencyKey": "k-2"}
    assert "'k-2'" in raised.value.message and "tok-alice" not in raised.value.message


def test_keys_remembered_before_the_caller_column_belong_to_the_owner() -> None:
    """Migration 11 keeps the rows written before it, in the owner's scope: a retry
    across the upgrade by a caller without a token still gets its first answer."""
    before = [m for m in MIGRATIONS if m.version < 11]
    db = database(tuple(before))
    db.execute(
        "INSERT INTO idempotency_keys (route, key, body_sha256, status, response, created_at)"
        " VALUES (?, 'old', ?, 201, '{\"id\": \"proj-0\"}', ?)",
        (ROUTE, idempotency.body_digest({"name": "p"}), NOW),
    )
    migrate(db)
    assert lookup(db, idempotency.Key("old"), {"name": "p"}) == {"id": "proj-0"}
    assert lookup(db, idempotency.Key("old", caller="tok-alice"), {"name": "p"}) is None
    indexes = {
        row[0] for row in db.execute("SELECT name FROM pragma_index_list('idempotency_keys')")
    }
    assert "idempotency_keys_age" in indexes


def scope(headers: list[tuple[bytes, bytes]], principal: Principal | None) -> dict[str, Any]:
    return {"type": "http", "headers": headers, PRINCIPAL: principal}


def token(id: str) -> TokenInfo:
    return TokenInfo(id=id, name="ci", scopes=frozenset({"write"}))


def test_a_requests_key_is_scoped_to_the_token_that_sent_it() -> None:
    header = [(b"idempotency-key", b" k-3 ")]
    with_token = Principal("tok-a", "127.0.0.1", token=token("tok-a"))
    assert idempotency_key(scope(header, with_token)) == idempotency.Key("k-3", "tok-a")
    owner = Principal("uid:1000", None, owner=True)
    assert idempotency_key(scope(header, owner)) == idempotency.Key("k-3", idempotency.OWNER)
    # The gate let it through without naming anyone (auth and audit off): the owner.
    assert idempotency_key(scope(header, None)) == idempotency.Key("k-3", idempotency.OWNER)
    assert idempotency_key(scope([], with_token)) is None


def test_several_idempotency_key_headers_are_refused() -> None:
    """Which of two keys a proxy or the client meant is unknowable; guessing could
    create twice. The same value twice is refused as well: the request is malformed."""
    for values in ((b"k-4", b"k-5"), (b"k-4", b"k-4")):
        headers = [(b"Idempotency-Key", value) for value in values]
        with pytest.raises(InvalidQuery) as raised:
            idempotency_key(scope(headers, None))
        assert raised.value.field == "Idempotency-Key"
        assert "one Idempotency-Key header" in raised.value.message
