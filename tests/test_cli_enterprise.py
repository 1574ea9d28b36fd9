"""`loki token create|ls|revoke` and `loki audit [ls|summary|verify]` against `loki serve`.

The daemon is a real subprocess (`tests/daemon_proc.py`); the CLI runs in
this process (`lokid.cli.main`) with `LOKI_HOME` pointing at the daemon's
home, so it talks to the daemon over the real control socket.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import attrs
import httpx
import pytest

from lokid.actors.audit_writer import entry_from_row
from lokid.audit import details_json, entry_hash
from lokid.cli import TOKEN_SCOPES
from lokid.tokens import SCOPES, looks_like_token

from .cli_kit import Cli
from .daemon_proc import DaemonProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DaemonProcess]
OWNER = f"uid:{os.getuid()}"


def table(text: str) -> list[list[str]]:
    """A printed table as lists of cells (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def fields(text: str) -> dict[str, str]:
    """`key  value` lines (keys may hold one space) as a dict."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines() if line)


def status_with(daemon: DaemonProcess, token: str | None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{daemon.api_url}/api/status", headers=headers, timeout=5).status_code


# -- tokens --------------------------------------------------------------------------


def test_the_cli_knows_the_daemons_scopes() -> None:
    assert TOKEN_SCOPES == SCOPES


def test_token_create_ls_revoke_round_trip(daemon_factory: Factory, loki: Cli) -> None:
    daemon = daemon_factory(extra_env={"LOKI_ENTERPRISE_AUTH": "true"}).start()
    home = daemon.home
    assert status_with(daemon, None) == 401
    assert loki.ok(home, "token", "ls").out == "no tokens\n"

    # create: the fields, then the raw token alone on the last line, after the note
    created = loki.ok(
        home, "token", "create", "--name", "ci reader", "--scopes", "read", "--scopes",
        "audit", "--expires-days", "30",
    ).out  # fmt: skip
    head, note, raw, end = created.rsplit("\n", 3)
    assert end == ""
    assert "shown only this once" in note
    assert looks_like_token(raw)
    shown = fields(head)
    reader_id = shown["id"]
    assert reader_id.startswith("tok-")
    assert (shown["name"], shown["scopes"]) == ("ci reader", "read, audit")
    assert shown["expires"] > shown["created"]

    # the raw token authenticates against the TCP API (auth is on)
    assert status_with(daemon, raw) == 200

    as_json = loki.json(home, "token", "create", "--name", "admin", "--scopes", "admin,read")
    assert set(as_json) == {"id", "token", "name", "scopes", "created_at", "expires_at"}
    assert as_json["scopes"] == ["admin", "read"] and as_json["expires_at"] is None
    assert looks_like_token(as_json["token"])
    admin_id = as_json["id"]

    # ls: newest first, never a secret
    listed = loki.ok(home, "token", "ls").out
    assert raw not in listed and as_json["token"] not in listed
    rows = table(listed)
    assert rows[0] == ["ID", "NAME", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATE"]
    assert [row[0] for row in rows[1:]] == [admin_id, reader_id]
    admin_row, reader_row = rows[1], rows[2]
    assert admin_row[1:3] == ["admin", "admin,read"]
    assert (admin_row[4], admin_row[5], admin_row[6]) == ("never", "never", "active")
    assert reader_row[1:3] == ["ci reader", "read,audit"]
    assert reader_row[4] == shown["expires"]
    assert reader_row[5] != "never"  # it was just used
    assert reader_row[6] == "active"
    page = loki.json(home, "token", "ls", "--limit", "1", "--offset", "1")
    assert [t["id"] for t in page["tokens"]] == [reader_id]
    assert (page["total"], page["limit"], page["offset"]) == (2, 1, 1)

    # revoke: the token stops working at once and is listed as revoked
    revoked = loki.ok(home, "token", "revoke", reader_id).out
    assert re.fullmatch(rf"{reader_id} revoked at \S+Z\n", revoked)
    assert status_with(daemon, raw) == 401
    again = loki.json(home, "token", "revoke", reader_id)
    assert again["id"] == reader_id and again["revoked"] is True
    states = {row[0]: row[6] for row in table(loki.ok(home, "token", "ls").out)[1:]}
    assert states == {admin_id: "active", reader_id: "revoked"}
    loki.fails(home, "token", "revoke", "tok-000000000000", words=("Token not found", "404"))

    # an expired token (its expiry moved into the past) is listed as expired
    expiring = loki.json(home, "token", "create", "--name", "x", "--scopes", "read")
    with sqlite3.connect(daemon.data / "lokid.db", timeout=10) as db:
        db.execute(
            "UPDATE api_tokens SET expires_at = '2000-01-01T00:00:00.000Z' WHERE id = ?",
            (expiring["id"],),
        )
    db.close()
    assert status_with(daemon, expiring["token"]) == 401
    states = {row[0]: row[6] for row in table(loki.ok(home, "token", "ls").out)[1:]}
    assert states[expiring["id"]] == "expired"
    code, _ = daemon.terminate()
    assert code == 0


def test_bad_token_requests_exit_1_with_the_daemons_message(
    daemon: DaemonProcess, loki: Cli
) -> None:
    home = daemon.home
    bad = loki.fails(
        home, "token", "create", "--name", "x", "--scopes", "read,root",
        words=("unknown scope 'root'", "422 VALIDATION_ERROR", "[field: scopes]"),
    )  # fmt: skip
    assert bad.out == ""
    loki.fails(
        home, "token", "create", "--name", "x", "--scopes", ",",
        words=("at least one scope", "[field: scopes]"),
    )  # fmt: skip
    loki.fails(
        home, "token", "create", "--name", "x", "--scopes", "read", "--expires-days", "0",
        words=("expires_days must be between 1 and 3650", "[field: expires_days]"),
    )  # fmt: skip
    loki.fails(
        home, "token", "create", "--name", " ", "--scopes", "read",
        words=("name must not be empty", "[field: name]"),
    )  # fmt: skip
    assert loki.json(home, "token", "ls")["total"] == 0


# -- the audit log --------------------------------------------------------------------


def test_audit_ls_summary_and_verify_on_a_clean_log(daemon: DaemonProcess, loki: Cli) -> None:
    home = daemon.home
    assert loki.ok(home, "audit").out == "no audit entries\n"
    token = loki.json(home, "token", "create", "--name", "ci", "--scopes", "read")
    loki.fails(home, "token", "create", "--name", "ci", "--scopes", "nope")
    loki.ok(home, "token", "revoke", token["id"])

    # ls (also the default): newest first
    listed = loki.ok(home, "audit", "ls").out
    assert loki.ok(home, "audit").out == listed
    rows = table(listed)
    assert rows[0] == ["ID", "TIME", "ACTOR", "ACTION", "RESOURCE", "STATUS"]
    assert [row[0] for row in rows[1:]] == ["3", "2", "1"]
    assert [row[2:] for row in rows[1:]] == [
        [OWNER, "token.revoke", token["id"], "200"],
        [OWNER, "token.create", "-", "422"],
        [OWNER, "token.create", token["id"], "201"],
    ]
    assert token["token"] not in listed

    # filters and paging, given on `audit` or on `audit ls`
    created = loki.json(home, "audit", "--action", "token.create")
    assert [e["id"] for e in created["entries"]] == [2, 1]
    entry = created["entries"][1]
    assert (entry["actor"], entry["method"], entry["status"]) == (OWNER, "POST", 201)
    assert entry["path"] == "/dashboard/api/enterprise/tokens"
    family = loki.json(home, "audit", "ls", "--action", "token.*", "--limit", "1", "--offset", "1")
    assert [e["id"] for e in family["entries"]] == [2]
    assert (family["total"], family["limit"], family["offset"]) == (3, 1, 1)
    assert loki.ok(home, "audit", "ls", "--action", "session.*").out == "no audit entries\n"
    assert loki.ok(home, "audit", "ls", "--start", "2999-01-01").out == "no audit entries\n"
    day = entry["timestamp"][:10]
    assert len(loki.json(home, "audit", "ls", "--start", day, "--end", day)["entries"]) == 3
    loki.fails(home, "audit", "ls", "--start", "yesterday", words=("start", "[field: start]"))

    # summary
    summary = fields(loki.ok(home, "audit", "summary").out.split("\n\n")[0])
    assert summary["entries"] == "3" and summary["chain"] == "valid"
    assert summary["first"] == entry["timestamp"]
    text = loki.ok(home, "audit", "summary").out
    assert "by action:\n  token.create  2\n  token.revoke  1\n" in text
    assert f"by actor:\n  {OWNER}  3\n" in text
    as_json = loki.json(home, "audit", "summary")
    assert as_json["chain_valid"] is True and as_json["by_status"] == {
        "201": 1,
        "422": 1,
        "200": 1,
    }

    # verify, by the daemon and (while it runs) from the file
    verified = loki(home, "audit", "verify")
    assert verified.code == 0, verified
    assert verified.out.startswith("audit log valid: 3 entries, chain valid")
    assert "verified by the running daemon" in verified.out
    report = loki.json(home, "audit", "verify")
    assert (report["valid"], report["entries_checked"], report["verified_by"]) == (
        True,
        3,
        "daemon",
    )
    offline = loki.json(home, "audit", "verify", "--offline")
    assert (offline["valid"], offline["verified_by"]) == (True, "database")
    assert offline["head_hash"] == report["head_hash"]
    code, _ = daemon.terminate()
    assert code == 0


def test_audit_ls_shows_control_characters_escaped_not_folded(
    daemon: DaemonProcess, loki: Cli
) -> None:
    """A resource is evidence: `\\n\\nevil` must not be listed as `evil`."""
    with daemon.control() as owner:
        for resource in ("%0A%0Aevil", "a%0Ab%09c%0D"):
            assert owner.post(f"/api/sessions/{resource}/stop").status_code == 404
    rows = table(loki.ok(daemon.home, "audit", "--limit", "2").out)
    assert [row[4] for row in rows[1:]] == ["a\\nb\\tc\\r", "\\n\\nevil"]


def stopped_log(daemon_factory: Factory, loki: Cli, tokens: int = 3) -> Path:
    """A home whose daemon wrote `tokens` token.create entries and stopped."""
    daemon = daemon_factory().start()
    for n in range(tokens):
        loki.ok(daemon.home, "token", "create", "--name", f"t{n}", "--scopes", "read")
    code, _ = daemon.terminate()
    assert code == 0
    return daemon.home


def tamper(home: Path, *statements: str) -> None:
    with sqlite3.connect(home / "lokid" / "lokid.db") as db:
        for statement in statements:
            db.execute(statement)
    db.close()


def test_verify_falls_back_to_the_file_when_the_daemon_is_stopped(
    daemon_factory: Factory, loki: Cli
) -> None:
    home = stopped_log(daemon_factory, loki)
    result = loki(home, "audit", "verify")
    assert result.code == 0, result
    assert "lokid is not running; verifying the database file" in result.err
    database = home / "lokid" / "lokid.db"
    assert result.out.startswith(
        f"audit log valid: 3 entries, chain valid (verified offline from {database})"
    )
    report = loki.json(home, "audit", "verify")
    assert (report["valid"], report["verified_by"], report["database"]) == (
        True,
        "database",
        str(database),
    )


TAMPERING: dict[str, tuple[tuple[str, ...], str, int]] = {
    # name: (statements, reason, first bad entry)
    "edited": (("UPDATE audit_log SET actor = 'x' WHERE id = 1",), "edited", 1),
    "deleted": (("DELETE FROM audit_log WHERE id = 2",), "gap", 2),
    "reordered": (
        (
            "UPDATE audit_log SET id = -1 WHERE id = 1",
            "UPDATE audit_log SET id = 1 WHERE id = 2",
            "UPDATE audit_log SET id = 2 WHERE id = -1",
        ),
        "reordered",
        1,
    ),
    "truncated": (("DELETE FROM audit_log WHERE id = 3",), "truncated", 3),
}


@pytest.mark.parametrize("name", list(TAMPERING))
def test_verify_offline_names_the_first_bad_entry(
    daemon_factory: Factory, loki: Cli, name: str
) -> None:
    statements, reason, first_bad = TAMPERING[name]
    home = stopped_log(daemon_factory, loki)
    assert loki(home, "audit", "verify", "--offline").code == 0
    tamper(home, *statements)

    result = loki.fails(home, "audit", "verify", "--offline")
    lines = result.out.splitlines()
    assert lines[0] == f"audit log INVALID (verified offline from {home / 'lokid' / 'lokid.db'})"
    shown = fields("\n".join(lines[1:]))
    assert (shown["problem"], shown["first bad"]) == (reason, f"entry {first_bad}")
    assert f"entry {first_bad}" in shown["detail"]
    assert result.err == ""
    report = json.loads(loki.fails(home, "audit", "verify", "--offline", "--json").out)
    assert (report["valid"], report["reason"], report["first_bad_id"]) == (
        False,
        reason,
        first_bad,
    )
    assert report["verified_by"] == "database"


def test_an_entry_appended_past_the_anchor_is_not_the_last_good_one(
    daemon_factory: Factory, loki: Cli
) -> None:
    """A correctly chained entry 4 written without the anchor: first bad 4, last good 3."""
    home = stopped_log(daemon_factory, loki)
    database = home / "lokid" / "lokid.db"
    with sqlite3.connect(database) as db:
        last = entry_from_row(db.execute("SELECT * FROM audit_log WHERE id = 3").fetchone())
        forged = attrs.evolve(last, id=4, prev_hash=last.hash)
        forged = attrs.evolve(forged, hash=entry_hash(last.hash, forged.fields()))
        f = forged
        db.execute(
            "INSERT INTO audit_log (id, timestamp, actor, action, resource, method, path,"
            " status, ip, details, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (f.id, f.timestamp, f.actor, f.action, f.resource, f.method, f.path, f.status,
             f.ip, details_json(f.details), f.prev_hash, f.hash),
        )  # fmt: skip
    db.close()

    result = loki.fails(home, "audit", "verify", "--offline")
    shown = fields("\n".join(result.out.splitlines()[1:]))
    assert (shown["problem"], shown["first bad"], shown["last good"]) == (
        "anchor mismatch",
        "entry 4",
        "entry 3",
    )
    report = json.loads(loki.fails(home, "audit", "verify", "--offline", "--json").out)
    assert (report["first_bad_id"], report["head_id"], report["head_hash"]) == (4, 3, last.hash)


def test_the_running_daemon_reports_an_edited_entry(daemon_factory: Factory, loki: Cli) -> None:
    home = stopped_log(daemon_factory, loki)
    tamper(home, "UPDATE audit_log SET actor = 'x' WHERE id = 1")
    daemon_factory(home).start()

    result = loki.fails(home, "audit", "verify")
    assert result.out.startswith("audit log INVALID (verified by the running daemon")
    shown = fields("\n".join(result.out.splitlines()[1:]))
    assert (shown["problem"], shown["first bad"]) == ("edited", "entry 1")
    summary = fields(loki.ok(home, "audit", "summary").out.split("\n\n")[0])
    assert summary["chain"].startswith("INVALID: entry 1 edited: ")
    assert loki.json(home, "audit", "summary")["chain_valid"] is False


def test_a_daemon_on_an_anchor_edited_to_a_blob_serves_and_verify_reports_it(
    daemon_factory: Factory, loki: Cli
) -> None:
    """`last_hash` edited to bytes that are not UTF-8: the daemon records the mismatch
    and goes on serving audited requests (not 503 each), and `loki audit verify`, by
    the daemon and from the file, names the break and exits 1, without a traceback."""
    home = stopped_log(daemon_factory, loki)
    tamper(home, "UPDATE audit_anchor SET last_hash = X'ff00'")
    offline = loki.fails(home, "audit", "verify", "--offline")
    assert fields("\n".join(offline.out.splitlines()[1:]))["problem"] == "anchor mismatch"
    report = json.loads(loki.fails(home, "audit", "verify", "--offline", "--json").out)
    assert (report["first_bad_id"], report["anchor"]["last_hash"]) == (3, "X'FF00'")

    daemon_factory(home).start()
    loki.ok(home, "token", "create", "--name", "after", "--scopes", "read")  # audited
    result = loki.fails(home, "audit", "verify")
    shown = fields("\n".join(result.out.splitlines()[1:]))
    assert (shown["problem"], shown["first bad"]) == ("broken link", "entry 4")
    assert result.err == ""
    entries = loki.json(home, "audit", "ls")["entries"]
    assert [e["action"] for e in entries] == ["token.create", "audit.head_mismatch"] + [
        "token.create"
    ] * 3
    assert loki.json(home, "audit", "summary")["chain_valid"] is False


def test_a_copied_database_is_verified_read_only(
    daemon_factory: Factory, loki: Cli, tmp_path: Path
) -> None:
    """A bare copy of the database file (no -wal): verified, its bytes left unchanged."""
    home = stopped_log(daemon_factory, loki)
    copy = tmp_path / "copy"
    (copy / "lokid").mkdir(parents=True)
    shutil.copy(home / "lokid" / "lokid.db", copy / "lokid" / "lokid.db")
    before = (copy / "lokid" / "lokid.db").read_bytes()
    assert loki.json(copy, "audit", "verify", "--offline")["valid"] is True
    assert (copy / "lokid" / "lokid.db").read_bytes() == before


def test_verify_without_a_database_is_an_error(tmp_path: Path, loki: Cli) -> None:
    home = tmp_path / "nohome"
    result = loki.fails(home, "audit", "verify", words=("no database to verify", str(home)))
    assert result.out == ""
    loki.fails(home, "audit", "verify", "--offline", words=("no database to verify",))
    assert not home.exists()


@pytest.mark.parametrize(
    "args",
    [
        ["token", "create", "--name", "x", "--scopes", "read"],
        ["token", "ls"],
        ["token", "revoke", "tok-x"],
        ["audit"],
        ["audit", "summary"],
    ],
)
def test_daemon_not_running(tmp_path: Path, loki: Cli, args: list[str]) -> None:
    result = loki.fails(tmp_path / "nohome", *args, words=("lokid is not running", "loki serve"))
    assert result.out == ""
