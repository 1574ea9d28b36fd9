"""The audit log: the pure chain (hash, verify, actions, queries) and the writer on real stores.

Tamper tests change a real store file behind lokid's back with plain
`sqlite3` statements, as someone with access to the file would, and check
that `verify_store` names the first bad entry and the right reason.
"""

from __future__ import annotations

import contextlib
import functools
import http
import json
import pathlib
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import attrs
import pytest
import sqlite_utils
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from lokid import audit
from lokid.actors import audit_writer
from lokid.actors.audit_writer import (
    MISMATCH_ACTION,
    AuditUnavailable,
    AuditWriter,
    audit_summary,
    chain,
    entry_from_row,
    insert_rows,
    list_audit,
    verify_store,
)
from lokid.actors.store import StoreActor
from lokid.audit import (
    GENESIS,
    MAX_OFFSET,
    Anchor,
    AuditEntry,
    AuditQuery,
    ChainReport,
    Head,
    Problem,
    action_for,
    action_matches,
    canonical_json,
    classify,
    entry_hash,
    normalise,
    parse_timestamp,
    resume_head,
    verify,
)
from lokid.errors import ActorUnavailable, AskTimeout, InvalidQuery
from lokid.http.convert import dumps
from lokid.migrations import migrate

from .child_status import StubChildStatus

WAIT = 10.0  # the bound of every wait on a real store in this file


# -- helpers -----------------------------------------------------------------------


def make_chain(count: int) -> list[AuditEntry]:
    """`count` valid entries, built the way the writer builds them."""
    entries: list[AuditEntry] = []
    prev = GENESIS
    for n in range(1, count + 1):
        fields = normalise(
            actor=f"tok-{n % 3}",
            action=("session.create", "task.move", "token.revoke")[n % 3],
            resource=f"session-{n}",
            method="POST",
            path=f"/api/sessions/session-{n}/stop",
            status=200 if n % 4 else 409,
            ip="127.0.0.1",
            details={"n": n, "note": "café"},
        )
        full = {
            **fields,
            "id": n,
            "timestamp": f"2026-11-28T12:00:{n % 60:02d}.000Z",
            "prev_hash": prev,
        }
        digest = entry_hash(prev, full)
        entries.append(AuditEntry(hash=digest, **full))
        prev = digest
    return entries


def anchor_of(entries: list[AuditEntry]) -> Anchor | None:
    return Anchor(entries[-1].id, entries[-1].hash, entries[-1].id) if entries else None


def db_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "data" / "lokid.db"


@contextlib.asynccontextmanager
async def running(
    path: pathlib.Path, **options: Any
) -> AsyncIterator[tuple[StoreActor, AuditWriter]]:
    """A store and an audit writer on `path`; stopped gracefully (the writer first) at exit."""
    store = StoreActor(path)
    writer = AuditWriter(store, **options)
    store_status, writer_status = StubChildStatus(), StubChildStatus()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, task_status=store_status))
            await store_status.started_event.wait()
            async with trio.open_nursery() as inner:
                inner.start_soon(functools.partial(writer.run, task_status=writer_status))
                await writer_status.started_event.wait()
                yield store, writer
                writer_status.shutdown_requested.set()
            store_status.shutdown_requested.set()


async def append_n(writer: AuditWriter, count: int) -> list[AuditEntry]:
    return [
        await writer.append(
            actor="uid:1000",
            action=action_for("POST", f"/api/sessions/s-{n}/stop"),
            resource=f"s-{n}",
            method="POST",
            path=f"/api/sessions/s-{n}/stop",
            status=200,
            ip="127.0.0.1",
            details={"n": n},
        )
        for n in range(count)
    ]


async def make_log(tmp_path: pathlib.Path, count: int = 10) -> pathlib.Path:
    path = db_path(tmp_path)
    async with running(path) as (_, writer):
        await append_n(writer, count)
    return path


@contextlib.contextmanager
def raw(path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    """A plain connection to the file, as someone editing it behind lokid's back."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def tamper(path: pathlib.Path, *statements: str) -> None:
    with raw(path) as conn:
        for sql in statements:
            conn.execute(sql)


def verify_file(path: pathlib.Path, *, page: int = 2000) -> ChainReport:
    with raw(path) as conn:
        return verify_store(sqlite_utils.Database(conn), page=page)


def swap_ids(a: int, b: int) -> tuple[str, ...]:
    return (
        f"UPDATE audit_log SET id = -1 WHERE id = {a}",
        f"UPDATE audit_log SET id = {a} WHERE id = {b}",
        f"UPDATE audit_log SET id = {b} WHERE id = -1",
    )


# -- canonical form and hash ---------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
hashed_fields = st.fixed_dictionaries(
    {
        "id": st.integers(min_value=1, max_value=2**62),
        "timestamp": st.text(max_size=30),
        "actor": st.text(max_size=30),
        "action": st.text(max_size=30),
        "resource": st.none() | st.text(max_size=30),
        "method": st.none() | st.text(max_size=8),
        "path": st.none() | st.text(max_size=40),
        "status": st.none() | st.integers(min_value=-1000, max_value=1000),
        "ip": st.none() | st.text(max_size=20),
        "details": st.dictionaries(st.text(max_size=8), json_values, max_size=4),
        "prev_hash": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    }
)


def definition(fields: dict[str, Any]) -> str:
    """DESIGN.md §7's canonical JSON, literally: what `canonical_json` must equal."""
    return json.dumps(
        {k: v for k, v in fields.items() if k != "hash"},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


@settings(max_examples=300, deadline=None)
@given(hashed_fields)
def test_canonical_json_is_the_definition(fields: dict[str, Any]) -> None:
    assert canonical_json(fields) == definition(fields)
    assert canonical_json({**fields, "hash": "ignored"}) == definition(fields)


@settings(max_examples=300, deadline=None)
@given(hashed_fields)
def test_the_writers_chained_hash_is_entry_hash(fields: dict[str, Any]) -> None:
    import hashlib

    stored = {k: v for k, v in fields.items() if k not in ("id", "timestamp", "prev_hash")}
    text = fields["prev_hash"] + definition(fields)
    expected = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    digest = audit.chained_hash(
        fields["prev_hash"],
        stored,
        fields["id"],
        fields["timestamp"],
        audit.details_json(fields["details"]),
    )
    assert digest == expected == entry_hash(fields["prev_hash"], fields)


entry_fields = hashed_fields.map(
    lambda fields: {k: v for k, v in fields.items() if k not in ("id", "timestamp", "prev_hash")}
)
odd_fields = st.sampled_from(
    [{}, {}, {"status": True}, {"status": "200"}, {"actor": 5}, {"ip": 7}, {"details": "text"}]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(entry_fields, odd_fields), min_size=1, max_size=5),
    st.text(max_size=70) | st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    st.text(max_size=30) | st.just("2026-11-29T12:00:00.000Z"),
    st.integers(min_value=0, max_value=2**62),
)
def test_a_batchs_rows_are_hashed_by_the_definition(
    entries: list[tuple[dict[str, Any], dict[str, Any]]], last_hash: str, timestamp: str, last: int
) -> None:
    """`chain` builds each canonical JSON in one f-string; odd heads (text JSON must
    escape), timestamps and field values take the general path: the same hashes."""
    import hashlib

    merged = [{**fields, **odd} for fields, odd in entries]
    items = [(fields, audit.details_json(fields["details"])) for fields in merged]
    rows = chain(Head(last, last_hash), items, timestamp)
    prev_hash = last_hash
    for n, ((fields, _), row) in enumerate(zip(items, rows, strict=True), start=1):
        full = {**fields, "id": last + n, "timestamp": timestamp, "prev_hash": prev_hash}
        text = prev_hash + definition(full)
        assert row[-1] == hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        assert (row[0], row[1], row[10]) == (last + n, timestamp, prev_hash)
        prev_hash = row[-1]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_details_json_is_sorted_compact_json(details: dict[str, Any]) -> None:
    assert audit.details_json(details) == json.dumps(
        details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def test_details_json_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        audit.details_json({"when": object()})
    with pytest.raises(ValueError, match="not JSON compliant"):
        audit.details_json({"x": float("nan")})


@pytest.mark.parametrize(
    "odd",
    [{"status": True}, {"status": "200"}, {"actor": 5}, {"id": 3.0}, {"details": "text"}],
)
def test_canonical_json_of_edited_values_is_still_the_definition(odd: dict[str, Any]) -> None:
    fields = {**make_chain(1)[0].fields(), **odd}
    assert canonical_json(fields) == definition(fields)


def test_entry_hash_is_sha256_of_prev_hash_and_canonical_json() -> None:
    import hashlib

    entry = make_chain(1)[0]
    expected = hashlib.sha256((GENESIS + definition(entry.fields())).encode()).hexdigest()
    assert entry.hash == expected
    assert entry.prev_hash == GENESIS == "0" * 64


def test_id_and_prev_hash_are_hashed() -> None:
    entry = make_chain(1)[0]
    assert entry_hash(GENESIS, {**entry.fields(), "id": 2}) != entry.hash
    assert entry_hash(GENESIS, {**entry.fields(), "prev_hash": "f" * 64}) != entry.hash


def test_normalise_bounds_and_cleans_fields() -> None:
    details: dict[Any, Any] = {1: "int key", "t": (1, 2), "p": pathlib.Path("/x")}
    fields = normalise(
        actor="a" * 500,
        action="session.create",
        method="post",
        path="/api/x\udcff" + "y" * 5000,
        status=201,
        details=details,
    )
    assert len(fields["actor"]) == audit.MAX_ACTOR and fields["actor"].endswith("…")
    assert fields["method"] == "POST"
    assert "\udcff" not in fields["path"] and len(fields["path"]) == audit.MAX_PATH
    assert fields["details"] == {"1": "int key", "t": [1, 2], "p": "/x"}
    json.dumps(fields, ensure_ascii=False).encode("utf-8")  # storable as is
    with pytest.raises(TypeError):
        normalise(actor="a", action="b", status=True)


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("actor", audit.MAX_ACTOR),
        ("action", audit.MAX_ACTION),
        ("resource", audit.MAX_RESOURCE),
        ("path", audit.MAX_PATH),
        ("ip", audit.MAX_IP),
    ],
)
def test_normalise_keeps_short_ascii_text_and_cleans_every_other_value(
    name: str, limit: int
) -> None:
    """Each text field: short ASCII text as given; longer text cut to the limit; text
    that is not UTF-8-encodable cleaned; other types as `str`."""

    def field(value: Any) -> Any:
        given = {"actor": "a", "action": "b", name: value}
        return normalise(**given)[name]

    short = "x" * limit
    assert field(short) is short
    assert field(short + "y") == "x" * (limit - 1) + "…"
    assert field("caf\u00e9") == "caf\u00e9"
    assert field("bad\udcff") == "bad?"
    assert field(12345) == "12345"


def test_normalise_takes_int_subclasses_as_status_but_not_bools() -> None:
    assert normalise(actor="a", action="b", status=http.HTTPStatus.CREATED)["status"] == 201
    assert normalise(actor="a", action="b", status=None)["status"] is None
    bad: Any
    for bad in (True, 201.0, "201"):
        with pytest.raises(TypeError, match="status must be an int or None"):
            normalise(actor="a", action="b", status=bad)


def test_normalise_replaces_details_it_cannot_store() -> None:
    nan = normalise(actor="a", action="b", details={"x": float("nan")})["details"]
    assert set(nan) == {"_unrecordable"}
    big = normalise(actor="a", action="b", details={"x": "y" * 20_000})["details"]
    assert big["_truncated"] is True and big["_bytes"] > audit.MAX_DETAILS_BYTES


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=70), json_values, max_size=40))
def test_normalised_details_survive_storage_unchanged(details: dict[str, Any]) -> None:
    stored = normalise(actor="a", action="b", details=details)["details"]
    assert json.loads(audit.details_json(stored)) == stored


plain_details = st.dictionaries(
    st.text(max_size=70),
    st.none() | st.booleans() | st.integers() | st.text(max_size=300),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(plain_details)
def test_the_plain_details_shortcut_equals_the_round_trip(details: dict[str, Any]) -> None:
    expected = json.loads(json.dumps(details).encode("utf-8", "replace"))
    stored = normalise(actor="a", action="b", details=details)["details"]
    if len(json.dumps(details, ensure_ascii=False).encode()) <= audit.MAX_DETAILS_BYTES:
        assert stored == expected
        assert audit.details_json(stored) == audit.details_json(expected)


# -- verify (pure) -----------------------------------------------------------------------


def test_valid_chains_verify() -> None:
    entries = make_chain(5)
    report = verify(entries, anchor_of(entries))
    assert report.valid and report.problem is None and report.first_bad_id is None
    assert (report.entries_checked, report.head_id, report.head_hash) == (5, 5, entries[-1].hash)
    empty = verify([], None)
    assert empty.valid and empty.head_id == 0 and empty.head_hash == GENESIS


def bad(entries: list[AuditEntry], anchor: Anchor | None) -> tuple[Problem | None, int | None]:
    report = verify(entries, anchor)
    assert not report.valid and report.message
    return report.problem, report.first_bad_id


def test_verify_names_the_first_problem() -> None:
    entries = make_chain(8)
    anchor = anchor_of(entries)
    edited = list(entries)
    edited[3] = attrs.evolve(entries[3], actor="someone-else")
    assert bad(edited, anchor) == (Problem.EDITED, 4)
    rehashed = list(entries)
    forged = attrs.evolve(entries[3], actor="x")
    rehashed[3] = attrs.evolve(forged, hash=entry_hash(forged.prev_hash, forged.fields()))
    assert bad(rehashed, anchor) == (Problem.BROKEN_LINK, 5)
    assert bad(entries[:2] + entries[4:], anchor) == (Problem.GAP, 3)
    assert bad(entries[1:], anchor) == (Problem.GAP, 1)
    assert bad(entries[:6], anchor) == (Problem.TRUNCATED, 7)
    assert bad([], anchor) == (Problem.TRUNCATED, 1)
    assert bad(entries, None) == (Problem.ANCHOR_MISSING, None)
    assert bad(entries, Anchor(8, "f" * 64, 8)) == (Problem.ANCHOR_MISMATCH, 8)
    assert bad(entries, Anchor(6, entries[5].hash, 6)) == (Problem.ANCHOR_MISMATCH, 7)
    assert bad(entries, Anchor(8, entries[7].hash, 9)) == (Problem.ANCHOR_MISMATCH, None)
    assert bad([entries[0], entries[2], entries[1]], anchor) == (Problem.GAP, 2)


@pytest.mark.parametrize(
    ("anchor", "first_bad", "head"),
    [
        (lambda e: Anchor(6, e[5].hash, 6), 7, 6),  # 7 and 8 appended past the anchor
        (lambda e: Anchor(6, "f" * 64, 6), 6, 5),  # ... and 6 is not the anchored one
        (lambda e: Anchor(8, "f" * 64, 8), 8, 7),
        (lambda e: Anchor(0, GENESIS, 0), 1, 0),  # the anchor of an empty log
        (lambda e: Anchor(8, e[7].hash, 9), None, 8),  # the count edited: entries good
        (lambda e: None, None, 8),
    ],
    ids=["appended", "appended-and-rewritten", "head-rewritten", "empty-anchor", "count", "none"],
)
def test_the_head_is_the_last_entry_found_good_never_the_first_bad(
    anchor: Callable[[list[AuditEntry]], Anchor | None], first_bad: int | None, head: int
) -> None:
    """`loki audit verify` prints `first bad` and `last good`: never the same entry."""
    entries = make_chain(8)
    report = verify(entries, anchor(entries))
    assert (report.valid, report.first_bad_id, report.head_id) == (False, first_bad, head)
    assert report.head_hash == (entries[head - 1].hash if head else GENESIS)
    assert report.problem in (Problem.ANCHOR_MISMATCH, Problem.ANCHOR_MISSING)


def test_the_head_stops_before_any_bad_entry() -> None:
    entries = make_chain(8)
    cases = [
        (entries[:2] + entries[4:], anchor_of(entries)),  # gap
        ([*entries[:3], attrs.evolve(entries[3], actor="x"), *entries[4:]], anchor_of(entries)),
        (entries[:6], anchor_of(entries)),  # truncated
    ]
    for entries_given, anchor in cases:
        report = verify(entries_given, anchor)
        assert report.first_bad_id is not None and report.head_id < report.first_bad_id
        assert report.head_hash == entries[report.head_id - 1].hash


def test_a_renumbered_entry_is_reported_as_reordered() -> None:
    entries = make_chain(8)
    swapped = list(entries)
    swapped[2] = attrs.evolve(entries[6], id=3)  # the rows of 3 and 7 trade ids
    swapped[6] = attrs.evolve(entries[2], id=7)
    report = verify(swapped, anchor_of(entries))
    assert (report.problem, report.first_bad_id) == (Problem.REORDERED, 3)
    assert "written as 7" in report.message
    assert report.entries_checked == 3
    adjacent = list(entries)
    adjacent[4], adjacent[5] = attrs.evolve(entries[5], id=5), attrs.evolve(entries[4], id=6)
    assert bad(adjacent, anchor_of(entries)) == (Problem.REORDERED, 5)


def test_verifier_reads_no_further_than_it_needs() -> None:
    entries = make_chain(6)
    verifier = audit.ChainVerifier(anchor_of(entries))
    verifier.feed(entries[:2] + entries[3:4])  # a gap: nothing after it matters
    assert not verifier.wants_more
    verifier.feed(entries[4:])
    assert verifier.finish().entries_checked == 2


@pytest.mark.parametrize(
    ("anchor", "newest", "expected"),
    [
        (None, None, Head(0, GENESIS)),
        (Anchor(5, "a" * 64, 5), (5, "a" * 64), Head(5, "a" * 64)),
        (None, (5, "a" * 64), Head(5, GENESIS, "anchor missing")),
        (Anchor(5, "a" * 64, 5), None, Head(5, "a" * 64, "truncated")),
        (Anchor(5, "a" * 64, 5), (3, "c" * 64), Head(5, "a" * 64, "truncated")),
        (Anchor(5, "a" * 64, 5), (7, "c" * 64), Head(7, "a" * 64, "beyond")),
        (Anchor(5, "a" * 64, 5), (5, "c" * 64), Head(5, "a" * 64, "differs")),
        (Anchor(5, "a" * 64, 4), (5, "a" * 64), Head(5, "a" * 64, "counts")),
        # an anchor edited by hand to another type: continued from the genesis hash
        (Anchor(5, cast(str, b"\xff"), 5), (5, "a" * 64), Head(5, GENESIS, "last_hash X'FF'")),
        (Anchor(5, "\udcff", 5), (5, "a" * 64), Head(5, GENESIS, "last_hash")),
        (Anchor(5, "a" * 63, 5), (5, "a" * 63), Head(5, GENESIS, "not a SHA-256")),
        (Anchor(cast(int, "x"), "a" * 64, 5), (5, "a" * 64), Head(5, GENESIS, "last_id 'x'")),
        (Anchor(cast(int, 9.5), "a" * 64, 5), None, Head(0, GENESIS, "last_id 9.5")),
        (Anchor(2**63 - 1, "a" * 64, 5), (5, "a" * 64), Head(5, GENESIS, "last_id")),
        (Anchor(7, cast(str, None), 5), (5, "a" * 64), Head(7, GENESIS, "last_hash None")),
    ],
)
def test_resume_head_never_repairs(
    anchor: Anchor | None, newest: tuple[int, str] | None, expected: Head
) -> None:
    head = resume_head(anchor, newest)
    assert (head.last_id, head.last_hash) == (expected.last_id, expected.last_hash)
    if expected.problem is None:
        assert head.problem is None
    else:
        assert head.problem is not None and expected.problem in head.problem


def test_an_entry_past_the_last_id_is_a_problem_the_chain_goes_on_below() -> None:
    """An entry id past `MAX_ID` (an edited row) would leave no next id: not followed."""
    head = resume_head(Anchor(5, "a" * 64, 5), (5, "a" * 64), beyond=2**63 - 1)
    assert (head.last_id, head.last_hash) == (5, "a" * 64)
    assert head.problem is not None and f"entry {2**63 - 1} lies past" in head.problem
    head = resume_head(Anchor(7, "a" * 64, 7), (5, "a" * 64), beyond=2**62 + 1)
    assert head.last_id == 7 and head.problem is not None and "; truncated" in head.problem


# -- actions and queries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "action", "resource"),
    [
        ("POST", "/api/sessions", "session.create", None),
        ("post", "/api/sessions/", "session.create", None),
        ("POST", "/api/sessions/session-1/stop", "session.stop", "session-1"),
        ("POST", "/api/sessions/session-1/stop?force=1", "session.stop", "session-1"),
        ("DELETE", "/api/sessions/session-1", "session.delete", "session-1"),
        ("POST", "/api/enterprise/tokens", "token.create", None),
        ("DELETE", "/api/enterprise/tokens/tok-1", "token.revoke", "tok-1"),
        ("PUT", "/api/projects/proj-1", "project.update", "proj-1"),
        ("POST", "/api/tasks/task-9/move", "task.move", "task-9"),
        ("POST", "/api/registry/sync", "registry.sync", None),
        ("POST", "/api/unknown/thing", "post /api/unknown/thing", None),
        ("GET", "/api/sessions", "get /api/sessions", None),
        ("POST", "/api/sessions//stop", "post /api/sessions//stop", None),
    ],
)
def test_actions_of_routes(method: str, path: str, action: str, resource: str | None) -> None:
    assert classify(method, path) == audit.Route(action, resource)
    assert action_for(method, path) == action


def test_every_route_action_is_a_family_member() -> None:
    for _, template, action in audit.ROUTE_ACTIONS:
        family, _, verb = action.partition(".")
        assert family and verb, template
        assert action_matches(f"{family}.*", action)


@pytest.mark.parametrize(
    ("pattern", "action", "matches"),
    [
        ("session.*", "session.create", True),
        ("session.*", "sessions.create", False),
        ("session.*", "session", False),
        ("session.create", "session.create", True),
        ("session.create", "session.created", False),
    ],
)
def test_action_filters_match_in_python_and_sql(pattern: str, action: str, matches: bool) -> None:
    assert action_matches(pattern, action) is matches
    sql, params = audit.action_sql(pattern)
    conn = sqlite3.connect(":memory:")
    found = conn.execute(f"SELECT 1 FROM (SELECT ? AS action) WHERE {sql}", [action, *params])
    assert (found.fetchone() is not None) is matches


@pytest.mark.parametrize("value", ["", "*", "session*", "*.create", "a.b*", "x" * 201, "a b.*"])
def test_bad_action_filters_are_400(value: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        AuditQuery.parse(action=value)
    assert caught.value.field == "action"


@pytest.mark.parametrize(
    ("value", "end", "expected"),
    [
        ("2026-11-28", False, "2026-11-28T00:00:00.000Z"),
        ("2026-11-28", True, "2026-11-29T00:00:00.000Z"),
        ("2026-11-28T12:30Z", False, "2026-11-28T12:30:00.000Z"),
        ("2026-11-28T12:30:05+02:00", False, "2026-11-28T10:30:05.000Z"),
        ("2026-11-28T12:30:05.1234Z", False, "2026-11-28T12:30:05.124Z"),
        ("2026-11-28T12:30:05.123000001Z", True, "2026-11-28T12:30:05.124Z"),
        ("2026-12-31T23:59:59.9999999Z", False, "2027-01-01T00:00:00.000Z"),
    ],
)
def test_timestamps_parse_strictly(value: str, end: bool, expected: str) -> None:
    assert parse_timestamp(value, field="start", end=end) == expected


@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "2026-11-28T12:30:00",  # which zone?
        "2026-11-28 12:30:00Z",
        "2026-11-28T12:30:00 01:00",  # an unescaped + in a query string
        "2026-13-01",
        "2026-02-30",
        "2026-11-28T25:00Z",
        "28/11/2026",
        "2026-W48",
        "\uff12\uff10\uff12\uff16-11-28",  # fullwidth digits
        "1700000000",
    ],
)
def test_bad_timestamps_are_400_naming_the_parameter(value: str) -> None:
    with pytest.raises(InvalidQuery) as caught:
        AuditQuery.parse(end=value)
    assert caught.value.field == "end"
    assert caught.value.code == "BAD_REQUEST"


def test_a_bound_past_the_ends_of_time_is_no_bound_or_a_clear_400() -> None:
    """`end=9999-12-31` means up to the end (its next day does not exist); a bound that
    would match nothing says the range, never "date value out of range"."""
    assert parse_timestamp("9999-12-31", field="end", end=True) is None
    assert AuditQuery.parse(start="2026-01-01", end="9999-12-31").end is None
    assert parse_timestamp("9999-12-31T23:00-02:00", field="end", end=True) is None
    assert parse_timestamp("0001-01-01T00:30+01:00", field="start") is None
    assert parse_timestamp("9999-12-31", field="start") == "9999-12-31T00:00:00.000Z"
    for field, value in (
        ("start", "9999-12-31T23:59:59.9999999Z"),
        ("end", "0001-01-01T00:30+01:00"),
    ):
        with pytest.raises(InvalidQuery) as caught:
            AuditQuery.parse(**{field: value})
        assert caught.value.field == field
        message = str(caught.value)
        assert "0001-01-01 to 9999-12-31 UTC" in message and "out of range" not in message


def test_a_huge_integer_is_told_the_bound_not_echoed() -> None:
    with pytest.raises(InvalidQuery) as caught:
        AuditQuery.parse(offset="100000000000000000000000")
    assert caught.value.field == "offset"
    assert str(caught.value) == f"offset must be between 0 and {MAX_OFFSET}"
    with pytest.raises(InvalidQuery) as caught:
        AuditQuery.parse(offset="--5")  # a ValueError from int() once
    assert "must be an integer" in str(caught.value)


def test_query_bounds() -> None:
    assert AuditQuery.parse() == AuditQuery(None, None, None, 100, 0)
    assert AuditQuery.parse(limit="1000", offset="5").limit == 1000
    for name, value in [("limit", "0"), ("limit", "1001"), ("limit", "x"), ("offset", "-1")]:
        with pytest.raises(InvalidQuery) as caught:
            AuditQuery.parse(**{name: value})
        assert caught.value.field == name
    with pytest.raises(InvalidQuery) as caught:
        AuditQuery.parse(start="2026-11-29", end="2026-11-28")
    assert caught.value.field == "end"
    assert AuditQuery.parse(start="2026-11-28", end="2026-11-28").end == "2026-11-29T00:00:00.000Z"


# -- the writer on a real store ------------------------------------------------------


async def test_appends_are_chained_numbered_and_answered_with_the_entry(
    tmp_path: pathlib.Path,
) -> None:
    async with running(db_path(tmp_path)) as (_, writer):
        entries = await append_n(writer, 3)
        report = await writer.verify()
        stats = writer.statistics()
    assert [e.id for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS
    assert [e.prev_hash for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert entries[1].action == "session.stop" and entries[1].details == {"n": 1}
    assert report.valid and report.head_id == 3 and report.anchor == Anchor(3, entries[2].hash, 3)
    assert (stats.last_id, stats.appended, stats.handled, stats.head_ok) == (3, 3, 3, True)


async def test_200_concurrent_appends_share_a_few_commits(tmp_path: pathlib.Path) -> None:
    ids: list[int] = []
    async with running(db_path(tmp_path)) as (store, writer):
        commits_before = store.statistics().batches

        async def one(n: int) -> None:
            entry = await writer.append(actor=f"tok-{n}", action="task.move", status=200)
            ids.append(entry.id)

        async with trio.open_nursery() as nursery:
            for n in range(200):
                nursery.start_soon(one, n)
        stats = writer.statistics()
        commits = store.statistics().batches - commits_before
        report = await writer.verify()
    assert sorted(ids) == list(range(1, 201))
    assert stats.batches <= 3 and commits <= 3  # 200 appends queued before the first batch ran
    assert stats.max_batch_seen >= 100
    assert report.valid and report.entries_checked == 200


@pytest.mark.parametrize("under_load", [False, True])
async def test_a_caller_that_gives_up_leaves_its_entry_to_be_written(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, under_load: bool
) -> None:
    """A caller cancelled while its append waits for a batch gets `Cancelled` at once;
    the entry is still written, the others of its batch are answered, and later appends
    (and their wake-ups) go on as before. Under load (the last batch had company) an
    append waits on the mailbox path of `record`/`append` themselves."""
    async with running(db_path(tmp_path)) as (store, writer):
        before = 0
        if under_load:
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(functools.partial(writer.append, actor="a", action="b"))
            before = writer.last_id
            assert writer.statistics().last_batch_size > 1
        gate = trio.Event()
        write_alone = store.write_alone

        async def held(fn: Any, **options: Any) -> Any:
            await gate.wait()
            return await write_alone(fn, **options)

        monkeypatch.setattr(store, "write_alone", held)
        ids: dict[str, int] = {}
        given_up = trio.CancelScope()

        async def one(name: str) -> None:
            ids[name] = (await writer.append(actor=name, action="task.move")).id

        async def impatient() -> None:
            with given_up:
                await one("impatient")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")  # commits from its own task, held at the gate
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(impatient)  # these two wait in the mailbox
            nursery.start_soon(one, "patient")
            await trio.testing.wait_all_tasks_blocked()
            given_up.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert given_up.cancelled_caught and ids == {}
            gate.set()
        monkeypatch.undo()
        later = await writer.append(actor="later", action="task.move")
        report = await writer.verify()
        listed = await writer.list_entries(AuditQuery.parse())
    written = {e["actor"]: e["id"] - before for e in listed["entries"] if e["actor"] != "a"}
    assert written == {
        **{k: v - before for k, v in ids.items()},
        "impatient": written["impatient"],
        "later": 4,
    }
    assert ids["first"] - before == 1 and sorted(written.values()) == [1, 2, 3, 4]  # (order varies)
    assert later.id - before == 4 and report.valid and report.entries_checked == before + 4


class HeldWrites:
    """Wraps `store.write_alone`: records the options of each call and holds the write
    function on the store's writer thread until `release` is set."""

    def __init__(self, store: StoreActor) -> None:
        self.write_alone = store.write_alone
        self.options: list[dict[str, Any]] = []
        self.inside = threading.Event()
        self.release = threading.Event()

    async def __call__(self, fn: Any, **options: Any) -> Any:
        self.options.append(options)

        def held(db: sqlite_utils.Database) -> Any:
            self.inside.set()
            assert self.release.wait(WAIT)
            return fn(db)

        return await self.write_alone(held, **options)

    async def entered(self) -> None:
        assert await trio.to_thread.run_sync(self.inside.wait, WAIT)


async def test_a_lone_append_cancelled_while_it_commits_is_written_and_the_head_holds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One append at a time on an idle store is committed from its caller's task with
    no cancel scope (`write_alone(to_end=True)`). Cancelled while its write runs on the
    store's thread, the caller still gets its entry written and answered, sees the
    cancellation at its next checkpoint, and the head and the chain stay consistent."""
    async with running(db_path(tmp_path)) as (store, writer):
        before = await append_n(writer, 2)
        held = HeldWrites(store)
        monkeypatch.setattr(store, "write_alone", held)
        got: list[Any] = []
        scope = trio.CancelScope()

        async def impatient() -> None:
            with scope:
                got.append(await writer.append(actor="impatient", action="task.move"))
                await trio.lowlevel.checkpoint()  # where the cancellation is seen
                got.append("not cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(impatient)
            await held.entered()
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # waits for the write it started
            held.release.set()
        monkeypatch.undo()
        assert held.options == [{"timeout": writer.write_timeout, "to_end": True}]
        assert scope.cancelled_caught
        [entry] = got
        assert entry.id == 3 and entry.prev_hash == before[-1].hash
        assert writer.last_id == 3 and writer.head_ok
        assert writer.statistics().handled == 3 and writer.statistics().head_loads == 1
        later = await writer.append(actor="later", action="task.move")
        report = await writer.verify()
    assert later.id == 4 and later.prev_hash == entry.hash
    assert report.valid and report.entries_checked == 4


async def test_a_lone_append_of_a_cancelled_caller_is_written(tmp_path: pathlib.Path) -> None:
    async with running(db_path(tmp_path)) as (_, writer):
        await append_n(writer, 1)
        got: list[AuditEntry] = []
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await writer.append(actor="cancelled", action="task.move"))
        later = await writer.append(actor="later", action="task.move")
        report = await writer.verify()
    assert [e.id for e in got] == [2] and later.id == 3 and report.valid


async def test_an_append_that_finds_the_store_busy_waits_at_most_write_timeout(
    tmp_path: pathlib.Path,
) -> None:
    """The scope-less path is only for an idle store: with the store's writer thread
    held by another write, an append waits under its deadline (`write_timeout`), fails
    with `AuditUnavailable`, and records nothing; the next append goes on."""
    async with running(db_path(tmp_path), write_timeout=0.2, batch_timeout=0.5) as (
        store,
        writer,
    ):
        await append_n(writer, 1)
        hold = threading.Event()
        inside = threading.Event()

        def blocking(db: sqlite_utils.Database) -> None:
            inside.set()
            assert hold.wait(WAIT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.write_alone, blocking))
            assert await trio.to_thread.run_sync(inside.wait, WAIT)
            assert not store.writer_idle
            started = trio.current_time()
            with pytest.raises(AuditUnavailable, match="not recorded"):
                await writer.append(actor="late", action="task.move")
            waited = trio.current_time() - started
            hold.set()
        assert 0.2 <= waited < 0.5
        entry = await writer.append(actor="next", action="task.move")
        listed = await writer.list_entries(AuditQuery.parse())
        report = await writer.verify()
    assert [e["actor"] for e in listed["entries"]] == ["next", "uid:1000"]
    assert entry.id == 2 and report.valid


class SmallMailboxWriter(AuditWriter):
    mailbox_size = 4


async def test_appends_that_wait_for_room_in_a_full_mailbox_are_all_written_in_order(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the mailbox full (senders blocked for room, `WhenFull.BLOCK`) the writer's
    batches take the buffer and then the blocked senders' entries, in their order."""
    path = db_path(tmp_path)
    store = StoreActor(path)
    writer = SmallMailboxWriter(store, max_batch=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(writer.run)
        held = HeldWrites(store)
        monkeypatch.setattr(store, "write_alone", held)
        async with trio.open_nursery() as appends:
            appends.start_soon(functools.partial(writer.append, actor="a0", action="b"))
            await held.entered()  # a0 commits from its task; the lock is held
            for n in range(1, 10):
                appends.start_soon(functools.partial(writer.append, actor=f"a{n}", action="b"))
                await trio.testing.wait_all_tasks_blocked()
            # a1 is with the writer's task (waiting for the lock), a2-a5 in the mailbox,
            # a6-a9 wait for room in it.
            assert writer.statistics().mailbox_used == 4
            assert writer.statistics().senders_waiting == 4
            held.release.set()
        monkeypatch.undo()
        listed = await writer.list_entries(AuditQuery.parse())
        report = await writer.verify()
        stats = writer.statistics()
        nursery.cancel_scope.cancel()
    assert [e["actor"] for e in reversed(listed["entries"])] == [f"a{n}" for n in range(10)]
    assert report.valid and stats.max_batch_seen <= 3 and stats.handled == 10


async def test_an_acknowledged_append_is_in_the_file_after_a_reopen(
    tmp_path: pathlib.Path,
) -> None:
    path = db_path(tmp_path)
    async with running(path) as (_, writer):
        entry = await writer.append(actor="uid:0", action="token.create", resource="tok-1")
    # Stopped and closed: read the file with a fresh connection.
    with raw(path) as conn:
        row = conn.execute("SELECT actor, action, hash FROM audit_log WHERE id = ?", [entry.id])
        assert row.fetchone() == ("uid:0", "token.create", entry.hash)
        anchor = conn.execute("SELECT last_id, last_hash FROM audit_anchor").fetchone()
    assert anchor == (entry.id, entry.hash)


async def test_a_restarted_writer_continues_the_chain(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    async with running(path) as (_, writer):
        first = await append_n(writer, 3)
    async with running(path) as (_, writer):
        assert writer.last_id == 3 and writer.head_ok
        later = await append_n(writer, 2)
        report = await writer.verify()
        summary = await writer.summary()
    assert [e.id for e in later] == [4, 5]
    assert later[0].prev_hash == first[-1].hash
    assert report.valid and report.entries_checked == 5
    assert summary["chain_valid"] is True and summary["total"] == 5


async def test_graceful_stop_writes_every_queued_append(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    results: list[AuditEntry] = []
    store = StoreActor(path)
    writer = AuditWriter(store)
    store_status, writer_status = StubChildStatus(), StubChildStatus()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(store.run, task_status=store_status))
            await store_status.started_event.wait()
            async with trio.open_nursery() as inner:
                inner.start_soon(functools.partial(writer.run, task_status=writer_status))
                await writer_status.started_event.wait()

                async def one(n: int) -> None:
                    results.append(await writer.append(actor="a", action=f"x.{n}"))

                for n in range(50):
                    inner.start_soon(one, n)
                await trio.testing.wait_all_tasks_blocked()
                writer_status.shutdown_requested.set()
            store_status.shutdown_requested.set()
    assert sorted(e.id for e in results) == list(range(1, 51))
    assert verify_file(path).valid


async def test_appends_wait_for_a_writer_that_is_not_running_yet(
    tmp_path: pathlib.Path,
) -> None:
    store = StoreActor(db_path(tmp_path))
    writer = AuditWriter(store)
    entry: list[AuditEntry] = []
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)

            async def early() -> None:
                entry.append(await writer.append(actor="a", action="session.create"))

            nursery.start_soon(early)
            await trio.testing.wait_all_tasks_blocked()
            assert not entry
            await nursery.start(writer.run)
            while not entry:  # noqa: ASYNC110 - bounded by fail_after
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert entry[0].id == 1


async def test_append_gives_up_when_no_writer_comes(autojump_clock: trio.testing.MockClock) -> None:
    writer = AuditWriter(StoreActor(pathlib.Path("/nonexistent/never-opened.db")))
    with pytest.raises(AskTimeout):
        await writer.append(actor="a", action="b", timeout=3.0)
    assert trio.current_time() == pytest.approx(3.0)


async def test_a_crashing_writer_fails_what_it_did_not_record(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StoreActor(db_path(tmp_path))
    writer = AuditWriter(store)
    errors: list[BaseException] = []

    def boom(*args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(audit_writer, "chain", boom)  # a bug in the batch

    async def run_writer(status: StubChildStatus) -> None:
        with pytest.raises(RuntimeError):
            await writer.run(task_status=status)

    async def one() -> None:
        try:
            await writer.append(actor="a", action="b")
        except (ActorUnavailable, AuditUnavailable) as exc:
            errors.append(exc)

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            status = StubChildStatus()
            nursery.start_soon(run_writer, status)
            await status.started_event.wait()
            async with trio.open_nursery() as callers:
                for _ in range(3):
                    callers.start_soon(one)
            nursery.cancel_scope.cancel()
    stats = writer.statistics()
    # The first append ran in its caller's task (the writer was idle): that caller got
    # AuditUnavailable; the two queued behind it crashed the writer's task.
    assert [type(e) for e in errors] == [AuditUnavailable, ActorUnavailable, ActorUnavailable]
    assert not stats.running and stats.crashes == 1


@pytest.mark.parametrize("linked", [False, True])
@pytest.mark.parametrize("count", [1, 3, 4, 5, 16, 63, 64, 65, 85, 255, 1024])
def test_a_batch_is_inserted_whole_and_in_order(count: int, linked: bool) -> None:
    """`insert_rows`, and the writer's own `_insert_chained` (timestamp and links bound
    once), store exactly the rows `chain` made."""
    db = sqlite_utils.Database(sqlite3.connect(":memory:"))
    migrate(db)
    items = [(e.fields(), audit.details_json(e.details)) for e in make_chain(count)]
    rows = chain(Head(7, "f" * 64), items, "2026-11-28T12:00:00.000Z")
    (audit_writer._insert_chained if linked else insert_rows)(db.conn, rows)
    stored = db.execute("SELECT * FROM audit_log ORDER BY id").fetchall()
    assert [tuple(row) for row in stored] == rows
    assert [row[0] for row in stored] == list(range(8, count + 8))
    assert stored[0][10] == "f" * 64
    assert [row[10] for row in stored[1:]] == [row[11] for row in stored[:-1]]  # linked


class HangingStore:
    """A store whose reads work (an empty log) and whose writes never finish."""

    # Its writes hang in trio, not as a job on an idle writer thread: appends take the
    # scoped path (`AuditWriter._append_batch`), as against a busy store.
    writer_idle = False

    def __init__(self) -> None:
        self.db = sqlite_utils.Database(sqlite3.connect(":memory:"))
        migrate(self.db)
        self.writes = 0

    async def read(self, fn: Any) -> Any:
        return fn(self.db)

    async def write_alone(self, fn: Any, *, timeout: float = 10.0) -> Any:
        self.writes += 1
        await trio.sleep_forever()


async def test_a_batch_that_never_commits_fails_within_batch_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = HangingStore()
    writer = AuditWriter(cast(StoreActor, store), write_timeout=5.0, batch_timeout=7.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        started = trio.current_time()
        with pytest.raises(AuditUnavailable, match="outcome unknown"):
            await writer.append(actor="a", action="b")
        assert trio.current_time() - started == pytest.approx(7.0)
        assert writer.running and writer.statistics().failed == 1
        nursery.cancel_scope.cancel()


async def test_a_failing_store_fails_the_append_and_the_writer_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    async with running(db_path(tmp_path)) as (store, writer):
        await append_n(writer, 2)

        def break_table(db: sqlite_utils.Database) -> None:
            db.execute("ALTER TABLE audit_log RENAME TO audit_log_away")

        await store.write(break_table)
        with pytest.raises(AuditUnavailable):
            await writer.append(actor="a", action="b")
        assert writer.running and writer.statistics().failed == 1

        def restore(db: sqlite_utils.Database) -> None:
            db.execute("ALTER TABLE audit_log_away RENAME TO audit_log")

        await store.write(restore)
        entry = await writer.append(actor="a", action="b")
        assert entry.id == 3
        assert writer.statistics().head_loads == 2  # reloaded after the failure
        assert (await writer.verify()).valid


async def test_an_anchor_changed_while_running_is_detected_not_repaired(
    tmp_path: pathlib.Path,
) -> None:
    async with running(db_path(tmp_path)) as (store, writer):
        await append_n(writer, 4)
        await store.write(lambda db: db.execute("DELETE FROM audit_log WHERE id = 4"))
        await store.write(lambda db: db.execute("UPDATE audit_anchor SET last_id = 3, entries = 3"))
        entry = await writer.append(actor="a", action="b")  # the batch is retried, not lost
        stats = writer.statistics()
        report = await writer.verify()
        summary = await writer.summary()
    assert not stats.head_ok and stats.head_problem is not None
    assert entry.id == 6  # after the mismatch entry (id 5): the deleted id 4 is not reused
    assert not report.valid and (report.problem, report.first_bad_id) == (Problem.GAP, 4)
    assert summary["chain_valid"] is False and summary["by_action"][MISMATCH_ACTION] == 1


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE audit_anchor SET last_hash = hex(randomblob(32))",
        "UPDATE audit_anchor SET entries = entries + 1",
        "UPDATE audit_anchor SET last_id = 5, entries = 5",
        "UPDATE audit_anchor SET last_id = '4'",  # the same value: stored as an integer
        "DELETE FROM audit_anchor",
    ],
    ids=["hash", "count", "id", "same-value", "deleted"],
)
async def test_every_column_of_the_anchor_is_checked_by_the_write(
    tmp_path: pathlib.Path, edit: str
) -> None:
    """The write moves the anchor only if all of it is what the writer expects."""
    async with running(db_path(tmp_path)) as (store, writer):
        await append_n(writer, 4)
        await store.write(lambda db: db.execute(edit))
        entry = await writer.append(actor="a", action="b")
        stats = writer.statistics()
        anchor = await store.read(audit_writer.read_anchor)
    assert anchor == Anchor(entry.id, entry.hash, entry.id)  # moved to the writer's head
    if "'4'" in edit:  # nothing changed: no reload, no problem
        assert (stats.head_loads, stats.head_ok, entry.id) == (1, True, 5)
    else:  # refused, reloaded, the problem recorded as an entry before this one
        assert stats.head_loads == 2 and not stats.head_ok


async def test_an_anchor_made_behind_the_writer_of_an_empty_log_is_seen(
    tmp_path: pathlib.Path,
) -> None:
    async with running(db_path(tmp_path)) as (store, writer):
        sql = "INSERT INTO audit_anchor VALUES (1, 0, ?, 0)"
        await store.write(lambda db: db.execute(sql, [GENESIS]))
        entry = await writer.append(actor="a", action="b")
        stats = writer.statistics()
    assert stats.head_loads == 2 and stats.head_ok  # refused, reloaded: an empty log's anchor
    assert entry.id == 1 and verify_file(db_path(tmp_path)).valid


async def test_an_anchor_edited_to_another_kind_of_text_is_still_moved(
    tmp_path: pathlib.Path,
) -> None:
    """An anchor that is not plain hex (it is compared as read, not in SQL) is moved too."""
    path = await make_log(tmp_path, 3)
    with raw(path) as conn:
        conn.execute("UPDATE audit_anchor SET last_hash = 'é'")
    async with running(path) as (store, writer):
        entry = await writer.append(actor="a", action="b")
        stats = writer.statistics()
        anchor = await store.read(audit_writer.read_anchor)
    assert stats.head_loads == 1 and not stats.head_ok  # the mismatch entry, then this one
    assert entry.id == 5 and anchor == Anchor(5, entry.hash, 5)
    report = verify_file(path)
    assert not report.valid and report.first_bad_id == 4


# -- tamper tests on the store file ---------------------------------------------------------


async def test_an_untouched_log_verifies(tmp_path: pathlib.Path) -> None:
    path = await make_log(tmp_path)
    report = verify_file(path)
    assert report.valid and report.entries_checked == 10 and report.head_id == 10
    assert verify_file(path, page=3) == report


@pytest.mark.parametrize(
    ("statements", "problem", "first_bad"),
    [
        (("UPDATE audit_log SET actor = 'mallory' WHERE id = 4",), Problem.EDITED, 4),
        (("UPDATE audit_log SET status = 500 WHERE id = 6",), Problem.EDITED, 6),
        (("UPDATE audit_log SET details = '{\"n\":99}' WHERE id = 2",), Problem.EDITED, 2),
        (("UPDATE audit_log SET details = 'not json' WHERE id = 2",), Problem.EDITED, 2),
        (("UPDATE audit_log SET path = CAST(X'FF00' AS TEXT) WHERE id = 7",), Problem.EDITED, 7),
        (("DELETE FROM audit_log WHERE id = 5",), Problem.GAP, 5),
        (("DELETE FROM audit_log WHERE id = 1",), Problem.GAP, 1),
        (("DELETE FROM audit_log WHERE id = 10",), Problem.TRUNCATED, 10),
        (("DELETE FROM audit_log WHERE id >= 8",), Problem.TRUNCATED, 8),
        (("DELETE FROM audit_log",), Problem.TRUNCATED, 1),
        (swap_ids(3, 7), Problem.REORDERED, 3),
        (swap_ids(9, 10), Problem.REORDERED, 9),
        (("DELETE FROM audit_anchor",), Problem.ANCHOR_MISSING, None),
        (("UPDATE audit_anchor SET last_hash = hex(randomblob(32))",), Problem.ANCHOR_MISMATCH, 10),
        (("UPDATE audit_anchor SET last_id = 12, entries = 12",), Problem.TRUNCATED, 11),
    ],
)
async def test_tampering_is_reported_with_the_first_bad_entry(
    tmp_path: pathlib.Path, statements: tuple[str, ...], problem: Problem, first_bad: int | None
) -> None:
    path = await make_log(tmp_path)
    tamper(path, *statements)
    for page in (2000, 3):  # pages must not change the verdict
        report = verify_file(path, page=page)
        assert not report.valid
        assert (report.problem, report.first_bad_id) == (problem, first_bad), report.message


@pytest.mark.parametrize(
    "stored",
    [
        '{"action":"session.create","reason":"revoked","reason":"missing"}',  # duplicate key
        '{"reason":"missing","action":"session.create"}',  # keys reordered
        '{"action":"session\\u002ecreate","reason":"missing"}',  # an escape
        '{"action": "session.create", "reason": "missing"}',  # spaces
    ],
)
async def test_details_text_that_parses_to_the_same_value_is_an_edit(
    tmp_path: pathlib.Path, stored: str
) -> None:
    """The hash covers the parsed details, so the stored text must be their canonical
    JSON: any other text that parses alike is an edit (a duplicate key even reads
    differently in SQLite's `json_extract`)."""
    path = db_path(tmp_path)
    async with running(path) as (_, writer):
        await append_n(writer, 2)
        details = {"action": "session.create", "reason": "missing"}
        await writer.append(actor="a", action="auth.unauthorized", details=details)
        await append_n(writer, 2)
    with raw(path) as conn:
        assert conn.execute("SELECT details FROM audit_log WHERE id = 3").fetchone()[0] == (
            '{"action":"session.create","reason":"missing"}'
        )
        conn.execute("UPDATE audit_log SET details = ? WHERE id = 3", [stored])
    report = verify_file(path)
    assert (report.valid, report.problem, report.first_bad_id) == (False, Problem.EDITED, 3)
    with raw(path) as conn:
        [listed] = list_audit(sqlite_utils.Database(conn), limit=1, offset=2)["entries"]
    assert listed["details"] == stored  # shown as stored, not as one reading of it


async def test_an_edited_and_rehashed_entry_breaks_the_next_link(tmp_path: pathlib.Path) -> None:
    path = await make_log(tmp_path)
    with raw(path) as conn:
        row = list(conn.execute("SELECT * FROM audit_log WHERE id = 4").fetchone())
        row[2] = "mallory"
        forged = entry_from_row(row)
        new_hash = entry_hash(forged.prev_hash, forged.fields())
        conn.execute("UPDATE audit_log SET actor = ?, hash = ? WHERE id = 4", [row[2], new_hash])
    report = verify_file(path)
    assert (report.problem, report.first_bad_id) == (Problem.BROKEN_LINK, 5)


@pytest.mark.parametrize(
    ("statements", "problem_then", "first_bad_then"),
    [
        (("DELETE FROM audit_log WHERE id = 10",), Problem.GAP, 10),
        (("DELETE FROM audit_log",), Problem.GAP, 1),
        (("DELETE FROM audit_anchor",), Problem.BROKEN_LINK, 11),
        (("UPDATE audit_anchor SET last_hash = hex(randomblob(32))",), Problem.BROKEN_LINK, 11),
    ],
)
async def test_a_writer_restarted_on_a_tampered_log_keeps_the_break_visible(
    tmp_path: pathlib.Path,
    statements: tuple[str, ...],
    problem_then: Problem,
    first_bad_then: int,
) -> None:
    path = await make_log(tmp_path)
    tamper(path, *statements)
    async with running(path) as (_, writer):  # no crash
        stats = writer.statistics()
        entry = await writer.append(actor="a", action="session.create")
        summary = await writer.summary()
    assert stats.running and not stats.head_ok and stats.head_problem
    assert entry.id == 12  # 11 is the writer's audit.head_mismatch entry
    assert summary["chain_valid"] is False and summary["head_problem"] == stats.head_problem
    report = verify_file(path)
    assert (report.problem, report.first_bad_id) == (problem_then, first_bad_then)
    with raw(path) as conn:
        action, details = conn.execute(
            "SELECT action, details FROM audit_log WHERE id = 11"
        ).fetchone()
    assert action == MISMATCH_ACTION and json.loads(details)["problem"] == stats.head_problem


NULLABLE_ANCHOR = (  # the anchor table rebuilt without NOT NULL, as a hand edit could
    "CREATE TABLE anchor_copy (one INTEGER PRIMARY KEY CHECK (one = 1), last_id INTEGER,"
    " last_hash TEXT, entries INTEGER)",
    "INSERT INTO anchor_copy SELECT * FROM audit_anchor",
    "DROP TABLE audit_anchor",
    "ALTER TABLE anchor_copy RENAME TO audit_anchor",
)

# Anchor columns and the newest entry edited to values of another type or out of range:
# (statements, what `verify` then reports first: problem, first bad entry).
ODD_HEADS: dict[str, tuple[tuple[str, ...], Problem, int | None]] = {
    "hash-blob": (("UPDATE audit_anchor SET last_hash = X'ff00'",), Problem.ANCHOR_MISMATCH, 10),
    "hash-not-utf8": (
        ("UPDATE audit_anchor SET last_hash = CAST(X'ff00' AS TEXT)",),
        Problem.ANCHOR_MISMATCH,
        10,
    ),
    "hash-ascii-blob": (
        ("UPDATE audit_anchor SET last_hash = X'6162'",),
        Problem.ANCHOR_MISMATCH,
        10,
    ),
    "hash-null": (
        (*NULLABLE_ANCHOR, "UPDATE audit_anchor SET last_hash = NULL"),
        Problem.ANCHOR_MISMATCH,
        10,
    ),
    "id-text": (("UPDATE audit_anchor SET last_id = 'abc'",), Problem.ANCHOR_MISMATCH, None),
    "id-blob": (("UPDATE audit_anchor SET last_id = X'ff00'",), Problem.ANCHOR_MISMATCH, None),
    "id-not-utf8": (
        ("UPDATE audit_anchor SET last_id = CAST(X'ff00' AS TEXT)",),
        Problem.ANCHOR_MISMATCH,
        None,
    ),
    "id-real": (("UPDATE audit_anchor SET last_id = 9.5",), Problem.ANCHOR_MISMATCH, None),
    "id-infinite": (("UPDATE audit_anchor SET last_id = 1e999",), Problem.ANCHOR_MISMATCH, None),
    "id-negative": (("UPDATE audit_anchor SET last_id = -5",), Problem.ANCHOR_MISMATCH, None),
    "id-null": (
        (*NULLABLE_ANCHOR, "UPDATE audit_anchor SET last_id = NULL"),
        Problem.ANCHOR_MISMATCH,
        None,
    ),
    "id-largest": (
        ("UPDATE audit_anchor SET last_id = 9223372036854775807",),
        Problem.TRUNCATED,
        11,
    ),
    "newest-hash-not-utf8": (
        ("UPDATE audit_log SET hash = CAST(X'ff00' AS TEXT) WHERE id = 10",),
        Problem.EDITED,
        10,
    ),
    "newest-id-largest": (
        ("UPDATE audit_log SET id = 9223372036854775807 WHERE id = 10",),
        Problem.GAP,
        10,
    ),
}


# The ones `verify` and the answers had trouble with (the others were reported already).
VERIFY_ODD = ("hash-blob", "hash-ascii-blob", "id-text", "id-blob", "id-not-utf8", "id-real",
              "id-infinite", "id-negative", "id-null")  # fmt: skip


@pytest.mark.parametrize("name", list(ODD_HEADS))
async def test_a_head_edited_to_another_type_is_a_mismatch_not_an_outage(
    tmp_path: pathlib.Path, name: str
) -> None:
    """Found at start: recorded as `audit.head_mismatch`, appends go on, and the chain
    goes on so that `verify` still shows a break (not one 503 per audited request)."""
    path = await make_log(tmp_path)
    tamper(path, *ODD_HEADS[name][0])
    async with running(path) as (_, writer):
        stats = writer.statistics()
        entries = [await writer.append(actor="a", action="session.create") for _ in range(2)]
        summary = await writer.summary()
    assert stats.running and not stats.head_ok and stats.head_problem
    assert [e.id for e in entries] == [12, 13]  # 11 is the writer's audit.head_mismatch
    assert summary["chain_valid"] is False and summary["by_action"][MISMATCH_ACTION] == 1
    dumps(summary)  # servable
    assert not verify_file(path).valid  # the break stays visible
    with raw(path) as conn:
        action, details = conn.execute(
            "SELECT action, details FROM audit_log WHERE id = 11"
        ).fetchone()
    assert action == MISMATCH_ACTION and json.loads(details)["problem"] == stats.head_problem
    assert len(stats.head_problem) < 400  # an edited value is quoted, cut


@pytest.mark.parametrize(
    "statements",
    [
        ("UPDATE audit_anchor SET last_id = 'abc'",),
        ("UPDATE audit_anchor SET last_id = X'ff00'",),
        ("UPDATE audit_anchor SET last_id = CAST(X'ff00' AS TEXT)",),
        ("UPDATE audit_anchor SET last_id = 1e300",),
        ("UPDATE audit_anchor SET last_id = 9223372036854775807",),
        (  # an entry past any next id, and the anchor moved back to the entry before it
            "UPDATE audit_log SET id = 9223372036854775807 WHERE id = 10",
            "UPDATE audit_anchor SET last_id = 9, entries = 9,"
            " last_hash = (SELECT hash FROM audit_log WHERE id = 9)",
        ),
        (  # the newest entry's hash made text that is not UTF-8, the anchor moved: reloaded
            "UPDATE audit_log SET hash = CAST(X'ff00' AS TEXT) WHERE id = 10",
            "UPDATE audit_anchor SET entries = 11",
        ),
    ],
    ids=[
        "id-text",
        "id-blob",
        "id-not-utf8",
        "id-real",
        "id-largest",
        "newest-id-largest",
        "newest-hash-not-utf8",
    ],
)
async def test_a_head_edited_to_another_type_while_running_is_a_mismatch(
    tmp_path: pathlib.Path, statements: tuple[str, ...]
) -> None:
    """The same found by a reload (the write saw the anchor move): appends go on after
    the writer's own head."""
    async with running(db_path(tmp_path)) as (store, writer):
        await append_n(writer, 10)

        def edit(db: sqlite_utils.Database) -> None:
            for statement in statements:
                db.execute(statement)

        await store.write(edit)
        entries = [await writer.append(actor="a", action="session.create") for _ in range(2)]
        stats = writer.statistics()
        summary = await writer.summary()
    assert [e.id for e in entries] == [12, 13]
    assert not stats.head_ok and stats.head_loads == 2
    assert summary["chain_valid"] is False and summary["by_action"][MISMATCH_ACTION] == 1


@pytest.mark.parametrize(
    ("statements", "problem", "first_bad"),
    [
        *(ODD_HEADS[name] for name in VERIFY_ODD),
        (("UPDATE audit_anchor SET entries = X'ff00'",), Problem.ANCHOR_MISMATCH, None),
        (("UPDATE audit_anchor SET entries = 1e999",), Problem.ANCHOR_MISMATCH, None),
        (("UPDATE audit_log SET hash = X'ff00' WHERE id = 10",), Problem.EDITED, 10),
        (("UPDATE audit_log SET actor = X'ff00' WHERE id = 3",), Problem.EDITED, 3),
        (("UPDATE audit_log SET timestamp = X'ff00' WHERE id = 3",), Problem.EDITED, 3),
        (("UPDATE audit_log SET status = 1e999 WHERE id = 3",), Problem.EDITED, 3),
    ],
    ids=[
        *VERIFY_ODD,
        "count-blob",
        "count-infinite",
        "newest-hash-blob",
        "actor-blob",
        "timestamp-blob",
        "status-infinite",
    ],
)
async def test_values_of_another_type_are_reported_and_served_never_raised(
    tmp_path: pathlib.Path, statements: tuple[str, ...], problem: Problem, first_bad: int | None
) -> None:
    """`verify`, the list and the summary of a file edited with BLOBs, text that is not
    UTF-8, reals: the first bad entry named, and every answer encodable as a response."""
    path = await make_log(tmp_path)
    tamper(path, *statements)
    report = verify_file(path)
    assert (report.valid, report.problem, report.first_bad_id) == (False, problem, first_bad)
    assert len(report.message) < 300
    with raw(path) as conn:
        db = sqlite_utils.Database(conn)
        answers = [report.to_json(), list_audit(db), audit_summary(db)]
    for answer in answers:
        json.loads(dumps(answer))
    if "status = 1e999" in statements[0]:
        [listed] = answers[1]["entries"][7:8]
        assert listed["status"] == "inf"
    if "actor = X'ff00'" in statements[0]:
        assert answers[1]["entries"][7]["actor"] == "X'FF00'"


@pytest.mark.parametrize(
    "statements",
    [
        (
            "DELETE FROM audit_log WHERE id > 5",
            "UPDATE audit_anchor SET last_id = 5, entries = 5,"
            " last_hash = (SELECT hash FROM audit_log WHERE id = 5)",
        ),
        ("DELETE FROM audit_log", "DELETE FROM audit_anchor"),
    ],
)
async def test_a_log_rewound_while_the_writer_runs_stays_broken(
    tmp_path: pathlib.Path, statements: tuple[str, ...]
) -> None:
    """Entries the writer committed, deleted behind its back with the anchor moved
    back to match: found as at start-up, never papered over by reusing their ids."""
    path = db_path(tmp_path)
    async with running(path) as (store, writer):
        await append_n(writer, 8)

        def rewind(db: sqlite_utils.Database) -> None:
            for statement in statements:
                db.execute(statement)

        await store.write(rewind)
        entry = await writer.append(actor="a", action="session.create")
        stats = writer.statistics()
        summary = await writer.summary()
        report = await writer.verify()
    assert entry.id == 10  # 9 is the writer's audit.head_mismatch entry; no id reused
    assert not stats.head_ok and "rewound" in (stats.head_problem or "")
    assert summary["chain_valid"] is False
    assert not report.valid and not verify_file(path).valid
    with raw(path) as conn:
        action, details = conn.execute(
            "SELECT action, details FROM audit_log WHERE id = 9"
        ).fetchone()
    assert action == MISMATCH_ACTION and json.loads(details)["problem"] == stats.head_problem
    async with running(path) as (_, writer):  # a restart does not make it valid either
        assert not (await writer.verify()).valid


# -- list and summary ------------------------------------------------------------------------


async def seed_rows(path: pathlib.Path) -> None:
    """Ten entries with known timestamps (a valid chain), written as the writer would."""
    entries = make_chain(10)
    async with running(path) as (store, _):

        def insert(db: sqlite_utils.Database) -> None:
            for e in entries:
                db.execute(
                    "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        e.id,
                        e.timestamp,
                        e.actor,
                        e.action,
                        e.resource,
                        e.method,
                        e.path,
                        e.status,
                        e.ip,
                        audit.details_json(e.details),
                        e.prev_hash,
                        e.hash,
                    ],
                )
            db.execute("INSERT INTO audit_anchor VALUES (1, ?, ?, ?)", [10, entries[-1].hash, 10])

        await store.write(insert)


async def test_list_filters_pages_and_answers_newest_first(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    await seed_rows(path)
    with raw(path) as conn:
        db = sqlite_utils.Database(conn)
        everything = list_audit(db)
        assert [e["id"] for e in everything["entries"]] == list(range(10, 0, -1))
        assert (everything["total"], everything["limit"], everything["offset"]) == (10, 100, 0)
        assert set(everything["entries"][0]) == {*audit.HASHED_FIELDS, "hash"}
        page = list_audit(db, limit=3, offset=2)
        assert [e["id"] for e in page["entries"]] == [8, 7, 6] and page["total"] == 10
        tasks = list_audit(db, action="task.*")
        assert {e["action"] for e in tasks["entries"]} == {"task.move"} and tasks["total"] == 4
        exact = list_audit(db, action="token.revoke")
        assert exact["total"] == 3
        window = list_audit(db, start="2026-11-28T12:00:03Z", end="2026-11-28T12:00:06Z")
        assert [e["id"] for e in window["entries"]] == [5, 4, 3]
        day = list_audit(db, start="2026-11-28", end="2026-11-28")
        assert day["total"] == 10
        assert list_audit(db, start="2026-11-29")["total"] == 0
        with pytest.raises(InvalidQuery) as caught:
            list_audit(db, start="2026-11-28T12:00:00")
        assert caught.value.field == "start"


async def test_summary_totals_and_chain_verdict(tmp_path: pathlib.Path) -> None:
    path = db_path(tmp_path)
    await seed_rows(path)
    with raw(path) as conn:
        db = sqlite_utils.Database(conn)
        summary = audit_summary(db)
        assert summary["total"] == 10
        assert summary["by_action"] == {"session.create": 3, "task.move": 4, "token.revoke": 3}
        assert summary["by_actor"] == {"tok-1": 4, "tok-0": 3, "tok-2": 3}
        assert summary["by_status"] == {"200": 8, "409": 2}
        assert summary["first_timestamp"] == "2026-11-28T12:00:01.000Z"
        assert summary["last_timestamp"] == "2026-11-28T12:00:10.000Z"
        assert summary["chain_valid"] is True and summary["chain"]["head_id"] == 10
        small = audit_summary(db, breakdown_limit=1)
        assert small["by_actor"] == {"tok-1": 4} and small["omitted"]["actor"] == 2
        conn.execute("UPDATE audit_log SET status = NULL WHERE id = 1")
        broken = audit_summary(db)
        assert broken["chain_valid"] is False
        assert broken["chain"]["reason"] == "edited" and broken["chain"]["first_bad_id"] == 1
        assert broken["by_status"]["none"] == 1
