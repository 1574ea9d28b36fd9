"""API tokens: format, checksum, scopes, validation, records and authentication.

Most tests run the record functions on a migrated SQLite database directly
(autocommit); one runs them through the real `StoreActor` (writes in its
batches, reads on its read-only connections).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import itertools
import json
import math
import re
import sqlite3
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lokid import tokens as tk
from lokid.actors import StoreActor
from lokid.errors import NotFound, ValidationFailed
from lokid.migrations import migrate
from lokid.timefmt import iso

from .child_status import StubChildStatus

WAIT = 5.0
T0 = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)

LISTED_KEYS = {
    "id",
    "name",
    "scopes",
    "created_at",
    "expires_at",
    "last_used_at",
    "revoked_at",
    "revoked",
    "expired",
}


def open_db(path: Path | str = ":memory:") -> sqlite_utils.Database:
    """A migrated database in autocommit mode (each statement commits)."""
    db = sqlite_utils.Database(sqlite3.connect(path, isolation_level=None))
    migrate(db)
    return db


@pytest.fixture
def db() -> Iterator[sqlite_utils.Database]:
    database = open_db()
    yield database
    database.close()


def create(
    db: sqlite_utils.Database,
    scopes: list[str] | None = None,
    *,
    name: str = "ci-bot",
    expires_days: int | None = None,
    now: dt.datetime = T0,
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "scopes": scopes or ["read"]}
    if expires_days is not None:
        body["expires_days"] = expires_days
    return tk.create_token(db, body, now=now)


def decode62(text: str) -> int:
    number = 0
    for char in text:
        number = number * 62 + tk.ALPHABET.index(char)
    return number


class NoStore:
    """A database that fails the test if anything touches it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was used ({name}) for a malformed token")


NO_STORE: Any = NoStore()


# -- format -----------------------------------------------------------------------


def test_format_constants_match_design() -> None:
    assert tk.PREFIX == "loki_"
    assert tk.RANDOM_CHARS == 43
    assert tk.CHECKSUM_CHARS == 6
    assert tk.TOKEN_CHARS == 54
    assert len(tk.ALPHABET) == len(set(tk.ALPHABET)) == 62
    assert set(tk.ALPHABET) == set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    # 256 bits of entropy in the random part; a CRC32 fits in 6 base62 digits.
    assert tk.RANDOM_CHARS * math.log2(62) >= 256
    assert 62**tk.CHECKSUM_CHARS > 2**32


def test_generated_token_has_prefix_random_part_and_crc32_checksum() -> None:
    raw = tk.generate_token()
    assert len(raw) == 54
    assert raw.startswith("loki_")
    body, check = raw[:-6], raw[-6:]
    assert set(raw[5:]) <= set(tk.ALPHABET)
    assert decode62(check) == zlib.crc32(body.encode("ascii"))
    assert tk.looks_like_token(raw)


def test_checksum_is_zero_padded_base62() -> None:
    assert tk.checksum("") == "000000"  # crc32(b"") == 0
    for body in ("loki_", "loki_" + "A" * 43, "x"):
        check = tk.checksum(body)
        assert len(check) == 6
        assert decode62(check) == zlib.crc32(body.encode())


def test_generated_tokens_are_distinct_and_use_the_whole_alphabet() -> None:
    made = [tk.generate_token() for _ in range(2000)]
    assert len(set(made)) == len(made)
    counts = Counter(char for raw in made for char in raw[5:-6])
    assert set(counts) == set(tk.ALPHABET)
    expected = 2000 * 43 / 62  # about 1387 each
    assert min(counts.values()) > expected * 0.8
    assert max(counts.values()) < expected * 1.2


def test_every_single_character_change_fails_the_checksum() -> None:
    raw = tk.generate_token()
    for position in range(len(raw)):
        for char in tk.ALPHABET + "_-":
            if char == raw[position]:
                continue
            typo = raw[:position] + char + raw[position + 1 :]
            assert not tk.looks_like_token(typo), (position, char)


def test_adjacent_transpositions_fail_the_checksum() -> None:
    raw = tk.generate_token()
    for position in range(5, len(raw) - 1):
        if raw[position] == raw[position + 1]:
            continue
        swapped = raw[:position] + raw[position + 1] + raw[position] + raw[position + 2 :]
        assert not tk.looks_like_token(swapped), position


@pytest.mark.parametrize(
    "raw",
    [
        None,
        123,
        b"loki_" + b"a" * 49,
        "",
        "loki_",
        "Bearer loki_abc",
        "LOKI_" + "a" * 49,
        "loki-" + "a" * 49,
    ],
)
def test_looks_like_token_rejects_non_tokens(raw: Any) -> None:
    assert not tk.looks_like_token(raw)


def test_looks_like_token_rejects_wrong_length_whitespace_and_non_ascii() -> None:
    raw = tk.generate_token()
    assert tk.looks_like_token(raw)
    assert not tk.looks_like_token(raw[:-1])
    assert not tk.looks_like_token(raw + "0")
    assert not tk.looks_like_token(raw + "\n")
    assert not tk.looks_like_token(" " + raw)
    # Characters `str.isalnum` accepts but the alphabet does not.
    body = "loki_" + "\u0663" + "a" * 42  # ARABIC-INDIC DIGIT THREE
    assert not tk.looks_like_token(body + "000000")
    body = "loki_" + "é" + "a" * 42
    assert not tk.looks_like_token(body + "000000")


def test_token_sha256_is_hex_sha256_of_the_token() -> None:
    raw = tk.generate_token()
    assert tk.token_sha256(raw) == hashlib.sha256(raw.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", tk.token_sha256(raw))


def test_token_ids_are_tok_and_12_hex() -> None:
    ids = {tk.new_token_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"tok-[0-9a-f]{12}", token_id) for token_id in ids)


# -- scopes -----------------------------------------------------------------------

# Written out by hand from DESIGN.md §4, independently of `tk.IMPLIES`.
GRANTS_ONE = {
    ("read", "read"): True,
    ("read", "write"): False,
    ("read", "audit"): False,
    ("read", "admin"): False,
    ("write", "read"): True,
    ("write", "write"): True,
    ("write", "audit"): False,
    ("write", "admin"): False,
    ("audit", "read"): False,
    ("audit", "write"): False,
    ("audit", "audit"): True,
    ("audit", "admin"): False,
    ("admin", "read"): True,
    ("admin", "write"): True,
    ("admin", "audit"): True,
    ("admin", "admin"): True,
}
ALL_SCOPES = ("read", "write", "audit", "admin")


def test_scope_names() -> None:
    assert tk.SCOPES == ALL_SCOPES


@pytest.mark.parametrize(
    "held",
    [
        frozenset(combo)
        for size in range(len(ALL_SCOPES) + 1)
        for combo in itertools.combinations(ALL_SCOPES, size)
    ],
    ids=lambda held: "+".join(sorted(held)) or "none",
)
def test_grants_every_subset_and_requirement(held: frozenset[str]) -> None:
    for required in ALL_SCOPES:
        expected = any(GRANTS_ONE[(scope, required)] for scope in held)
        assert tk.grants(held, required) is expected, (sorted(held), required)
        assert tk.grants(sorted(held), required) is expected
        assert (required in tk.effective_scopes(held)) is expected


def test_empty_scopes_grant_nothing() -> None:
    for required in ALL_SCOPES:
        assert not tk.grants([], required)
        assert not tk.grants(frozenset(), required)
    assert tk.effective_scopes([]) == frozenset()


@pytest.mark.parametrize("unknown", ["*", "control", "ADMIN", "Admin", "", "admin "])
def test_unknown_held_scopes_grant_nothing(unknown: str) -> None:
    for required in ALL_SCOPES:
        assert not tk.grants([unknown], required)
    assert tk.effective_scopes([unknown]) == frozenset()


def test_grants_refuses_a_bare_string_and_an_unknown_requirement() -> None:
    with pytest.raises(TypeError):
        tk.grants("admin", "read")  # the substring trap: "read" in "readonly"
    with pytest.raises(TypeError):
        tk.effective_scopes("write")
    with pytest.raises(ValueError, match="unknown required scope 'control'"):
        tk.grants(["admin"], "control")


def test_token_info_grants_and_never_holds_the_secret() -> None:
    info = tk.TokenInfo(id="tok-000000000000", name="n", scopes=frozenset({"write"}))
    assert info.grants("read")
    assert info.grants("write")
    assert not info.grants("audit")
    assert not info.grants("admin")
    assert {f.name for f in info.__attrs_attrs__} == {
        "id",
        "name",
        "scopes",
        "expires_at",
        "last_used_at",
    }


# -- validation -------------------------------------------------------------------


def test_validate_scopes_dedupes_and_keeps_order() -> None:
    assert tk.validate_scopes(["write", "read", "write", "admin", "read"]) == [
        "write",
        "read",
        "admin",
    ]
    assert tk.validate_scopes(["audit"]) == ["audit"]


def test_validate_name_strips() -> None:
    assert tk.validate_name("  ci-bot \n") == "ci-bot"
    assert tk.validate_name("x" * 100) == "x" * 100
    assert tk.validate_name("  " + "x" * 100 + "  ") == "x" * 100
    assert tk.validate_name("Zürich ✓ 👩\u200d💻") == "Zürich ✓ 👩\u200d💻"


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), (1, 1), (30, 30), (30.0, 30), (3650, 3650)]
)
def test_validate_expires_days_accepts(value: Any, expected: int | None) -> None:
    assert tk.validate_expires_days(value) == expected


REFUSALS: list[tuple[Any, str, str]] = [
    # body, field, message (regex, searched)
    ([], "body", r"^the request body must be a JSON object, not an array$"),
    ("name", "body", r"not a string$"),
    (
        {"name": "a", "scopes": ["read"], "role": "admin"},
        "role",
        r"^unknown key 'role'; known keys: name, scopes, expires_days$",
    ),
    ({"scopes": ["read"]}, "name", r"^name is required$"),
    ({"name": None, "scopes": ["read"]}, "name", r"^name is required$"),
    ({"name": 7, "scopes": ["read"]}, "name", r"^name must be a string, not a number$"),
    ({"name": "", "scopes": ["read"]}, "name", r"^name must not be empty$"),
    ({"name": " \t\n", "scopes": ["read"]}, "name", r"^name must not be empty$"),
    (
        {"name": "x" * 101, "scopes": ["read"]},
        "name",
        r"^name is longer than 100 characters \(101\)$",
    ),
    (
        {"name": "a\x00b", "scopes": ["read"]},
        "name",
        r"^name must not contain control, format or bidirectional characters "
        r"\(found U\+0000\)$",
    ),
    ({"name": "a\nb", "scopes": ["read"]}, "name", r"found U\+000A"),
    ({"name": "a\x85b", "scopes": ["read"]}, "name", r"found U\+0085"),
    ({"name": "a\u2028b", "scopes": ["read"]}, "name", r"found U\+2028"),
    ({"name": "evil\u202egnp.exe", "scopes": ["read"]}, "name", r"found U\+202E"),
    # every bidirectional control and invisible format character (categories, not a list)
    ({"name": "a\u200eb", "scopes": ["read"]}, "name", r"found U\+200E"),
    ({"name": "a\u200fb", "scopes": ["read"]}, "name", r"found U\+200F"),
    ({"name": "a\u061cb", "scopes": ["read"]}, "name", r"found U\+061C"),
    ({"name": "a\u200bb", "scopes": ["read"]}, "name", r"found U\+200B"),
    ({"name": "a\ufeffb", "scopes": ["read"]}, "name", r"found U\+FEFF"),
    ({"name": "a\u2066b", "scopes": ["read"]}, "name", r"found U\+2066"),
    ({"name": "a\U000e0041b", "scopes": ["read"]}, "name", r"found U\+E0041"),
    (
        {"name": "a"},
        "scopes",
        r"^scopes is required: a non-empty list of read, write, audit, admin$",
    ),
    ({"name": "a", "scopes": None}, "scopes", r"^scopes is required"),
    (
        {"name": "a", "scopes": []},
        "scopes",
        r"^scopes must name at least one scope \(read, write, audit, admin\); "
        r"an empty list is refused$",
    ),
    (
        {"name": "a", "scopes": "admin"},
        "scopes",
        r"^scopes must be an array of scope names, not a string$",
    ),
    (
        {"name": "a", "scopes": {"admin": True}},
        "scopes",
        r"^scopes must be an array of scope names, not an object$",
    ),
    (
        {"name": "a", "scopes": ["read", 1]},
        "scopes",
        r"^scopes\[1\] must be a string, not a number$",
    ),
    (
        {"name": "a", "scopes": ["read", None]},
        "scopes",
        r"^scopes\[1\] must be a string, not null$",
    ),
    (
        {"name": "a", "scopes": ["*"]},
        "scopes",
        r"^unknown scope '\*'; known scopes: read, write, audit, admin$",
    ),
    ({"name": "a", "scopes": ["read", "control"]}, "scopes", r"^unknown scope 'control'"),
    ({"name": "a", "scopes": ["Admin"]}, "scopes", r"^unknown scope 'Admin'"),
    (
        {"name": "a", "scopes": ["read"], "expires_days": True},
        "expires_days",
        r"^expires_days must be an integer, not a boolean$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": "30"},
        "expires_days",
        r"^expires_days must be an integer, not a string$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": 1.5},
        "expires_days",
        r"^expires_days must be an integer, not 1\.5$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": math.nan},
        "expires_days",
        r"^expires_days must be an integer, not nan$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": 0},
        "expires_days",
        r"^expires_days must be between 1 and 3650, got 0$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": -5},
        "expires_days",
        r"^expires_days must be between 1 and 3650, got -5$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": 3651},
        "expires_days",
        r"^expires_days must be between 1 and 3650, got 3651$",
    ),
    (
        {"name": "a", "scopes": ["read"], "expires_days": 1e300},
        "expires_days",
        r"^expires_days must be between 1 and 3650, got a number of 301 digits$",  # not echoed
    ),
]


@pytest.mark.parametrize(("body", "field", "message"), REFUSALS)
def test_every_refusal_names_its_field(body: Any, field: str, message: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        tk.parse_token_request(body)
    assert caught.value.code == "VALIDATION_ERROR"
    assert caught.value.field == field
    assert caught.value.details["field"] == field
    assert re.search(message, caught.value.message), caught.value.message


@pytest.mark.parametrize(("body", "field", "message"), REFUSALS)
def test_create_token_refuses_before_writing(
    db: sqlite_utils.Database, body: Any, field: str, message: str
) -> None:
    with pytest.raises(ValidationFailed):
        tk.create_token(db, body, now=T0)
    assert tk.count_tokens(db) == 0


def test_empty_scopes_are_never_admin(db: sqlite_utils.Database) -> None:
    """The older implementation turned `scopes: []` into a full-admin token."""
    with pytest.raises(ValidationFailed) as caught:
        tk.create_token(db, {"name": "viewer", "scopes": []}, now=T0)
    assert caught.value.field == "scopes"
    assert tk.count_tokens(db) == 0


def test_nulls_count_as_absent() -> None:
    request = tk.parse_token_request({"name": "a", "scopes": ["read"], "expires_days": None})
    assert request == tk.TokenRequest(name="a", scopes=("read",), expires_days=None)


# -- records ----------------------------------------------------------------------


def test_create_answers_the_raw_token_once(db: sqlite_utils.Database) -> None:
    created = tk.create_token(
        db, {"name": " ci-bot ", "scopes": ["read", "write", "read"], "expires_days": 30}, now=T0
    )
    assert list(created) == ["id", "token", "name", "scopes", "created_at", "expires_at"]
    assert re.fullmatch(r"tok-[0-9a-f]{12}", created["id"])
    assert tk.looks_like_token(created["token"])
    assert created["name"] == "ci-bot"
    assert created["scopes"] == ["read", "write"]
    assert created["created_at"] == "2026-03-01T12:00:00.000Z"
    assert created["expires_at"] == "2026-03-31T12:00:00.000Z"
    json.dumps(created)  # JSON-ready

    listed = tk.list_tokens(db, now=T0)
    assert len(listed) == 1
    assert set(listed[0]) == LISTED_KEYS
    assert "token" not in listed[0]


def test_create_without_expiry(db: sqlite_utils.Database) -> None:
    created = create(db, ["admin"])
    assert created["expires_at"] is None
    far = T0 + dt.timedelta(days=100 * 365)
    assert isinstance(tk.authenticate(db, created["token"], now=far), tk.TokenInfo)
    assert tk.list_tokens(db, now=far)[0]["expired"] is False


def test_create_accepts_a_validated_request(db: sqlite_utils.Database) -> None:
    request = tk.TokenRequest(name="n", scopes=("audit",), expires_days=1)
    created = tk.create_token(db, request, now=T0)
    assert created["scopes"] == ["audit"]
    assert created["expires_at"] == "2026-03-02T12:00:00.000Z"


def test_the_store_holds_the_hash_not_the_token(tmp_path: Path) -> None:
    path = tmp_path / "lokid.db"
    db = open_db(path)
    created = create(db, ["admin"])
    db.close()
    data = path.read_bytes()
    for wal in tmp_path.glob("lokid.db-*"):
        data += wal.read_bytes()
    raw = created["token"]
    assert raw.encode() not in data
    assert raw[5:-6].encode() not in data  # nor the random part alone
    assert tk.token_sha256(raw).encode() in data

    db = open_db(path)
    row = next(db.query("SELECT * FROM api_tokens"))
    assert row["token_sha256"] == tk.token_sha256(raw)
    assert raw not in json.dumps(row)
    db.close()


def test_listing_shows_no_secret_and_no_hash(db: sqlite_utils.Database) -> None:
    made = [create(db, ["read"], name=f"t{i}", now=T0 + dt.timedelta(seconds=i)) for i in range(3)]
    text = json.dumps(tk.list_tokens(db, now=T0))
    for created in made:
        assert created["token"] not in text
        assert created["token"][5:-6] not in text
        assert tk.token_sha256(created["token"]) not in text
    for item in tk.list_tokens(db, now=T0):
        assert set(item) == LISTED_KEYS


def test_tokens_made_in_the_same_millisecond_list_the_later_first(
    db: sqlite_utils.Database,
) -> None:
    made = [create(db, ["read"], name=f"t{i}", now=T0)["id"] for i in range(8)]  # random ids
    assert [item["id"] for item in tk.list_tokens(db, now=T0)] == made[::-1]


def test_listing_is_newest_first_with_flags(db: sqlite_utils.Database) -> None:
    old = create(db, ["read"], name="old", expires_days=1, now=T0)
    mid = create(db, ["write"], name="mid", now=T0 + dt.timedelta(hours=1))
    new = create(db, ["audit", "read"], name="new", now=T0 + dt.timedelta(hours=2))
    tk.revoke_token(db, mid["id"], now=T0 + dt.timedelta(hours=3))

    later = T0 + dt.timedelta(days=2)
    listed = tk.list_tokens(db, now=later)
    assert [item["id"] for item in listed] == [new["id"], mid["id"], old["id"]]
    by_name = {item["name"]: item for item in listed}
    assert by_name["old"] == {
        "id": old["id"],
        "name": "old",
        "scopes": ["read"],
        "created_at": "2026-03-01T12:00:00.000Z",
        "expires_at": "2026-03-02T12:00:00.000Z",
        "last_used_at": None,
        "revoked_at": None,
        "revoked": False,
        "expired": True,
    }
    assert by_name["mid"]["revoked"] is True
    assert by_name["mid"]["revoked_at"] == "2026-03-01T15:00:00.000Z"
    assert by_name["mid"]["expired"] is False
    assert by_name["new"]["scopes"] == ["audit", "read"]
    assert tk.list_tokens(db, now=T0)[-1]["expired"] is False  # as of `now`

    assert tk.count_tokens(db) == 3
    assert [i["id"] for i in tk.list_tokens(db, now=later, limit=1)] == [new["id"]]
    assert [i["id"] for i in tk.list_tokens(db, now=later, limit=5, offset=1)] == [
        mid["id"],
        old["id"],
    ]


def test_names_need_not_be_unique(db: sqlite_utils.Database) -> None:
    first = create(db, name="ci")
    second = create(db, name="ci")
    assert first["id"] != second["id"]
    assert tk.count_tokens(db) == 2


def test_revoke_unknown_token_is_not_found(db: sqlite_utils.Database) -> None:
    with pytest.raises(NotFound) as caught:
        tk.revoke_token(db, "tok-000000000000", now=T0)
    assert caught.value.message == "Token not found"
    assert caught.value.code == "NOT_FOUND"
    assert caught.value.details == {"token_id": "tok-000000000000"}
    with pytest.raises(NotFound):
        tk.get_token(db, "nope")


def test_revoking_twice_keeps_the_first_revoked_at(db: sqlite_utils.Database) -> None:
    created = create(db, ["admin"])
    first = tk.revoke_token(db, created["id"], now=T0 + dt.timedelta(minutes=1))
    again = tk.revoke_token(db, created["id"], now=T0 + dt.timedelta(minutes=9))
    assert first["revoked"] is True
    assert first["revoked_at"] == "2026-03-01T12:01:00.000Z"
    assert again == first
    assert set(first) == LISTED_KEYS
    assert tk.get_token(db, created["id"], now=T0) == first


def test_naive_now_is_refused(db: sqlite_utils.Database) -> None:
    with pytest.raises(ValueError, match="aware"):
        create(db, now=dt.datetime(2026, 1, 1))


# -- authentication ---------------------------------------------------------------


def test_a_valid_token_authenticates(db: sqlite_utils.Database) -> None:
    created = create(db, ["write", "audit"], name="ci-bot", expires_days=30)
    info = tk.authenticate(db, created["token"], now=T0 + dt.timedelta(days=1))
    assert info == tk.TokenInfo(
        id=created["id"],
        name="ci-bot",
        scopes=frozenset({"write", "audit"}),
        expires_at=created["expires_at"],
        last_used_at=None,
    )
    assert isinstance(info, tk.TokenInfo)
    assert info.grants("read")
    assert not info.grants("admin")


@pytest.mark.parametrize(
    "raw",
    ["", "Bearer x", "loki_", "loki_" + "a" * 49, "not a token at all", "ghp_" + "a" * 36],
)
def test_malformed_tokens_fail_without_a_store_read(raw: str) -> None:
    outcome = tk.authenticate(NO_STORE, raw, now=T0)
    assert outcome == tk.AuthFailure(tk.FailureReason.MALFORMED)
    assert isinstance(outcome, tk.AuthFailure)
    assert outcome.token_id is None
    assert outcome.message.startswith("Invalid token")


def test_a_typo_in_a_stored_token_is_malformed(db: sqlite_utils.Database) -> None:
    raw = create(db)["token"]
    position = 20
    char = "A" if raw[position] != "A" else "B"
    typo = raw[:position] + char + raw[position + 1 :]
    assert tk.authenticate(NO_STORE, typo, now=T0) == tk.AuthFailure(tk.FailureReason.MALFORMED)


def test_a_well_formed_unknown_token(db: sqlite_utils.Database) -> None:
    create(db)
    outcome = tk.authenticate(db, tk.generate_token(), now=T0)
    assert outcome == tk.AuthFailure(tk.FailureReason.UNKNOWN)
    assert isinstance(outcome, tk.AuthFailure)
    assert outcome.message == "Invalid token"


def test_expired_from_expires_at_on(db: sqlite_utils.Database) -> None:
    created = create(db, ["admin"], expires_days=1)
    expires = T0 + dt.timedelta(days=1)
    before = expires - dt.timedelta(milliseconds=1)
    assert isinstance(tk.authenticate(db, created["token"], now=before), tk.TokenInfo)
    for moment in (expires, expires + dt.timedelta(days=400)):
        outcome = tk.authenticate(db, created["token"], now=moment)
        assert outcome == tk.AuthFailure(tk.FailureReason.EXPIRED, created["id"])
        assert isinstance(outcome, tk.AuthFailure)
        assert outcome.message == "Token expired"


def test_revoked(db: sqlite_utils.Database) -> None:
    created = create(db, ["admin"])
    keep = create(db, ["admin"], name="other")
    tk.revoke_token(db, created["id"], now=T0)
    outcome = tk.authenticate(db, created["token"], now=T0)
    assert outcome == tk.AuthFailure(tk.FailureReason.REVOKED, created["id"])
    assert isinstance(outcome, tk.AuthFailure)
    assert outcome.message == "Token revoked"
    assert isinstance(tk.authenticate(db, keep["token"], now=T0), tk.TokenInfo)


def test_revoked_and_expired_reports_revoked(db: sqlite_utils.Database) -> None:
    created = create(db, ["read"], expires_days=1)
    tk.revoke_token(db, created["id"], now=T0)
    outcome = tk.authenticate(db, created["token"], now=T0 + dt.timedelta(days=5))
    assert outcome == tk.AuthFailure(tk.FailureReason.REVOKED, created["id"])


@pytest.mark.parametrize("stored", ["[]", "not json", '"admin"', '{"admin": 1}', "[1, 2]"])
def test_unreadable_or_empty_stored_scopes_grant_nothing(
    db: sqlite_utils.Database, stored: str
) -> None:
    """A hand-edited row fails closed: its token authenticates and may do nothing."""
    created = create(db, ["admin"])
    db.execute("UPDATE api_tokens SET scopes = ? WHERE id = ?", (stored, created["id"]))
    info = tk.authenticate(db, created["token"], now=T0)
    assert isinstance(info, tk.TokenInfo)
    assert info.scopes == frozenset()
    assert not any(info.grants(scope) for scope in ALL_SCOPES)
    assert tk.list_tokens(db, now=T0)[0]["scopes"] == []


def test_an_unreadable_expiry_counts_as_expired(db: sqlite_utils.Database) -> None:
    created = create(db, ["admin"], expires_days=5)
    db.execute("UPDATE api_tokens SET expires_at = 'soon' WHERE id = ?", (created["id"],))
    outcome = tk.authenticate(db, created["token"], now=T0)
    assert outcome == tk.AuthFailure(tk.FailureReason.EXPIRED, created["id"])


# -- last_used_at -----------------------------------------------------------------


def stored_last_used(db: sqlite_utils.Database, token_id: str) -> str | None:
    value: str | None = next(
        db.query("SELECT last_used_at FROM api_tokens WHERE id = ?", [token_id])
    )["last_used_at"]
    return value


def test_touch_last_used_writes_at_most_once_a_minute(db: sqlite_utils.Database) -> None:
    created = create(db)
    token_id = created["id"]
    assert tk.touch_last_used(db, token_id, T0) is True
    assert stored_last_used(db, token_id) == "2026-03-01T12:00:00.000Z"

    # A burst within the minute writes nothing.
    for ms in range(0, 60_000, 997):
        assert tk.touch_last_used(db, token_id, T0 + dt.timedelta(milliseconds=ms)) is False
    assert stored_last_used(db, token_id) == "2026-03-01T12:00:00.000Z"

    assert tk.touch_last_used(db, token_id, T0 + dt.timedelta(seconds=60)) is True
    assert stored_last_used(db, token_id) == "2026-03-01T12:01:00.000Z"
    # Never backwards.
    assert tk.touch_last_used(db, token_id, T0) is False
    assert stored_last_used(db, token_id) == "2026-03-01T12:01:00.000Z"
    assert tk.list_tokens(db, now=T0)[0]["last_used_at"] == "2026-03-01T12:01:00.000Z"


def test_touch_of_an_unknown_token_writes_nothing(db: sqlite_utils.Database) -> None:
    assert tk.touch_last_used(db, "tok-000000000000", T0) is False


def test_writes_stay_bounded_under_load(db: sqlite_utils.Database) -> None:
    """One request every 100 ms for 10 minutes: 6,000 requests, 10 token writes."""
    created = create(db)
    writes = 0
    for step in range(6000):
        now = T0 + dt.timedelta(milliseconds=100 * step)
        info = tk.authenticate(db, created["token"], now=now)
        assert isinstance(info, tk.TokenInfo)
        if info.needs_touch(now):
            assert tk.touch_last_used(db, info.id, now)
            writes += 1
        else:
            assert not tk.touch_last_used(db, info.id, now)
    assert writes == 10


def test_needs_touch() -> None:
    info = tk.TokenInfo(id="tok-1", name="n", scopes=frozenset(), last_used_at=None)
    assert info.needs_touch(T0)
    seen = tk.TokenInfo(id="tok-1", name="n", scopes=frozenset(), last_used_at=iso(T0))
    assert not seen.needs_touch(T0 + dt.timedelta(seconds=59, milliseconds=999))
    assert seen.needs_touch(T0 + dt.timedelta(seconds=60))


# -- properties -------------------------------------------------------------------

_SHARED = open_db()
_SHARED_TOKENS = [create(_SHARED, [scope], name=scope)["token"] for scope in ALL_SCOPES]


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.text(),
        st.text(alphabet=tk.ALPHABET + "_", min_size=50, max_size=58).map(lambda s: "loki_" + s),
        st.from_regex(r"loki_[0-9A-Za-z]{49}", fullmatch=True),
        # Right shape and checksum, random body: passes `looks_like_token`, not the store.
        st.text(alphabet=tk.ALPHABET, min_size=43, max_size=43).map(
            lambda s: "loki_" + s + tk.checksum("loki_" + s)
        ),
    )
)
def test_random_strings_never_authenticate(raw: str) -> None:
    outcome = tk.authenticate(_SHARED, raw, now=T0)
    assert isinstance(outcome, tk.AuthFailure)
    assert outcome.reason in {tk.FailureReason.MALFORMED, tk.FailureReason.UNKNOWN}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp")),
        min_size=1,
        max_size=100,
    ).filter(lambda s: s.strip() != ""),
    scopes=st.lists(st.sampled_from(ALL_SCOPES), min_size=1, max_size=6),
    expires_days=st.one_of(st.none(), st.integers(1, 3650)),
    age=st.integers(0, 3650 * 86400 - 1),
)
def test_generated_tokens_always_round_trip(
    name: str, scopes: list[str], expires_days: int | None, age: int
) -> None:
    db = open_db()
    created = tk.create_token(
        db, {"name": name, "scopes": scopes, "expires_days": expires_days}, now=T0
    )
    assert tk.looks_like_token(created["token"])
    now = T0 + dt.timedelta(seconds=age)
    info = tk.authenticate(db, created["token"], now=now)
    expected_expired = expires_days is not None and age >= expires_days * 86400
    if expected_expired:
        assert info == tk.AuthFailure(tk.FailureReason.EXPIRED, created["id"])
    else:
        assert isinstance(info, tk.TokenInfo)
        assert info.id == created["id"]
        assert info.name == name.strip()
        assert info.scopes == frozenset(scopes)
        assert all(info.grants(s) for s in scopes)
    db.close()


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, 53), char=st.sampled_from(tk.ALPHABET + "_-. "))
def test_any_substitution_in_a_real_token_is_refused(position: int, char: str) -> None:
    raw = _SHARED_TOKENS[0]
    typo = raw[:position] + char + raw[position + 1 :]
    outcome = tk.authenticate(_SHARED, typo, now=T0)
    if typo == raw:
        assert isinstance(outcome, tk.TokenInfo)
    else:
        assert outcome == tk.AuthFailure(tk.FailureReason.MALFORMED)


# -- through the store actor ------------------------------------------------------


@contextlib.asynccontextmanager
async def running(store: StoreActor) -> AsyncIterator[StoreActor]:
    status = StubChildStatus()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(store.run, task_status=status))
        with trio.fail_after(WAIT):
            await status.started_event.wait()
        yield store
        status.shutdown_requested.set()


async def test_records_run_inside_the_store_actor(tmp_path: Path) -> None:
    store = StoreActor(tmp_path / "data" / "lokid.db", group_window=0)
    async with running(store):
        body = {"name": "admin", "scopes": ["admin"]}
        created = await store.write(lambda db: tk.create_token(db, body, now=T0))
        raw = created["token"]
        # Authentication is a read: it runs on a read-only connection.
        info = await store.read(lambda db: tk.authenticate(db, raw, now=T0))
        assert isinstance(info, tk.TokenInfo)
        assert info.needs_touch(T0)
        assert await store.write(lambda db: tk.touch_last_used(db, info.id, T0)) is True
        assert await store.write(lambda db: tk.touch_last_used(db, info.id, T0)) is False
        listed = await store.read(lambda db: tk.list_tokens(db, now=T0))
        assert [item["last_used_at"] for item in listed] == [iso(T0)]
        with pytest.raises(NotFound):
            await store.write(lambda db: tk.revoke_token(db, "tok-ffffffffffff", now=T0))
        await store.write(lambda db: tk.revoke_token(db, info.id, now=T0))
        outcome = await store.read(lambda db: tk.authenticate(db, raw, now=T0))
        assert outcome == tk.AuthFailure(tk.FailureReason.REVOKED, info.id)
