"""`loki start`, `loki sessions ...`, `loki tasks` against a `loki serve` subprocess.

The daemon's agent is the fake Claude CLI (`tests/fake_agent.py`); a
`[mode:slow] [seconds:30]` feature keeps the first task's agent running while
the commands look at and steer the session, which the test stops at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from . import fake_agent
from .daemon_proc import DaemonProcess, run_cli
from .sessions_kit import make_project

pytestmark = pytest.mark.e2e

Factory = Callable[..., DaemonProcess]

# The first task's agent outlives the test (it is stopped at the end): a shorter one
# could finish while the test runs on a loaded machine, and the session with it.
SLOW_PRD = """\
# Slow app

## Features
- First feature [mode:slow] [seconds:600]
- Second feature
- Third feature
"""


def loki(
    args: Sequence[str], home: Path, *, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`run_cli` with a working folder and standard input."""
    return subprocess.run(
        [sys.executable, "-m", "lokid", *args],
        env={**os.environ, "LOKI_HOME": str(home)},
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=30,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    assert result.stdout == ""
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return result.stderr


def daemon_with_fake_agent(tmp_path: Path, daemon_factory: Factory) -> DaemonProcess:
    bin_dir = tmp_path / "bin"
    fake_agent.install(bin_dir, ("claude",))
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    return daemon_factory(extra_env={"PATH": path, "FAKE_AGENT_LIFETIME": "120"}).start()


def wait_session(
    daemon: DaemonProcess, session_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with daemon.control() as client:
        while True:
            session: dict[str, Any] = client.get(f"/api/sessions/{session_id}").json()
            if done(session):
                return session
            assert time.monotonic() < deadline, f"session never got there: {session}"
            time.sleep(0.05)


def rows(table: str) -> list[list[str]]:
    """A printed table as lists of cells (split on runs of spaces; the last cell keeps its)."""
    lines = table.splitlines()
    width = len(lines[0].split())
    return [line.split(maxsplit=width - 1) for line in lines]


def test_a_session_from_start_to_rm(tmp_path: Path, daemon_factory: Factory) -> None:
    daemon = daemon_with_fake_agent(tmp_path, daemon_factory)
    home = daemon.home
    project = make_project(tmp_path, SLOW_PRD)

    # start: the PRD path is relative to the CLI's folder.
    started = ok(loki(["start", "prd.md", "--max-iterations", "7"], home, cwd=project))
    sid, status = started.split()
    assert sid.startswith("session-") and status == "starting"
    wait_session(daemon, sid, lambda s: s["tasks"]["active"] == 1)

    # sessions / sessions ls
    table = rows(ok(run_cli(["sessions"], home)))
    assert table[0] == ["ID", "STATUS", "PHASE", "ITER", "TASKS", "COST", "CREATED"]
    assert table[1][:5] == [sid, "running", "development", "1", "0/3"]
    assert table[1][5].startswith("$")
    assert rows(ok(run_cli(["sessions", "ls", "--status", "running"], home)))[1][0] == sid
    assert ok(run_cli(["sessions", "ls", "--status", "completed"], home)) == "no sessions\n"
    listed = json.loads(ok(run_cli(["sessions", "--json"], home)))
    assert [s["id"] for s in listed["sessions"]] == [sid]
    assert (listed["total"], listed["limit"], listed["offset"]) == (1, 100, 0)

    # sessions show
    shown = ok(run_cli(["sessions", "show", sid], home))
    fields = dict(line.split(None, 1) for line in shown.split("\n\n")[0].splitlines())
    assert fields["status"] == "running"
    assert fields["prd"] == str((project / "prd.md").resolve())
    assert fields["project"] == str(project.resolve())
    assert "maxIterations=7" in fields["options"]
    task_table = rows(shown.split("\n\n")[1])
    assert task_table[0] == ["TASK", "STATUS", "PRI", "TRIES", "TITLE"]
    assert [row[:2] for row in task_table[1:]] == [
        ["prd-001", "active"],
        ["prd-002", "pending"],
        ["prd-003", "pending"],
    ]
    as_json = json.loads(ok(run_cli(["sessions", "show", sid, "--json"], home)))
    assert (as_json["id"], as_json["options"]["maxIterations"]) == (sid, 7)

    # tasks
    every = rows(ok(run_cli(["tasks"], home)))
    assert every[0] == ["SESSION", "TASK", "STATUS", "PRI", "TRIES", "TITLE"]
    assert [row[1] for row in every[1:]] == ["prd-001", "prd-002", "prd-003"]
    assert every[2][5] == "Second feature"
    active = rows(ok(run_cli(["tasks", "--active"], home)))
    assert [row[:2] for row in active[1:]] == [[sid, "prd-001"]]
    queue = rows(ok(run_cli(["tasks", "--queue"], home)))
    assert [row[1] for row in queue[1:]] == ["prd-002", "prd-003"]
    mine = json.loads(
        ok(run_cli(["tasks", "--session", sid, "--status", "pending", "--json"], home))
    )
    assert [t["id"] for t in mine["tasks"]] == ["prd-002", "prd-003"]
    assert ok(run_cli(["tasks", "--status", "failed"], home)) == "no tasks\n"

    # pause, input, resume, stop
    assert ok(run_cli(["sessions", "pause", sid], home)) == f"{sid} paused\n"
    fails(run_cli(["sessions", "pause", sid], home), "cannot pause", "409 CONFLICT")
    queued = ok(loki(["sessions", "input", sid, "-"], home, stdin="Focus on auth first\n"))
    input_id, state, _, target = queued.split()
    assert input_id.startswith("input-") and (state, target) == ("queued", sid)
    # With a key, a retry queues nothing more: the first answer; another message is 409.
    keyed = ["sessions", "input", sid, "Add tests", "--idempotency-key", "in-1"]
    first = ok(run_cli(keyed, home))
    assert ok(run_cli(keyed, home)) == first and first.split()[0] != input_id
    keyed[3] = "Something else"
    fails(run_cli(keyed, home), "409 CONFLICT", "Idempotency-Key 'in-1'")
    with daemon.control() as client:
        params = {"sessionId": sid, "types": "input.received"}
        received = client.get("/api/events/history", params=params)
    assert [e["data"]["inputId"] for e in received.json()["events"]] == [
        input_id,
        first.split()[0],
    ]
    assert ok(run_cli(["sessions", "resume", sid], home)) == f"{sid} running\n"
    fails(run_cli(["sessions", "rm", sid], home), "409 CONFLICT")
    stopping = json.loads(ok(run_cli(["sessions", "stop", sid, "--json"], home)))
    assert stopping["status"] in ("stopping", "stopped")
    wait_session(daemon, sid, lambda s: s["status"] == "stopped")

    # rm
    assert ok(run_cli(["sessions", "rm", sid], home)) == f"{sid} deleted\n"
    fails(run_cli(["sessions", "show", sid], home), "Session not found", "404 NOT_FOUND")
    assert ok(run_cli(["sessions"], home)) == "no sessions\n"
    code, _ = daemon.terminate()
    assert code == 0


def test_api_errors_go_to_stderr_with_the_field(tmp_path: Path, daemon: DaemonProcess) -> None:
    missing = fails(
        loki(["start", "missing.md"], daemon.home, cwd=tmp_path), "PRD not found", "[field: prd]"
    )
    assert str(tmp_path / "missing.md") in missing
    (tmp_path / "prd.md").write_text("# App\n\n## Features\n- one\n")
    fails(
        loki(["start", "prd.md", "--provider", "gpt-9"], daemon.home, cwd=tmp_path),
        "unknown provider",
        "[field: provider]",
    )
    fails(run_cli(["sessions", "input", "session-nope", "hello"], daemon.home), "Session not found")
    fails(run_cli(["sessions", "stop", "session-nope"], daemon.home), "Session not found", "404")
    fails(run_cli(["tasks", "--session", "session-nope"], daemon.home), "Session not found")
    fails(run_cli(["sessions", "ls", "--limit", "0"], daemon.home), "limit", "[field: limit]")
    assert json.loads(ok(run_cli(["sessions", "--json"], daemon.home)))["total"] == 0


def test_an_unusable_idempotency_key_is_a_usage_error(tmp_path: Path) -> None:
    """Refused before anything is sent (an HTTP client cannot even send some values)."""
    commands = (["start", "prd.md"], ["sessions", "input", "session-x", "hi"])
    for command, key in itertools.product(commands, ("clé", "tab\there", " " * 3, "k" * 256)):
        result = loki([*command, "--idempotency-key", key], tmp_path / "nohome")
        assert result.returncode == 2, (key, result.stderr)
        assert "Idempotency-Key must be 1-255 printable ASCII characters" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    """`loki ... | head -1`: stdout's reader is gone before the first write."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lokid", "config", "show"],
            env={**os.environ, "LOKI_HOME": str(tmp_path / "home")},
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert (result.returncode, result.stderr) == (141, "")  # 128 + SIGPIPE, no traceback


@pytest.mark.parametrize(
    "args",
    [
        ["start", "prd.md"],
        ["sessions"],
        ["sessions", "show", "session-x"],
        ["sessions", "pause", "session-x", "--now"],
        ["sessions", "rm", "session-x"],
        ["tasks", "--queue"],
    ],
)
def test_daemon_not_running(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(args, tmp_path / "nohome")
    fails(result, "lokid is not running", "loki serve")
