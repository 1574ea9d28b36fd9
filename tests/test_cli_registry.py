"""`loki registry [ls|add|rm|discover|sync]` against a real `loki serve` subprocess.

The CLI runs in this process (`lokid.cli.main`) with `LOKI_HOME` pointing at
the daemon's home, so it talks to the daemon over the real control socket
(the Dashboard API is mounted under `/dashboard` there). One check goes over
the Dashboard API's TCP listener too. These tests need the registry scanner
and its routes wired into the daemon (`lokid/daemon.py`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lokid.cli import REGISTRY_STATUSES
from lokid.registry import registry_id

from .cli_kit import Cli
from .daemon_proc import DaemonProcess

pytestmark = pytest.mark.e2e

Factory = Callable[..., DaemonProcess]


def table(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line.strip()]


def fields(text: str) -> dict[str, str]:
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines() if line)


def project(path: Path, tasks: list[dict[str, Any]] | None = None) -> Path:
    queue = path / ".loki" / "queue"
    queue.mkdir(parents=True)
    (queue / "pending.json").write_text(json.dumps(tasks or []))
    return path


def test_the_cli_knows_the_entry_statuses() -> None:
    from lokid.actors.registry_scanner import ENTRY_STATUSES

    assert REGISTRY_STATUSES == ENTRY_STATUSES


def test_add_ls_rm_round_trip(
    daemon_factory: Factory, loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = daemon_factory().start()
    home = daemon.home
    assert loki.ok(home, "registry").out == "no registered projects\n"
    work = tmp_path / "work"
    alpha = project(work / "alpha", [{"id": "t1", "title": "one", "status": "pending"}])
    monkeypatch.chdir(work)

    added = fields(loki.ok(home, "registry", "add", "alpha", "--name", "Alpha").out)
    real = os.path.realpath(alpha)
    assert added["id"] == registry_id(real)
    assert (added["name"], added["path"], added["status"], added[".loki"]) == (
        "Alpha",
        real,
        "ok",
        "yes",
    )
    assert added["tasks"].startswith("1 ")

    loki.fails(home, "registry", "add", "alpha", words=("already registered",))
    loki.fails(home, "registry", "add", "nope", words=("does not exist", "[field: path]"))

    rows = table(loki.ok(home, "registry", "ls").out)
    assert rows[0] == ["ID", "NAME", "STATUS", "LOKI", "TASKS P/A/C/F", "LAST SEEN", "PATH"]
    assert rows[1][:5] == [added["id"], "Alpha", "ok", "yes", "1/0/0/0"]
    listed = loki.json(home, "registry", "ls", "--status", "ok")
    assert [p["id"] for p in listed["projects"]] == [added["id"]]
    assert loki.json(home, "registry", "--status", "missing")["projects"] == []

    assert loki.ok(home, "registry", "rm", "alpha").out == f"{added['id']} unregistered\n"
    loki.fails(home, "registry", "rm", added["id"], words=("not found",))
    loki.ok(home, "registry", "add", str(alpha))
    gone = loki.json(home, "registry", "rm", added["id"])
    assert gone == {"id": added["id"], "unregistered": True}


def test_a_path_with_an_escape_sequence_is_listed_escaped(
    daemon_factory: Factory, loki: Cli, tmp_path: Path
) -> None:
    """A folder name is anyone's to choose: `ls` must not hand its escapes to the terminal."""
    daemon = daemon_factory().start()
    sneaky = project(tmp_path / "p\x1b[2J\u202eevil")
    loki.ok(daemon.home, "registry", "add", str(sneaky))
    out = loki.ok(daemon.home, "registry", "ls").out
    assert "\x1b" not in out and "\u202e" not in out
    assert "p\\x1b[2J\\u202eevil" in out  # shown as escapes, still recognisable
    assert loki.json(daemon.home, "registry", "ls")["projects"][0]["path"] == str(sneaky)


def test_discover_register_and_sync(daemon_factory: Factory, loki: Cli, tmp_path: Path) -> None:
    daemon = daemon_factory().start()
    home = daemon.home
    root = tmp_path / "code"
    one = project(root / "a" / "one")
    two = project(root / "b" / "two", [{"id": "t", "title": "t", "status": "failed"}])
    project(root / "c" / "d" / "deep", [{"id": "x", "title": "x", "status": "pending"}])
    loki.ok(home, "registry", "add", str(one))

    found = loki.ok(home, "registry", "discover", "--root", str(root), "--depth", "2")
    rows = table(found.out)
    assert rows[0] == ["ID", "NAME", "REGISTERED", "PATH"]
    assert [(r[1], r[2]) for r in rows[1:]] == [("one", "yes"), ("two", "no")]
    assert "2 projects in" in found.err and "looking for .loki folders" in found.err
    # several --root: one comma list (a repeated `roots` key would count only the last)
    both = loki.json(
        home, "registry", "discover", "--root", str(root / "a"), "--root", str(root / "b")
    )
    assert [p["name"] for p in both["projects"]] == ["one", "two"]
    assert [r["status"] for r in both["roots"]] == ["ok", "ok"]

    answer = loki.json(home, "registry", "discover", "--root", str(root), "--register")
    assert answer["registered"] == 2 and answer["total"] == 3
    listed = loki.json(home, "registry", "ls")
    assert listed["total"] == 3
    counts = {p["name"]: p["tasks"]["total"] for p in listed["projects"]}
    assert counts == {"one": 0, "two": 1, "deep": 1}  # counted when registered

    shutil.rmtree(two)
    summary = fields(loki.ok(home, "registry", "sync").out)
    assert summary == {"total": "3", "ok": "2", "missing": "1", "unreadable": "0", "updated": "1"}
    missing = loki.json(home, "registry", "ls", "--status", "missing")
    assert [p["name"] for p in missing["projects"]] == ["two"]
    assert loki.json(home, "registry", "sync")["updated"] == 0

    # the Dashboard API's own listener serves the same registry
    with httpx.Client(base_url=daemon.dashboard_url, timeout=10) as client:
        tasks = client.get("/api/registry/tasks").json()
        assert tasks["total"] == 1 and tasks["errors"] == []  # deep's; two is gone
        bad = client.get("/api/registry/discover?depth=42")
        assert bad.status_code == 400 and bad.json()["error"]["details"]["field"] == "depth"


def test_discover_reports_problems_as_warnings(
    daemon_factory: Factory, loki: Cli, tmp_path: Path
) -> None:
    daemon = daemon_factory().start()
    result = loki.ok(
        daemon.home, "registry", "discover", "--root", str(tmp_path / "does-not-exist")
    )
    assert result.out == "no projects found\n"
    assert "warning:" in result.err and "(missing)" in result.err


def test_registry_commands_without_a_daemon_exit_1(loki: Cli, tmp_path: Path) -> None:
    for args in (("registry",), ("registry", "sync"), ("registry", "add", str(tmp_path))):
        loki.fails(tmp_path / "home", *args, words=("not running",))


def test_a_root_holding_a_comma_is_refused_before_asking(loki: Cli, tmp_path: Path) -> None:
    """`roots` is a comma list: the daemon would walk two other folders."""
    loki.fails(
        tmp_path / "home", "registry", "discover", "--root", str(tmp_path / "a,b"),
        words=("cannot hold a comma",),
    )  # fmt: skip
