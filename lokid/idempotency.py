"""`Idempotency-Key` for routes that create something (DESIGN.md §4).

Rules:

* A create request with an `Idempotency-Key` header is answered once: the
  first answer (status and body) is stored with the key, in the same store
  transaction as what it created, so a client that retries after a lost
  response - or after a daemon crash - gets the first answer again and no
  second session.
* The same key with a different body is a 409 (`details.idempotencyKey`):
  the client reused a key by mistake, and guessing which request it meant
  would lose one of them.
* Keys are scoped by route (`POST /api/sessions` and a future create route
  may share a key; a session's input route is scoped to that session, so one
  key serves one input per session) and by caller (`Key.caller`: the token
  that sent it, so a second caller who happens to send the same key and body
  creates its own resource instead of getting the first caller's answer, and
  a 409 never tells one caller about another's keys; callers that need no
  token - the control socket's peer, anyone while auth is off - are one
  caller, `OWNER`). Keys are kept for `RETENTION_SECONDS` (24 h); older rows are
  pruned by the writer that checks them, at most `PRUNE_BATCH` at a time.
* Only successful answers are stored: a 4xx is not "the first response" a
  retry must repeat (the client may fix the PRD and retry with the same key).
* A key is 1-255 printable ASCII characters, sent in one header; anything
  else is a 400 naming the header.
* A replay is told apart: a remembered object answer comes back as a
  `Replayed` dict, whose route answers it with `Idempotent-Replayed: true`
  (`replay_headers`); the gate records that answer's audit entry with
  `details.replay = true`, so a retry is not read as a second creation.

The functions take a `sqlite_utils.Database` and run inside
`StoreActor.write` (one transaction with the create itself).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import sqlite_utils

from lokid.errors import Conflict, InvalidQuery

if TYPE_CHECKING:
    from lokid.actors.store import StoreActor

T = TypeVar("T")

__all__ = [
    "HEADER",
    "MAX_KEY_CHARS",
    "OWNER",
    "REPLAYED_HEADER",
    "RETENTION_SECONDS",
    "CreateOutcome",
    "Key",
    "Once",
    "Remembered",
    "Replayed",
    "body_digest",
    "create_once",
    "lookup",
    "lookup_only",
    "remember",
    "replay_headers",
    "validate_key",
]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # "true" on an answer given again for a key
MAX_KEY_CHARS = 255
RETENTION_SECONDS = 24 * 3600
PRUNE_BATCH = 100
OWNER = ""  # the caller of every request that needs no token (`Key.caller`)


class Replayed(dict[str, Any]):
    """A remembered answer given again: a plain JSON object that says it is a replay
    (its route adds `replay_headers`, and the gate's audit entry says `replay`)."""


def replay_headers(answer: Any) -> dict[str, str]:
    """The headers that mark `answer` as a replay (none for a first answer)."""
    return {REPLAYED_HEADER: "true"} if isinstance(answer, Replayed) else {}


@attrs.frozen
class Remembered:
    """A stored first answer."""

    status: int
    body: Any


@attrs.frozen
class Key:
    """An `Idempotency-Key` as one caller sent it (see the module's rules)."""

    value: str
    caller: str = OWNER  # the token id; `OWNER` for a caller that needs no token


@attrs.frozen
class Once:
    """A keyed request, for a create that an actor commits (its write remembers the answer):
    a session's input, a registry register."""

    route: str
    key: Key
    digest: str

    @classmethod
    def of(cls, route: str, key: Key | None, body: Any) -> Once | None:
        """None without a key: the request is not idempotent."""
        return None if key is None else cls(route, key, body_digest(body))


def validate_key(raw: str | None) -> str | None:
    """The header's value, or None when absent; `InvalidQuery` (400) when unusable."""
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise InvalidQuery(
            f"{HEADER} must be 1-{MAX_KEY_CHARS} printable ASCII characters",
            field=HEADER,
        )
    return key


def body_digest(body: Any) -> str:
    """A digest of the parsed JSON body; key order and whitespace do not matter."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _prune(db: sqlite_utils.Database, now: float) -> None:
    db.execute(
        "DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys"
        " WHERE created_at < ? ORDER BY created_at LIMIT ?)",
        (now - RETENTION_SECONDS, PRUNE_BATCH),
    )


def lookup(
    db: sqlite_utils.Database, route: str, key: Key, digest: str, *, now: float | None = None
) -> Remembered | None:
    """The first answer for (`route`, `key`), or None; `Conflict` if the body differs.

    Prunes expired keys too: call it in the writing transaction.
    """
    now = time.time() if now is None else now
    _prune(db, now)
    return lookup_only(db, route, key, digest, now=now)


def lookup_only(
    db: sqlite_utils.Database, route: str, key: Key, digest: str, *, now: float | None = None
) -> Remembered | None:
    """`lookup` without pruning: for a read-only connection (a retry answered early)."""
    now = time.time() if now is None else now
    rows = list(
        db.query(
            "SELECT body_sha256, status, response FROM idempotency_keys"
            " WHERE route = ? AND caller = ? AND key = ? AND created_at >= ?",
            (route, key.caller, key.value, now - RETENTION_SECONDS),
        )
    )
    if not rows:
        return None
    row = rows[0]
    if row["body_sha256"] != digest:
        raise Conflict(
            f"{HEADER} {key.value!r} was used for a different request body in the last 24 h; "
            "use a new key for a new request",
            details={"idempotencyKey": key.value},
        )
    body = json.loads(row["response"])
    return Remembered(int(row["status"]), Replayed(body) if isinstance(body, dict) else body)


def remember(
    db: sqlite_utils.Database,
    route: str,
    key: Key,
    digest: str,
    status: int,
    body: Any,
    *,
    now: float | None = None,
) -> None:
    """Store the first answer (call in the transaction that created the thing)."""
    db.execute(
        "INSERT OR REPLACE INTO idempotency_keys"
        " (route, caller, key, body_sha256, status, response, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            route,
            key.caller,
            key.value,
            digest,
            status,
            json.dumps(body),
            time.time() if now is None else now,
        ),
    )


@attrs.frozen
class CreateOutcome:
    """What `create_once` did: `created` False = a remembered answer (`prepared` None)."""

    created: bool
    status: int
    answer: Any
    prepared: Any = None


async def create_once(
    store: StoreActor,
    route: str,
    body: Mapping[str, Any],
    key: Key | None,
    prepare: Callable[[], Awaitable[T]],
    insert: Callable[[sqlite_utils.Database, T], dict[str, Any]],
    *,
    on_commit: Callable[[CreateOutcome], None] | None = None,
) -> CreateOutcome:
    """Create once per `Idempotency-Key`: the answer, and what `prepare` made of the body.

    A retry is answered from the store before `prepare` validates the body
    again, so it gets the first answer even if what the body refers to is gone
    now. `insert(db, prepared)` runs in the store write that also remembers
    its answer (201); a retry that raced this one gets the answer it stored.
    `on_commit` is the write's commit hook (`StoreActor.write`).
    """
    digest = body_digest(body) if key is not None else ""
    if key is not None:
        first = await store.read(lambda db: lookup_only(db, route, key, digest))
        if first is not None:
            return CreateOutcome(False, first.status, first.body)
    value = await prepare()

    def write(db: sqlite_utils.Database) -> CreateOutcome:
        if key is not None:
            remembered = lookup(db, route, key, digest)
            if remembered is not None:
                return CreateOutcome(False, remembered.status, remembered.body)
        created = insert(db, value)
        if key is not None:
            remember(db, route, key, digest, 201, created)
        return CreateOutcome(True, 201, created, value)

    return await store.write(write, on_commit=on_commit)
