"""How `loki` reports what goes wrong at its edges, never with a traceback.

A daemon that hangs up (stopping), arguments that are not UTF-8, a socket or
data dir of another account, text with terminal escapes, odd path and id
arguments. Most tests run `loki` in this process against a fake socket.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lokid import cli
from lokid.cli import main
from lokid.process import identity

from .cli_kit import Cli

Handler = Callable[[socket.socket], None]


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Callable[[Handler], Path]]:
    """`serve(handler)`: a home whose control socket runs `handler` on each connection."""
    listeners: list[socket.socket] = []

    def serve(handler: Handler) -> Path:
        home = tmp_path / "home"
        (home / "lokid").mkdir(parents=True)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(home / "lokid" / "lokid.sock"))
        listener.listen()
        listeners.append(listener)

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # closed: the test is over
                    return
                with conn:
                    handler(conn)

        threading.Thread(target=accept, daemon=True).start()
        return home

    yield serve
    for listener in listeners:
        listener.close()


def _hang_up(conn: socket.socket) -> None:
    """Take the connection, read a little of the request, close it: a reset."""
    conn.settimeout(5)
    conn.recv(1)


# -- a daemon that hangs up -----------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["status"], ["sessions"], ["events"], ["events", "-f"], ["api", "start"], ["token", "ls"]],
)
def test_a_daemon_that_hangs_up_is_a_one_line_error(
    loki: Cli,
    fake_daemon: Callable[[Handler], Path],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """Regression: `httpx.ReadError: [Errno 104] Connection reset by peer` tracebacks
    from a daemon that is stopping (and `api start` must not start a second one)."""
    monkeypatch.setattr(cli, "_spawned", [])
    home = fake_daemon(_hang_up)
    result = loki.fails(home, *command)
    sock = home / "lokid" / "lokid.sock"
    assert result.err.startswith(
        f"loki: lokid closed the connection on {sock} without a whole answer (stopping?): "
    ), result.err
    assert result.err.count("\n") == 1
    assert cli._spawned == []


def test_events_follow_gives_up_on_a_daemon_that_sends_no_head(
    loki: Cli, fake_daemon: Callable[[Handler], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `loki events -f` waited forever for the stream's first byte."""
    monkeypatch.setattr(cli, "EVENTS_TIMEOUT", 0.2)
    gone = threading.Event()

    def silent(conn: socket.socket) -> None:
        gone.wait(10)

    home = fake_daemon(silent)
    try:
        started = time.monotonic()
        result = loki.fails(home, "events", "-f")
    finally:
        gone.set()
    assert time.monotonic() - started < 5
    sock = home / "lokid" / "lokid.sock"
    assert (
        result.err == f"loki: lokid did not answer on {sock} within 0.2 s (stopped, or too busy?)\n"
    )


def test_events_follow_waits_for_a_quiet_stream_past_the_head_timeout(
    loki: Cli, fake_daemon: Callable[[Handler], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound is on the head only: a stream may stay silent for longer."""
    monkeypatch.setattr(cli, "EVENTS_TIMEOUT", 0.2)
    event = (
        b'data: {"id": 7, "type": "log", "timestamp": "2026-11-29T10:00:00.000Z", '
        b'"level": "info", "data": {"message": "late"}}\n\n'
    )

    def quiet_stream(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        time.sleep(0.6)  # three head timeouts of silence
        for chunk in (event, b": closed: shutdown\n\n"):
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.sendall(b"0\r\n\r\n")

    home = fake_daemon(quiet_stream)
    result = loki.ok(home, "events", "-f")
    assert result.out.endswith("     7 info    log late\n"), result.out
    assert result.err == "loki: lokid is stopping: the event stream ended\n"


class Recorder:
    """A fake daemon's handler: records each request, answers every one with `answer`."""

    def __init__(self, answer: dict[str, Any] | Callable[[str], dict[str, Any]]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, Any]] = []

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        while length is not None and len(body) < int(length.group(1)):
            body += conn.recv(65536)
        target = head.split(b"\r\n")[0].decode()
        self.requests.append((target, json.loads(body) if body else None))
        answer = self.answer(target) if callable(self.answer) else self.answer
        payload = json.dumps(answer).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
        )


# -- arguments lokid cannot take ------------------------------------------------------

NOT_UTF8 = [
    (["start", "p\udcff.md"], "PRD is not valid UTF-8: p\\xff.md"),
    (["start", "p.md", "--project", "d\udcff"], "--project is not valid UTF-8: d\\xff"),
    (["registry", "add", "bad\udcffdir"], "PATH is not valid UTF-8: bad\\xffdir"),
    (["registry", "rm", "bad\udcffdir"], "ID|PATH is not valid UTF-8: bad\\xffdir"),
    (["registry", "discover", "--root", "\udcff"], "--root is not valid UTF-8: \\xff"),
    (["sessions", "show", "\udcff"], "ID is not valid UTF-8: \\xff"),
    (["sessions", "input", "s1", "\udcff"], "MESSAGE is not valid UTF-8: \\xff"),
    (["token", "create", "--name", "\udcff", "--scopes", "read"], "--name is not valid UTF-8"),
    (["token", "create", "--name", "n", "--scopes", "\udcff"], "--scopes is not valid UTF-8"),
    (["events", "--types", "\udcff"], "--types is not valid UTF-8: \\xff"),
    (["audit", "--action", "\udcff"], "--action is not valid UTF-8: \\xff"),
]


@pytest.mark.parametrize(("args", "said"), NOT_UTF8, ids=[" ".join(a[:2]) for a, _ in NOT_UTF8])
def test_an_argument_that_is_not_utf8_is_refused_by_name(
    loki: Cli, fake_daemon: Callable[[Handler], Path], args: list[str], said: str
) -> None:
    """Regression: a UnicodeEncodeError traceback from httpx (argv bytes that are not
    UTF-8 reach Python as lone surrogates, which JSON and URLs cannot carry)."""
    recorder = Recorder({})
    home = fake_daemon(recorder)
    result = loki(home, *args)
    assert result.code == 2
    assert result.err.startswith(f"loki: {said}") and result.err.count("\n") == 1, result.err
    assert recorder.requests == []


def test_a_message_on_stdin_that_is_not_utf8_is_refused(
    loki: Cli, fake_daemon: Callable[[Handler], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `head -c 300 /dev/urandom | loki sessions input ID -` (a traceback)."""
    recorder = Recorder({})
    home = fake_daemon(recorder)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok \xff\xfe")))
    result = loki(home, "sessions", "input", "s1", "-")
    assert (result.code, result.err) == (
        2,
        "loki: MESSAGE on stdin is not valid UTF-8: invalid start byte at byte 3\n",
    )
    assert recorder.requests == []


EMPTY = [
    (["start", ""], "PRD"),
    (["start", "p.md", "--project", ""], "--project"),
    (["registry", "add", ""], "PATH"),
    (["registry", "rm", ""], "ID|PATH"),
    (["registry", "discover", "--root", ""], "--root"),
    (["sessions", "show", ""], "ID"),
    (["sessions", "stop", ""], "ID"),
    (["tasks", "--session", ""], "--session"),
    (["token", "revoke", ""], "ID"),
]


@pytest.mark.parametrize(("args", "name"), EMPTY, ids=[" ".join(a[:2]) for a, _ in EMPTY])
def test_an_empty_path_or_id_is_refused(
    loki: Cli, fake_daemon: Callable[[Handler], Path], args: list[str], name: str
) -> None:
    """Regression: `registry add ""` registered this folder, `token revoke ""` said
    "No route for DELETE /dashboard/api/enterprise/tokens/"."""
    recorder = Recorder({})
    home = fake_daemon(recorder)
    result = loki(home, *args)
    assert (result.code, result.err) == (2, f"loki: {name} is empty (an unset variable?)\n")
    assert recorder.requests == []


def test_every_path_argument_expands_a_leading_tilde(
    loki: Cli,
    fake_daemon: Callable[[Handler], Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """One rule: `start` and `--project` took "~/x" literally, `registry add` expanded it."""
    recorder = Recorder({"id": "s1", "status": "starting"})
    home = fake_daemon(recorder)
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    loki.ok(home, "start", "~/x/prd.md", "--project", "~/x")
    loki.ok(home, "registry", "add", "~/x", "--json")
    loki.ok(home, "registry", "discover", "--root", "~/x", "--json")
    me = tmp_path / "me"
    assert recorder.requests[0][1] == {"prd": f"{me}/x/prd.md", "projectDir": f"{me}/x"}
    assert recorder.requests[1][1] == {"path": f"{me}/x"}
    assert recorder.requests[2][0].startswith(
        f"GET /dashboard/api/registry/discover?roots={urllib.parse.quote(str(me), safe='')}%2Fx "
    ), recorder.requests[2]


def test_registry_rm_takes_only_the_exact_id_form_for_an_id(
    loki: Cli,
    fake_daemon: Callable[[Handler], Path],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Regression: a folder named `reg-stuff` was sent as the id `reg-stuff` (404)."""
    recorder = Recorder({})
    home = fake_daemon(recorder)
    (tmp_path / "reg-stuff").mkdir()
    monkeypatch.chdir(tmp_path)
    folder_id = "reg-" + hashlib.sha256(str(tmp_path / "reg-stuff").encode()).hexdigest()[:12]
    assert loki.ok(home, "registry", "rm", "reg-stuff").out == f"{folder_id} unregistered\n"
    assert loki.ok(home, "registry", "rm", "reg-0123456789ab").out == (
        "reg-0123456789ab unregistered\n"
    )
    assert [target for target, _ in recorder.requests] == [
        f"DELETE /dashboard/api/registry/projects/{folder_id} HTTP/1.1",
        "DELETE /dashboard/api/registry/projects/reg-0123456789ab HTTP/1.1",
    ]


def _refusing(field: str, message: str) -> Handler:
    """A fake daemon that refuses every request with a 400 naming `field`."""

    def handler(conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.recv(65536)
        error = {"code": "INVALID_QUERY", "message": message, "details": {"field": field}}
        payload = json.dumps({"error": error}).encode()
        conn.sendall(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
        )

    return handler


@pytest.mark.parametrize(("follow", "field"), [([], "limit"), (["-f"], "history")])
def test_events_names_the_flag_the_daemon_refused(
    loki: Cli, fake_daemon: Callable[[Handler], Path], follow: list[str], field: str
) -> None:
    """Regression: `loki events -f --limit -1` said `history must be ...`, a query
    parameter the user never typed."""
    home = fake_daemon(_refusing(field, f"{field} must be between 0 and 1000, got -1"))
    result = loki.fails(home, "events", *follow, "--limit", "-1")
    assert result.err == "loki: --limit must be between 0 and 1000, got -1 (400 INVALID_QUERY)\n"


STATUS = {
    "phase": "running",
    "pid": 4242,
    "listeners": {
        "api": "http://127.0.0.1:8420",
        "dashboard": "http://127.0.0.1:57374",
        "socket": "/x/lokid.sock",
    },
}


@pytest.mark.parametrize(
    ("args", "code", "said"),
    [
        (["api", "start", "--port", "8420"], 0, ""),
        (["api", "start", "--port", "0"], 0, ""),
        (["api", "start"], 0, ""),
        (
            ["api", "start", "--port", "1234"],
            1,
            "loki: lokid already runs with the api on port 8420, not 1234; "
            "to move it, stop it first (`loki api stop`)\n",
        ),
        (
            ["dashboard", "start", "--port", "1234"],
            0,
            "loki: warning: lokid already runs with the dashboard on port 57374, not 1234; "
            "to move it, stop it first (`loki dashboard stop`)\n",
        ),
    ],
)
def test_a_start_with_another_port_than_the_running_daemons_says_so(
    loki: Cli,
    fake_daemon: Callable[[Handler], Path],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    code: int,
    said: str,
) -> None:
    """Regression: `loki api start --port 1234` said "already running" (port 8420), exit 0."""
    monkeypatch.setattr(cli, "_spawned", [])
    home = fake_daemon(Recorder(STATUS))
    result = loki(home, *args)
    assert (result.code, result.err) == (code, said)
    assert cli._spawned == []


# -- terminal escapes in what the daemon says ------------------------------------------

ESC = "p7\x1b[31mRED"
SHOWN = "p7\\x1b[31mRED"


def _session(target: str) -> dict[str, Any]:
    if target.startswith("GET /api/sessions/s1/tasks"):
        return {"tasks": [], "offset": 0, "total": 0}
    counts = {"completed": 0, "total": 0, "active": 0, "pending": 0, "failed": 0}
    return {
        "id": "s1",
        "status": "running",
        "provider": "claude",
        "prd": f"/x/{ESC}/prd.md",
        "projectDir": f"/x/{ESC}",
        "phase": None,
        "iteration": 0,
        "tasks": counts,
        "agents": {"active": 0, "total": 0},
        "costUsd": 0.0,
        "options": {"verify": f"make {ESC}"},
        "createdAt": "2026-11-29T10:00:00.000Z",
        "startedAt": None,
        "updatedAt": None,
        "endedAt": None,
        "exitReason": None,
    }


def test_sessions_show_escapes_control_characters(
    loki: Cli, fake_daemon: Callable[[Handler], Path]
) -> None:
    """Regression: `prd` and `project` printed a raw ESC (the terminal turned red)."""
    home = fake_daemon(Recorder(_session))
    out = loki.ok(home, "sessions", "show", "s1").out
    assert "\x1b" not in out
    assert f"prd          /x/{SHOWN}/prd.md\n" in out
    assert f"project      /x/{SHOWN}\n" in out
    assert f"options      verify=make {SHOWN}\n" in out


def test_registry_add_escapes_control_characters(
    loki: Cli, fake_daemon: Callable[[Handler], Path]
) -> None:
    """Regression: `loki registry add $'r\\x1b[2Jx'` printed `path .../r^[[2Jx` (clears
    the screen)."""
    entry = {
        "id": "reg-0123456789ab",
        "name": ESC,
        "path": f"/x/{ESC}",
        "status": "ok",
        "has_loki": False,
        "tasks": {"total": 0},
    }
    out = loki.ok(fake_daemon(Recorder(entry)), "registry", "add", "x").out
    assert "\x1b" not in out
    assert f"name    {SHOWN}\npath    /x/{SHOWN}\n" in out


def test_an_error_quoting_the_daemons_text_escapes_control_characters(
    loki: Cli, fake_daemon: Callable[[Handler], Path]
) -> None:
    """The daemon's messages quote paths: `PRD /x/p7\\x1b[31mRED is a directory`."""
    home = fake_daemon(_refusing("prd", f"PRD /x/{ESC} is a directory"))
    result = loki.fails(home, "start", "prd.md")
    assert result.err == f"loki: PRD /x/{SHOWN} is a directory (400 INVALID_QUERY) [field: prd]\n"


def test_status_escapes_control_characters(
    loki: Cli, fake_daemon: Callable[[Handler], Path]
) -> None:
    """Regression: the `loki status` rows printed the daemon's paths raw."""
    status = {
        "status": "ok",
        "version": "1",
        "pid": 1,
        "uptimeSeconds": 3,
        "provider": "claude",
        "session": None,
        "agents": {"active": 0, "total": 0},
        "listeners": {"api": "http://a", "dashboard": "http://d", "socket": f"/x/{ESC}.sock"},
        "supervisor": {"name": ESC, "strategy": "one_for_one", "restartsTotal": 0, "children": []},
    }
    out = loki.ok(fake_daemon(Recorder(status)), "status").out
    assert "\x1b" not in out
    assert f"socket     /x/{SHOWN}.sock\n" in out
    assert f"  {SHOWN} (one_for_one) restarts=0\n" in out


# -- another account's daemon -----------------------------------------------------------

NOBODY = 65534


def as_nobody(args: list[str], home: Path) -> tuple[int, str]:
    """`loki *args` in a forked child that dropped root for uid/gid 65534: the real
    EACCES/EPERM of the system-unit setup (a python nobody could exec is not at hand).
    (code, stderr); a traceback is code 99."""
    with contextlib.redirect_stderr(io.StringIO()):  # import what a request needs
        main(["--socket", str(home / "warm.sock"), "status"])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code, err = 99, io.StringIO()
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ["LOKI_HOME"] = str(home)
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(args)
        except BaseException:
            err.write(traceback.format_exc())
        finally:
            os.write(write_end, f"{code}\n{err.getvalue()}".encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read().decode()
    os.waitpid(pid, 0)
    first, _, said = data.partition("\n")
    return int(first), said


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")


@pytest.fixture
def root_home() -> Iterator[Path]:
    """A LOKI_HOME of root's; the path to it is open to everyone (pytest's tmp_path is
    under a 0700 folder)."""
    with tempfile.TemporaryDirectory(prefix="loki-other-", dir="/tmp") as where:
        home = Path(where) / "home"
        (home / "lokid").mkdir(parents=True)
        Path(where).chmod(0o755)
        yield home


@needs_root
@pytest.mark.parametrize("command", [["status"], ["config", "show"]])
def test_a_loki_home_of_another_account_is_a_config_error(
    root_home: Path, command: list[str]
) -> None:
    """Regression: every command ended in `PermissionError ... lokid.toml`."""
    root_home.chmod(0o700)
    assert as_nobody(command, root_home) == (
        2,
        f"loki: cannot look for the config file {root_home}/lokid.toml: Permission denied "
        "(its folder belongs to another account? set LOKI_HOME to one of yours)\n",
    )


@needs_root
@pytest.mark.parametrize("command", [["status"], ["api", "start"], ["sessions"]])
def test_a_socket_of_another_account_is_not_not_running(
    root_home: Path, command: list[str]
) -> None:
    """Regression: a data dir 0700 gave `PermissionError ... lokid.sock`; a socket 0600
    gave "lokid is not running ... Start it", inviting a second daemon."""
    root_home.chmod(0o755)
    sock = root_home / "lokid" / "lokid.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen()
        sock.chmod(0o600)
        (root_home / "lokid").chmod(0o700)
        hidden = as_nobody(command, root_home)
        (root_home / "lokid").chmod(0o755)
        refused = as_nobody(command, root_home)
    said = (
        f"loki: this user (uid {NOBODY}) may not use lokid's control socket {sock}: "
        "{} (Permission denied). lokid may be running as another account: run loki as "
        "that account or as root\n"
    )
    assert hidden == (1, said.format("cannot look into its folder"))
    assert refused == (1, said.format("it does not let this user connect"))
    assert not (root_home / "lokid" / "lokid.log").exists()  # `api start` started nothing


@needs_root
def test_api_stop_of_another_accounts_daemon_says_so(root_home: Path) -> None:
    """Regression: `PermissionError: [Errno 1] Operation not permitted` (os.kill); an
    unreadable pid file said "not running"."""
    root_home.chmod(0o755)
    pid_file = root_home / "lokid" / "lokid.pid"
    me = identity()
    assert me is not None
    pid_file.write_text(me.render() + "\n")  # this test's process: root's, alive
    pid_file.chmod(0o644)
    assert as_nobody(["api", "stop"], root_home) == (
        1,
        f"loki: lokid (pid {me.pid}) runs as another account: this user may not stop it "
        "(Operation not permitted); stop it as that account or as root "
        "(`systemctl stop lokid` for the system units)\n",
    )
    pid_file.chmod(0o600)
    assert as_nobody(["api", "stop"], root_home) == (
        1,
        f"loki: cannot read lokid's pid file {pid_file}: Permission denied (lokid runs as "
        "another account? stop it as that account or as root)\n",
    )
