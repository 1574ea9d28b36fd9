"""Enterprise routes of the Dashboard API: status, tokens, audit (seed "Enterprise Endpoints").

Tokens need `admin`, the audit log `audit`, the status `read` (DESIGN.md §4).
A revoke clears the gate's token cache, so the revoked token's next request
is refused; creating and revoking are themselves audited by the gate
(`token.create`, `token.revoke`), never with the secret.
"""

from __future__ import annotations

from typing import Any

from quart import request

from lokid.actors.audit_writer import AuditWriter
from lokid.actors.store import StoreActor
from lokid.audit import AuditQuery
from lokid.http.gate import Gate
from lokid.http.surface import Param, Surface, json_body
from lokid.session_records import parse_list_query
from lokid.tokens import SCOPES, count_tokens, create_token, list_tokens, revoke_token

FEATURES = ("tokens", "audit", "registry")

TOKEN_BODY = {
    "type": "object",
    "required": ["name", "scopes"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "scopes": {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"type": "string", "enum": list(SCOPES)},
        },
        "expires_days": {"type": ["integer", "null"], "minimum": 1, "maximum": 3650},
    },
}
PAGE_PARAMS = (
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
    Param("offset", "query", {"type": "integer", "minimum": 0}),
)
AUDIT_PARAMS = (
    Param("start", "query", description="ISO-8601 timestamp or date: entries at or after"),
    Param("end", "query", description="ISO-8601 timestamp or date (that whole day): before"),
    Param("action", "query", description="exact (session.stop) or a family (session.*)"),
    *PAGE_PARAMS,
)


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
        responses={201: "The token, with its secret", 422: "Invalid field (details.field)"},
        request_body=TOKEN_BODY,
        tags=tags,
        requires="admin",
    )
    async def token_create() -> tuple[dict[str, Any], int]:
        body = await json_body()
        return await store.write(lambda db: create_token(db, body)), 201

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
        query = parse_list_query(request.args)

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
        finally:
            gate.forget_tokens()

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
        args = request.args
        query = AuditQuery.parse(
            start=args.get("start"),
            end=args.get("end"),
            action=args.get("action"),
            limit=args.get("limit"),
            offset=args.get("offset"),
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
