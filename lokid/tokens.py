"""API tokens: the format, the scopes, the request validation and the store records.

The contract is DESIGN.md §4 "Auth" and §7 "Enterprise"; this module is the
pure half of it. It does not know HTTP, the socket or trio: the auth
middleware calls `authenticate` inside `StoreActor.read`, the token routes
call `create_token` / `list_tokens` / `revoke_token` inside
`StoreActor.write` / `read`, and the CLI reaches the same routes over the
control socket.

Rules:

* **Format.** `loki_` + 43 random base62 characters + a 6-character
  checksum: 54 ASCII characters. The random part is drawn with `secrets`
  one character at a time from the 62 letters and digits, so it carries
  43 x log2(62) = 256.03 bits. The checksum is `zlib.crc32` of the 48
  characters before it (prefix included), written in base62 and
  zero-padded to 6 characters (62**6 > 2**32). `looks_like_token` checks
  prefix, length, alphabet and checksum, so a mistyped or truncated token
  is turned away without a store read, and a secret scanner can tell a
  lokid token from noise. The checksum is public information (anyone can
  compute it from the rest), so it is compared with plain `==`.
* **Storage.** Only `token_sha256(raw)` (hex SHA-256 of the token's ASCII)
  is stored; the raw token is returned once, by `create_token`, and never
  again. No salt and no slow hash: the token has 256 bits of entropy, so
  nobody can brute-force the preimage of a stored hash, and an unsalted
  digest is what lets `authenticate` find the row with one indexed lookup
  instead of hashing against every row.
* **Comparison.** `authenticate` looks the row up by `token_sha256 = ?`
  (the UNIQUE index), then compares the stored and the computed digests
  with `hmac.compare_digest`. That is constant-time enough: the only
  timing that depends on stored secrets is the B-tree search, and it
  depends on how the SHA-256 of the *presented* token compares with the
  stored digests. An attacker who learned that a guess's digest shares a
  prefix with a stored digest has learned nothing about any token (SHA-256
  is preimage-resistant), so the lookup leaks nothing usable. The
  `compare_digest` makes the final equality explicit and constant-time
  whatever the index or collation did.
* **Scopes.** `read`, `write`, `audit`, `admin`. `admin` implies all the
  others, `write` implies `read`, `read` and `audit` imply only themselves
  (`IMPLIES`). A token's scopes are a non-empty subset, validated at
  creation: an empty list, an unknown name (`*`, `control`, `Admin`), a
  string instead of a list - all 422. Nothing ever widens: an empty or
  unreadable stored list grants nothing (fail closed), never "everything".
  `grants` refuses a bare string as the held scopes (the substring trap:
  `"read" in "readonly"`) and an unknown *required* scope (a route table
  bug must not silently pass or silently 403).
* **Outcomes.** `authenticate` answers `TokenInfo` (id, name, scopes) or
  `AuthFailure` saying why: `malformed` (not a lokid token; no store read),
  `unknown` (well-formed, not in the store), `revoked`, `expired`. All four
  are a 401 for the client; the reason is for the message and the audit
  log (`AuthFailure.token_id` names the token when the row was found).
* **`last_used_at`** is kept to within `TOUCH_INTERVAL_SECONDS` (60 s), so
  authenticated traffic costs at most one token write per token per minute
  however many requests arrive: `TokenInfo.needs_touch(now)` lets the caller
  skip the store write entirely from what its read saw, and
  `touch_last_used` writes only if the stored value is still that old (a
  conditional UPDATE, so requests that raced past the first check do not
  write again).

Decisions (where DESIGN.md and the seed are silent):

* `POST /api/enterprise/tokens` answers `{"id", "token", "name", "scopes",
  "created_at", "expires_at"}` (the seed's keys plus `created_at`).
  `expires_at` is `null` for a token without `expires_days`.
* `scopes` is required (no default: the caller says what the token may do).
  Duplicates are removed, the given order is kept, implied scopes are not
  added (`["admin", "read"]` is stored as given).
* `name`: a string, stripped (a trailing newline from a pipe is forgiven),
  then 1-100 characters without control characters
  (C0/C1), line or paragraph separators, or bidirectional overrides (names
  are shown in listings, the CLI and the audit log). Names need not be
  unique: the id identifies a token, and a rotated CI token may keep its
  name.
* `expires_days`: an integer 1-3650 (a JSON number with an integral value,
  such as `30.0`, counts; a boolean does not), absent or `null` for a token
  that never expires. `expires_at = created_at + days x 24 h`. A token is
  expired from `expires_at` on (`now >= expires_at`).
* A JSON `null` for any key counts as absent; an unknown key is a 422 naming
  it.
* A token both revoked and expired reports `revoked` (the deliberate act).
* Revoking is idempotent: a second revoke answers the same record and keeps
  the first `revoked_at`. Revoked tokens stay listed (`revoked: true`) so
  the owner can see what was cut off and when; nothing deletes rows.
* The listing (newest first) never shows the raw token nor its hash.
* Ids are `tok-` + 12 random hex digits; a collision with an existing id
  (2**-48 per pair) draws again.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import json
import re
import secrets
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import sqlite_utils

from lokid.errors import NotFound, ValidationFailed
from lokid.jsontypes import json_type_name
from lokid.textrules import forbidden_character
from lokid.timefmt import iso, utc_now

__all__ = [
    "ALPHABET",
    "CHECKSUM_CHARS",
    "IMPLIES",
    "MAX_EXPIRES_DAYS",
    "MAX_NAME_CHARS",
    "PREFIX",
    "RANDOM_CHARS",
    "SCOPES",
    "TOKEN_CHARS",
    "TOUCH_INTERVAL_SECONDS",
    "AuthFailure",
    "FailureReason",
    "Scope",
    "TokenInfo",
    "TokenRequest",
    "authenticate",
    "checksum",
    "count_tokens",
    "create_token",
    "effective_scopes",
    "generate_token",
    "get_token",
    "grants",
    "list_tokens",
    "looks_like_token",
    "new_token_id",
    "parse_token_request",
    "revoke_token",
    "token_sha256",
    "touch_last_used",
    "validate_expires_days",
    "validate_name",
    "validate_scopes",
]

# -- format -----------------------------------------------------------------------

PREFIX = "loki_"
RANDOM_CHARS = 43
CHECKSUM_CHARS = 6
TOKEN_CHARS = len(PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS  # 54
# Digits, then upper case, then lower case: ASCII order, so base62 strings of
# one length sort like the numbers they spell.
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_SHAPE = re.compile(rf"{PREFIX}[0-9A-Za-z]{{{RANDOM_CHARS + CHECKSUM_CHARS}}}")


def _base62(number: int, width: int) -> str:
    chars = []
    while number:
        number, digit = divmod(number, 62)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars)).rjust(width, ALPHABET[0])


def checksum(body: str) -> str:
    """The 6-character base62 CRC32 of `body` (the token without its checksum)."""
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def generate_token() -> str:
    """A new raw token: `loki_` + 43 random base62 characters + checksum (256 bits)."""
    body = PREFIX + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return body + checksum(body)


def looks_like_token(raw: object) -> bool:
    """Whether `raw` has a lokid token's prefix, length, alphabet and checksum.

    Needs no store: a typo, a truncated paste or another service's token is
    refused here.
    """
    if not isinstance(raw, str) or len(raw) != TOKEN_CHARS or not _SHAPE.fullmatch(raw):
        return False
    body = raw[:-CHECKSUM_CHARS]
    return checksum(body) == raw[-CHECKSUM_CHARS:]


def token_sha256(raw: str) -> str:
    """The hex SHA-256 of a raw token: what the store keeps instead of the token."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def new_token_id() -> str:
    """`tok-` + 12 random hex digits."""
    return f"tok-{secrets.token_hex(6)}"


# -- scopes -----------------------------------------------------------------------


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    AUDIT = "audit"
    ADMIN = "admin"


SCOPES: tuple[str, ...] = tuple(s.value for s in Scope)

IMPLIES: Mapping[str, frozenset[str]] = {
    Scope.READ: frozenset({Scope.READ}),
    Scope.WRITE: frozenset({Scope.WRITE, Scope.READ}),
    Scope.AUDIT: frozenset({Scope.AUDIT}),
    Scope.ADMIN: frozenset(Scope),
}
"""What holding a scope grants (itself included); one level is the whole closure."""


def _held(scopes: Iterable[str]) -> Iterable[str]:
    if isinstance(scopes, str | bytes):
        raise TypeError("scopes must be a collection of scope names, not a single string")
    return scopes


def effective_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Everything `scopes` grant; unknown names grant nothing."""
    granted: set[str] = set()
    for scope in _held(scopes):
        granted |= IMPLIES.get(scope, frozenset())
    return frozenset(granted)


def grants(scopes: Iterable[str], required: str) -> bool:
    """Whether a token holding `scopes` may do what needs `required`.

    `required` must be a known scope (`ValueError` otherwise: a route that
    asks for an unknown scope is a bug). A bare string for `scopes` is a
    `TypeError`.
    """
    if required not in IMPLIES:
        raise ValueError(f"unknown required scope {required!r}; known: {', '.join(SCOPES)}")
    return any(required in IMPLIES.get(scope, ()) for scope in _held(scopes))


# -- request validation -----------------------------------------------------------

MAX_NAME_CHARS = 100
MAX_EXPIRES_DAYS = 3650
_BODY_KEYS = ("name", "scopes", "expires_days")


@attrs.frozen
class TokenRequest:
    """A validated body of `POST /api/enterprise/tokens`."""

    name: str
    scopes: tuple[str, ...]
    expires_days: int | None = None


def validate_name(value: Any) -> str:
    """The stripped name, or `ValidationFailed(field="name")`."""
    if value is None:
        raise ValidationFailed("name is required", field="name")
    if not isinstance(value, str):
        raise ValidationFailed(f"name must be a string, not {json_type_name(value)}", field="name")
    name = value.strip()
    if not name:
        raise ValidationFailed("name must not be empty", field="name")
    char = forbidden_character(name)
    if char is not None:
        raise ValidationFailed(
            "name must not contain control, format or bidirectional characters "
            f"(found U+{ord(char):04X})",
            field="name",
        )
    if len(name) > MAX_NAME_CHARS:
        raise ValidationFailed(
            f"name is longer than {MAX_NAME_CHARS} characters ({len(name)})",
            field="name",
            details={"limit": MAX_NAME_CHARS},
        )
    return name


def validate_scopes(value: Any) -> list[str]:
    """A non-empty list of known scopes (duplicates dropped, order kept), or a 422."""
    known = ", ".join(SCOPES)
    if value is None:
        raise ValidationFailed(
            f"scopes is required: a non-empty list of {known}",
            field="scopes",
            details={"known": list(SCOPES)},
        )
    if not isinstance(value, list | tuple):
        raise ValidationFailed(
            f"scopes must be an array of scope names, not {json_type_name(value)}",
            field="scopes",
            details={"known": list(SCOPES)},
        )
    if not value:
        raise ValidationFailed(
            f"scopes must name at least one scope ({known}); an empty list is refused",
            field="scopes",
            details={"known": list(SCOPES)},
        )
    scopes: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationFailed(
                f"scopes[{index}] must be a string, not {json_type_name(item)}",
                field="scopes",
                details={"index": index},
            )
        if item not in IMPLIES:
            raise ValidationFailed(
                f"unknown scope {item!r}; known scopes: {known}",
                field="scopes",
                details={"index": index, "known": list(SCOPES)},
            )
        if item not in scopes:
            scopes.append(item)
    return scopes


def validate_expires_days(value: Any) -> int | None:
    """Days until the token expires (1-3650), None for never; else a 422."""
    field = "expires_days"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed(
            f"{field} must be an integer, not {json_type_name(value)}", field=field
        )
    if isinstance(value, float) and not value.is_integer():
        raise ValidationFailed(f"{field} must be an integer, not {value!r}", field=field)
    days = int(value)
    if not 1 <= days <= MAX_EXPIRES_DAYS:
        got = str(days) if abs(days) < 10**12 else f"a number of {len(str(abs(days)))} digits"
        raise ValidationFailed(
            f"{field} must be between 1 and {MAX_EXPIRES_DAYS}, got {got}",
            field=field,
            details={"min": 1, "max": MAX_EXPIRES_DAYS},
        )
    return days


def parse_token_request(body: Any) -> TokenRequest:
    """Validate the body of `POST /api/enterprise/tokens`; a 422 names the field."""
    if not isinstance(body, Mapping):
        raise ValidationFailed(
            f"the request body must be a JSON object, not {json_type_name(body)}", field="body"
        )
    for key in body:
        if key not in _BODY_KEYS:
            raise ValidationFailed(
                f"unknown key {key!r}; known keys: {', '.join(_BODY_KEYS)}", field=str(key)
            )
    return TokenRequest(
        name=validate_name(body.get("name")),
        scopes=tuple(validate_scopes(body.get("scopes"))),
        expires_days=validate_expires_days(body.get("expires_days")),
    )


# -- records ----------------------------------------------------------------------

TOUCH_INTERVAL_SECONDS = 60
_ID_ATTEMPTS = 8


def _now(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return utc_now()
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return now


def _parse_time(text: str) -> dt.datetime | None:
    try:
        moment = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _is_expired(expires_at: str | None, now: dt.datetime) -> bool:
    """Whether a stored `expires_at` has passed; an unreadable value counts as passed."""
    if expires_at is None:
        return False
    moment = _parse_time(expires_at)
    return moment is None or now >= moment


def _stored_scopes(text: Any) -> list[str]:
    """The stored scope list; anything unreadable is an empty list (grants nothing)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        return []
    return value


def _public(row: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "scopes": _stored_scopes(row["scopes"]),
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "last_used_at": row["last_used_at"],
        "revoked_at": row["revoked_at"],
        "revoked": row["revoked_at"] is not None,
        "expired": _is_expired(row["expires_at"], now),
    }


_PUBLIC_COLUMNS = "id, name, scopes, created_at, expires_at, revoked_at, last_used_at"


def create_token(
    db: sqlite_utils.Database,
    body: Mapping[str, Any] | TokenRequest,
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Validate, store the hash, answer the raw token (the only time it is shown)."""
    request = body if isinstance(body, TokenRequest) else parse_token_request(body)
    moment = _now(now)
    for _ in range(_ID_ATTEMPTS):
        token_id = new_token_id()
        if not list(db.query("SELECT 1 FROM api_tokens WHERE id = ?", (token_id,))):
            break
    else:  # pragma: no cover - 8 collisions of 48 random bits
        raise RuntimeError("could not draw an unused token id")
    raw = generate_token()
    created_at = iso(moment)
    expires_at = (
        iso(moment + dt.timedelta(days=request.expires_days))
        if request.expires_days is not None
        else None
    )
    db.execute(
        "INSERT INTO api_tokens (id, name, token_sha256, scopes, created_at, expires_at,"
        " revoked_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
        (
            token_id,
            request.name,
            token_sha256(raw),
            json.dumps(list(request.scopes)),
            created_at,
            expires_at,
        ),
    )
    return {
        "id": token_id,
        "token": raw,
        "name": request.name,
        "scopes": list(request.scopes),
        "created_at": created_at,
        "expires_at": expires_at,
    }


def count_tokens(db: sqlite_utils.Database) -> int:
    """How many tokens are stored (revoked and expired included)."""
    row = db.execute("SELECT COUNT(*) FROM api_tokens").fetchone()
    return int(row[0])


def list_tokens(
    db: sqlite_utils.Database,
    *,
    now: dt.datetime | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Every token, newest first (created in the same millisecond: the later first),
    without secret or hash; `expired` is as of `now`."""
    moment = _now(now)
    rows = db.query(
        f"SELECT {_PUBLIC_COLUMNS} FROM api_tokens ORDER BY created_at DESC, rowid DESC"
        " LIMIT ? OFFSET ?",
        (-1 if limit is None else limit, offset),
    )
    return [_public(row, moment) for row in rows]


def get_token(
    db: sqlite_utils.Database, token_id: str, *, now: dt.datetime | None = None
) -> dict[str, Any]:
    """One token as listed; `NotFound` ("Token not found")."""
    rows = list(db.query(f"SELECT {_PUBLIC_COLUMNS} FROM api_tokens WHERE id = ?", (token_id,)))
    if not rows:
        raise NotFound("Token not found", details={"token_id": token_id})
    return _public(rows[0], _now(now))


def revoke_token(
    db: sqlite_utils.Database, token_id: str, *, now: dt.datetime | None = None
) -> dict[str, Any]:
    """Revoke a token and answer it as listed; a second revoke keeps the first `revoked_at`."""
    moment = _now(now)
    db.execute(
        "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
        (iso(moment), token_id),
    )
    return get_token(db, token_id, now=moment)


# -- authentication ---------------------------------------------------------------


@attrs.frozen
class TokenInfo:
    """Who a valid token is: what the auth middleware hands on (never the secret)."""

    id: str
    name: str
    scopes: frozenset[str]
    expires_at: str | None = None
    last_used_at: str | None = None

    def grants(self, required: str) -> bool:
        return grants(self.scopes, required)

    def seconds_left(self, now: dt.datetime) -> float:
        """Seconds until the token expires: `inf` for one that never does, 0 once it has
        (an unreadable `expires_at` counts as passed, as in `authenticate`)."""
        if self.expires_at is None:
            return float("inf")
        moment = _parse_time(self.expires_at)
        return 0.0 if moment is None else max(0.0, (moment - now).total_seconds())

    def needs_touch(self, now: dt.datetime) -> bool:
        """Whether `last_used_at` (as read) is due a `touch_last_used`."""
        if self.last_used_at is None:
            return True
        seen = _parse_time(self.last_used_at)
        return seen is None or now - seen >= dt.timedelta(seconds=TOUCH_INTERVAL_SECONDS)


class FailureReason(enum.StrEnum):
    MALFORMED = "malformed"  # not a lokid token (prefix, length, alphabet, checksum)
    UNKNOWN = "unknown"  # well-formed, but no stored token has its hash
    EXPIRED = "expired"
    REVOKED = "revoked"


_FAILURE_MESSAGES = {
    FailureReason.MALFORMED: "Invalid token: not a lokid API token (mistyped or truncated?)",
    FailureReason.UNKNOWN: "Invalid token",
    FailureReason.EXPIRED: "Token expired",
    FailureReason.REVOKED: "Token revoked",
}


@attrs.frozen
class AuthFailure:
    """Why a presented token does not authenticate (always a 401).

    `token_id` names the stored token for `expired` and `revoked` (for the
    audit log's actor); it is None for `malformed` and `unknown`.
    """

    reason: FailureReason
    token_id: str | None = None

    @property
    def message(self) -> str:
        return _FAILURE_MESSAGES[self.reason]


def authenticate(
    db: sqlite_utils.Database, raw: str, *, now: dt.datetime | None = None
) -> TokenInfo | AuthFailure:
    """The token's identity, or why not; reads only (run in `StoreActor.read`)."""
    if not looks_like_token(raw):
        return AuthFailure(FailureReason.MALFORMED)
    digest = token_sha256(raw)
    rows = list(
        db.query(
            "SELECT id, name, token_sha256, scopes, expires_at, revoked_at, last_used_at"
            " FROM api_tokens WHERE token_sha256 = ?",
            (digest,),
        )
    )
    if not rows or not hmac.compare_digest(
        str(rows[0]["token_sha256"]).encode("utf-8", "surrogatepass"), digest.encode("ascii")
    ):
        return AuthFailure(FailureReason.UNKNOWN)
    row = rows[0]
    if row["revoked_at"] is not None:
        return AuthFailure(FailureReason.REVOKED, row["id"])
    if _is_expired(row["expires_at"], _now(now)):
        return AuthFailure(FailureReason.EXPIRED, row["id"])
    return TokenInfo(
        id=row["id"],
        name=row["name"],
        scopes=frozenset(_stored_scopes(row["scopes"])),
        expires_at=row["expires_at"],
        last_used_at=row["last_used_at"],
    )


def touch_last_used(
    db: sqlite_utils.Database, token_id: str, now: dt.datetime | None = None
) -> bool:
    """Set `last_used_at = now` unless it is less than 60 s old; whether it wrote.

    Every timestamp in the table is written by `timefmt.iso` (fixed width,
    UTC, `Z`), so the text comparison in SQL is the time comparison.
    """
    moment = _now(now)
    threshold = iso(moment - dt.timedelta(seconds=TOUCH_INTERVAL_SECONDS))
    cursor = db.execute(
        "UPDATE api_tokens SET last_used_at = ?"
        " WHERE id = ? AND (last_used_at IS NULL OR last_used_at <= ?)",
        (iso(moment), token_id, threshold),
    )
    return bool(cursor.rowcount)
