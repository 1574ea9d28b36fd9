"""How `loki` reports what goes wrong at its edges, never with a traceback.

A daemon that hangs up (stopping), arguments that are not UTF-8, a socket or
data dir of another account, text with terminal escapes, odd path and id
arguments. Most tests run `loki` in this process against a fake socket.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lokid import cli

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
