"""sd_notify and socket-activation parsing, against a real datagram socket and real fds."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lokid.errors import StartupError
from lokid.systemd import Notifier, inherited_sockets, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(2)
    yield path, server
    server.close()


def test_notifier_sends_ready_status_watchdog_stopping(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, server = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready("serving")
    assert server.recv(4096).decode().split("\n") == [
        "READY=1",
        "STATUS=serving",
        f"MAINPID={os.getpid()}",
    ]
    notifier.watchdog()
    assert server.recv(4096) == b"WATCHDOG=1"
    notifier.stopping("bye")
    assert server.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    notifier.close()


def test_notifier_abstract_namespace() -> None:
    name = f"lokid-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert server.recv(100) == b"STATUS=hello"
    finally:
        server.close()


def test_notifier_without_manager_is_a_no_op(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert Notifier({}).ready("x") is False
    # A socket path that does not exist: disabled, never raises.
    assert Notifier({"NOTIFY_SOCKET": str(tmp_path / "nope")}).watchdog() is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}, 0.1),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "zero"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def _listen_at(fd: int) -> socket.socket:
    """A listening socket whose descriptor is exactly `fd` (as systemd would pass it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    if sock.fileno() != fd:
        os.dup2(sock.fileno(), fd)
        sock.close()
        return socket.socket(fileno=fd)
    return sock


@pytest.fixture
def fds_3_4() -> Iterator[None]:
    saved = [os.dup(fd) if _is_open(fd) else None for fd in (3, 4)]
    yield
    for fd, copy in zip((3, 4), saved, strict=True):
        if copy is None:
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            os.dup2(copy, fd)
            os.close(copy)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_inherited_named_sockets(fds_3_4: None) -> None:
    first, second = _listen_at(3), _listen_at(4)
    ports = (first.getsockname()[1], second.getsockname()[1])
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dashboard:api"}
    sockets = inherited_sockets(env)
    assert set(sockets) == {"dashboard", "api"}
    assert sockets["dashboard"].getsockname()[1] == ports[0]
    assert sockets["api"].getsockname()[1] == ports[1]


def test_inherited_sockets_ignored_for_another_pid() -> None:
    assert inherited_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "2"}) == {}


def test_unknown_socket_name_is_a_startup_error(fds_3_4: None) -> None:
    _listen_at(3)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}
    with pytest.raises(StartupError, match="named 'web'"):
        inherited_sockets(env)


def test_fds_named_after_the_unit_are_taken_in_order(fds_3_4: None) -> None:
    first, second = _listen_at(3), _listen_at(4)
    env = {
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "lokid.socket:lokid.socket",
    }
    sockets = inherited_sockets(env)
    assert sockets["api"].getsockname() == first.getsockname()
    assert sockets["dashboard"].getsockname() == second.getsockname()
