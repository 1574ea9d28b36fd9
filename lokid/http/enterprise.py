"""Enterprise routes of the Dashboard API: status, tokens, audit (seed "Enterprise Endpoints").

Tokens need `admin`, the audit log `audit`, the status `read` (DESIGN.md §4).
A revoke clears the gate's token cache, so the revoked token's next request
is refused, and ends the WebSockets and SSE streams opened with it
(`Gate.token_revoked`); creating and revoking are themselves audited by the gate
(`token.create`, `token.revoke`), never with the secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlite_utils
from quart import request

from lokid import audit as audit_log
from lokid import idempotency, textrules
from lokid.actors.audit_writer import AuditWriter
from lokid.actors.store import StoreActor
from lokid.audit import AuditQuery
from lokid.http.gate import Gate
from lokid.http.surface import (
    IDEMPOTENCY_KEY,
    SPACE,
    Link,
    Param,
    Surface,
    idempotency_key,
    json_body,
    query_params,
    stripped_text,
)
from lokid.session_records import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_OFFSET,
    parse_list_query,
    query_int,
)
from lokid.tokens import (
    MAX_EXPIRES_DAYS,
    MAX_NAME_CHARS,
    SCOPES,
    count_tokens,
    create_token,
    list_tokens,
    parse_token_request,
    revoke_token,
)

FEATURES = ("tokens", "audit", "registry")
NAME_FORBIDDEN = textrules.regex_class()
"""What a shown name may not hold, as a regex class body (`lokid.textrules`: Cc, Cf -
the bidirectional controls among them -, surrogates, line and paragraph separators;
`lokid.tokens.validate_name`, registry names too). The Basic Multilingual Plane only:
the few format characters beyond it are refused by the server, not the pattern."""

TOKEN_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["name", "scopes"],
    "additionalProperties": False,
    "properties": {
        "name": stripped_text(
            MAX_NAME_CHARS,
            NAME_FORBIDDEN,
            description="surrounding white space is dropped",
        ),
        "scopes": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "string", "enum": list(SCOPES)},
            "description": "a scope named twice counts once",
        },
        "expires_days": {
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": MAX_EXPIRES_DAYS,
            "description": "null or left out: never",
        },
    },
}
PAGE_PARAMS = (
    Param(
        "limit",
        "query",
        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    ),
    Param("offset", "query", {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET}),
)
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_DAY = "(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_HOUR = "(?:[01][0-9]|2[0-3])"
_MINUTE = "[0-5][0-9]"
TIMESTAMP = {
    "type": "string",
    "pattern": f"^[{SPACE}]*{_YEAR}-{_DAY}(?:T{_HOUR}:{_MINUTE}(?::{_MINUTE}"
    f"(?:\\.[0-9]{{1,9}})?)?(?:Z|[+-]{_HOUR}:{_MINUTE}))?[{SPACE}]*$",
}
"""`lokid.audit.parse_timestamp`'s syntax. A date that is not on the calendar (February 30)
is a 400 too, and so are an end at or before start and a bound past year 1 or 9999 in UTC
that would match nothing (an end past the last time, or a start before the first, is no
bound)."""
ACTION = {
    "anyOf": [
        stripped_text(audit_log.MAX_FILTER_CHARS, "*"),
        {
            "type": "string",
            "pattern": f"^[{SPACE}]*[A-Za-z0-9_-]{{1,{audit_log.MAX_FILTER_CHARS - 2}}}"
            f"\\.\\*[{SPACE}]*$",
        },
    ]
}
AUDIT_PARAMS = (
    Param(
        "start",
        "query",
        TIMESTAMP,
        description="entries at or after: a date (UTC) or a time with Z or +HH:MM",
    ),
    Param(
        "end",
        "query",
        TIMESTAMP,
        description="entries before: a date (that whole day) or a time with Z or +HH:MM",
    ),
    Param(
        "action",
        "query",
        ACTION,
        description="exact (session.stop) or a family (session.*); * only there",
    ),
    *PAGE_PARAMS,
)
TOKEN_ROUTE = "POST /api/enterprise/tokens"
IDEMPOTENCY = Param(
    idempotency.HEADER,
    "header",
    IDEMPOTENCY_KEY,
    description="the same key and body within 24 h: the same token again, without its "
    "secret (token null), nothing created; another body: 409",
)
REPLAYED = (
    "an earlier request with this Idempotency-Key created this token; its secret was "
    "shown only then. If that answer was lost, revoke this token and create another "
    "with a new key"
)
TOKEN_CREATED: dict[str, Any] = {
    "type": "object",
    "required": ["id", "token", "name", "scopes", "created_at", "expires_at"],
    "properties": {
        "id": {"type": "string"},
        "token": {
            "type": ["string", "null"],
            "description": "the secret: in the first answer only (null in a replay)",
        },
        "name": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
        "created_at": {"type": "string", "format": "date-time"},
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "message": {"type": "string", "description": "in a replay only: what happened"},
    },
}
TOKEN_LINKS: dict[str, Link] = {
    "RevokeToken": ("DELETE", "/api/enterprise/tokens/{id}", {"id": "$response.body#/id"}),
}


def install_enterprise(
    surface: Surface, store: StoreActor, audit: AuditWriter, gate: Gate, *, rate_limit: bool
) -> None:
    tags = ("enterprise",)

    @surface.route(
        "GET",
        "/api/enterprise/status",
        "Which enterprise features are on",
        responses={200: "auth_enabled, audit_enabled, rate_limit_enabled, features"},
        tags=tags,
        requires="read",
    )
    async def enterprise_status() -> dict[str, Any]:
        return {
            "auth_enabled": gate.auth_enabled,
            "audit_enabled": True,
            "rate_limit_enabled": rate_limit,
            "features": list(FEATURES),
        }

    @surface.route(
        "POST",
        "/api/enterprise/tokens",
        "Create an API token (the raw token is in this answer only)",
        responses={
            201: "The token, with its secret; a replay (same Idempotency-Key and body): the "
            "same token with token null and a message, nothing created",
            400: "Malformed JSON or Idempotency-Key",
            409: "The Idempotency-Key was used for another body (details.idempotencyKey)",
            422: "Invalid field (details.field)",
        },
        params=(IDEMPOTENCY,),
        request_body=TOKEN_BODY,
        response_schema=TOKEN_CREATED,
        links=TOKEN_LINKS,
        tags=tags,
        requires="admin",
    )
    async def token_create() -> tuple[dict[str, Any], int, dict[str, str]]:
        key = idempotency_key(request.scope)
        body = await json_body()
        if key is None:
            return await store.write(lambda db: create_token(db, body)), 201, {}
        answer, status = await create_token_once(store, body, key)
        return answer, status, idempotency.replay_headers(answer)

    @surface.route(
        "GET",
        "/api/enterprise/tokens",
        "API tokens, newest first (never their secrets)",
        responses={200: "A page of tokens"},
        params=PAGE_PARAMS,
        tags=tags,
        requires="admin",
    )
    async def token_list() -> dict[str, Any]:
        query = parse_list_query(query_params(request.scope), statuses=None)

        def read(db: Any) -> dict[str, Any]:
            tokens = list_tokens(db, limit=query.limit, offset=query.offset)
            return {
                "tokens": tokens,
                "total": count_tokens(db),
                "limit": query.limit,
                "offset": query.offset,
            }

        return await store.read(read)

    @surface.route(
        "DELETE",
        "/api/enterprise/tokens/{id}",
        "Revoke an API token (it stays listed, with revoked_at)",
        responses={200: "The token as listed, revoked", 404: "No such token"},
        tags=tags,
        requires="admin",
    )
    async def token_revoke(id: str) -> dict[str, Any]:
        try:
            return await store.write(lambda db: revoke_token(db, id))
        finally:  # also when the write failed after it committed: a reconnect costs little
            gate.token_revoked(id)

    @surface.route(
        "GET",
        "/api/enterprise/audit",
        "Audit log entries, newest first",
        responses={200: "A page of entries", 400: "Bad timestamp, action or paging value"},
        params=AUDIT_PARAMS,
        tags=tags,
        requires="audit",
    )
    async def audit_list() -> dict[str, Any]:
        # as on lean routes: a repeated key's last value; undeclared ones are refused
        args = query_params(request.scope)
        query = AuditQuery.parse(
            start=args.get("start"),
            end=args.get("end"),
            action=args.get("action"),
            # checked here: AuditQuery's own check lets "--5" through to int()
            limit=query_int(args, "limit", audit_log.DEFAULT_LIMIT, 1, audit_log.MAX_LIMIT),
            offset=query_int(args, "offset", 0, 0, audit_log.MAX_OFFSET),
        )
        return await audit.list_entries(query)

    @surface.route(
        "GET",
        "/api/enterprise/audit/summary",
        "Totals by action, actor and status; first/last timestamps; chain_valid",
        responses={200: "The summary"},
        tags=tags,
        requires="audit",
    )
    async def audit_summary() -> dict[str, Any]:
        return await audit.summary()

    @surface.route(
        "GET",
        "/api/enterprise/audit/verify",
        "Verify the whole hash chain: the first bad entry, if any",
        responses={200: "The report (valid or not)"},
        tags=tags,
        requires="audit",
    )
    async def audit_verify() -> dict[str, Any]:
        return (await audit.verify()).to_json()


async def create_token_once(
    store: StoreActor, body: Mapping[str, Any], key: idempotency.Key
) -> tuple[dict[str, Any], int]:
    """`POST /api/enterprise/tokens` with an `Idempotency-Key` (`lokid.idempotency`).

    The secret is shown once, so it is never stored with the key: what is remembered
    is the answer without it (`token: null`, `message`), which a replay gets back,
    201, and no second token. Another body with the same key is 409. The body is
    checked before the write (a 422 stores nothing: the client may fix it and retry).
    """
    digest = idempotency.body_digest(body)
    first = await store.read(lambda db: idempotency.lookup_only(db, TOKEN_ROUTE, key, digest))
    if first is not None:
        return first.body, first.status
    checked = parse_token_request(body)

    def write(db: sqlite_utils.Database) -> tuple[dict[str, Any], int]:
        remembered = idempotency.lookup(db, TOKEN_ROUTE, key, digest)
        if remembered is not None:  # a retry that raced this one
            return remembered.body, remembered.status
        created = create_token(db, checked)
        replay = {**created, "token": None, "message": REPLAYED}
        idempotency.remember(db, TOKEN_ROUTE, key, digest, 201, replay)
        return created, 201

    return await store.write(write)
