"""HttpListener, the control socket it serves on, and the process-identity helpers."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from lokid.actors.listener import HttpListener, _TCPServer
from lokid.errors import StartupError
from lokid.http.surface import Scope
from lokid.pidfile import DaemonLock, prepare_data_dir, read_pid_file, running_daemon
from lokid.process import ProcessIdentity, identity, is_same_process
from lokid.sockets import SocketPathLock, bind_tcp, bind_unix
from lokid.supervisor import ChildStatus
from lokid.timefmt import utc_now_iso


async def hello_app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = utc_now_iso().encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_listener_serves_and_stops_gracefully() -> None:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    listener = HttpListener("t", hello_app, [sock], graceful_timeout=1)
    stop = trio.Event()

    async def run_supervised(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await listener.run(task_status=ChildStatus(task_status, shutdown_requested=stop))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_supervised)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{port}/")
                assert answer.status_code == 200
                assert listener.statistics().connections_total == 1
            stop.set()
    stats = listener.statistics()
    assert not stats.running
    assert stats.connections_open == 0
    # The listener worked on a duplicate: our socket is still open for a restart.
    assert sock.fileno() != -1
    sock.close()


async def test_listener_restart_reuses_the_same_socket() -> None:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    listener = HttpListener("t", hello_app, [sock], graceful_timeout=1)
    with trio.fail_after(10):
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run)
                async with httpx.AsyncClient() as client:
                    assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
                nursery.cancel_scope.cancel()
    sock.close()


async def test_a_stop_cuts_a_write_to_a_peer_that_stopped_reading() -> None:
    """Hypercorn shields its writes from cancellation; a write blocked by a peer that never
    reads held the listener's stop (and the daemon's) forever. It ends with the drain."""
    sock = loopback_socket()
    port = sock.getsockname()[1]
    sent: list[int] = []

    async def flood_app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while True:
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
            sent.append(1)

    listener = HttpListener("t", flood_app, [sock], graceful_timeout=0.5)
    stop = trio.Event()
    stopped = trio.Event()
    stopped_at: list[float] = []

    async def run_supervised(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await listener.run(task_status=ChildStatus(task_status, shutdown_requested=stop))
        stopped_at.append(trio.current_time())
        stopped.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_supervised)
            peer = await trio.open_tcp_stream("127.0.0.1", port)
            await peer.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # and never read
            seen = -1
            while seen != len(sent):  # the app's writes stopped: one is stuck
                seen = len(sent)
                await trio.sleep(0.3)
            started = trio.current_time()
            stop.set()
            with trio.move_on_after(3):
                await stopped.wait()
            await peer.aclose()  # before, only this ended the write (and the stop)
    assert stopped_at[0] - started < 0.5 + 0.5
    sock.close()


class FakeStream:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def send_eof(self) -> None:
        self.calls.append("send_eof")

    async def aclose(self) -> None:
        self.calls.append("aclose")


async def test_close_during_a_write_skips_eof_but_closes() -> None:
    """Regression: Hypercorn sent EOF while the app wrote (BusyResourceError in the app)."""
    server: Any = _TCPServer.__new__(_TCPServer)
    server.stream = FakeStream()
    server.send_lock = trio.Lock()
    async with server.send_lock:  # a write is in flight
        await server._close()
    assert server.stream.calls == ["aclose"]
    server.stream = FakeStream()
    await server._close()  # no write in flight: EOF first, then close
    assert server.stream.calls == ["send_eof", "aclose"]
    assert not server.send_lock.locked()


def test_process_identity_needs_pid_and_start_time() -> None:
    me = identity()
    assert me is not None and me.pid == os.getpid()
    assert is_same_process(me)
    assert not is_same_process(ProcessIdentity(me.pid, me.start_ticks + 1))
    assert ProcessIdentity.parse(me.render()) == me
    assert ProcessIdentity.parse("12") is None
    assert ProcessIdentity.parse("a b") is None


def test_pid_file_of_a_dead_or_reused_pid_is_not_a_running_daemon(tmp_path: Path) -> None:
    pid_file = tmp_path / "lokid.pid"
    me = identity()
    assert me is not None
    pid_file.write_text(f"{me.pid} {me.start_ticks + 7}\n")  # same pid, another process
    assert running_daemon(pid_file) is None
    pid_file.write_text("garbage\n")
    assert running_daemon(pid_file) is None


def test_lock_excludes_a_second_holder_and_release_removes_pid_file(tmp_path: Path) -> None:
    from lokid.errors import AlreadyRunning

    first = DaemonLock(tmp_path / "lokid.lock", tmp_path / "lokid.pid")
    first.acquire()
    assert read_pid_file(tmp_path / "lokid.pid") == identity()
    second = DaemonLock(tmp_path / "lokid.lock", tmp_path / "lokid.pid")
    try:
        second.acquire()
    except AlreadyRunning as exc:
        assert f"pid {os.getpid()}" in exc.message
    else:
        raise AssertionError("second lock holder was admitted")
    first.release()
    assert not (tmp_path / "lokid.pid").exists()
    assert (tmp_path / "lokid.lock").exists()  # never deleted
    second.acquire()
    second.release()


# -- the data directory (lokid.pidfile.prepare_data_dir) ------------------------------

ANOTHER_UID = 65534  # nobody
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder away")


@pytest.mark.parametrize("umask", [0, 0o077, 0o277, 0o700], ids=lambda m: f"{m:04o}")
def test_a_missing_data_dir_is_made_0700_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """docs/security.md: "created 0700, whatever the umask". `mkdir(0o700)` takes the
    umask's owner bits off too: under 0277 the folder was made 0500 and under 0700 made
    0000, which lokid's own account (not root) cannot write its database in."""
    data = tmp_path / "home" / "lokid"
    (tmp_path / "home").mkdir()
    old_umask = os.umask(umask)
    try:
        prepare_data_dir(data)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


@pytest.mark.parametrize("loose", [0o755, 0o750, 0o777, 0o2775], ids=lambda m: f"{m:04o}")
def test_a_data_dir_of_ours_that_others_can_enter_is_made_0700_and_said(
    tmp_path: Path, loose: int, caplog: pytest.LogCaptureFixture
) -> None:
    """DESIGN.md §2: the control socket is "mode 0600 in a 0700 folder", by default the
    data dir, which also holds the database (0644 by the umask). A data dir that existed
    with another mode (restored with `cp -r`, made by `mkdir -p`) was used as it was:
    every local user could read the database."""
    data = tmp_path / "lokid"
    data.mkdir()
    (data / "lokid.db").write_bytes(b"")
    (data / "lokid.log").write_bytes(b"")
    data.chmod(loose)
    prepare_data_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    [record] = [r for r in caplog.records if r.name == "lokid"]
    assert record.levelno == logging.WARNING
    assert f"had mode {loose:04o}" in record.getMessage()
    caplog.clear()
    prepare_data_dir(data)  # 0700 already: nothing to say
    assert [r for r in caplog.records if r.name == "lokid"] == []


@pytest.mark.parametrize(
    ("mode", "files", "words"),
    [
        (0o755, ["lokid.db", "notes.txt"], "holds files that are not lokid's ('notes.txt')"),
        (0o1777, [], "is a shared folder (sticky bit)"),
    ],
    ids=["other-files", "sticky"],
)
def test_a_loose_data_dir_that_is_not_only_lokid_s_is_refused_and_kept(
    tmp_path: Path, mode: int, files: list[str], words: str
) -> None:
    """A data dir pointed at $HOME, /var/lib or /tmp must not be made private."""
    data = tmp_path / "shared"
    data.mkdir()
    for name in files:
        (data / name).write_text("x")
    data.chmod(mode)
    with pytest.raises(StartupError, match="has mode") as refused:
        prepare_data_dir(data)
    assert words in str(refused.value)
    assert stat.S_IMODE(data.stat().st_mode) == mode
    assert sorted(p.name for p in data.iterdir()) == files


@as_root
def test_a_data_dir_of_another_account_is_refused_and_kept(tmp_path: Path) -> None:
    data = tmp_path / "theirs"
    data.mkdir(mode=0o755)
    os.chown(data, ANOTHER_UID, ANOTHER_UID)
    with pytest.raises(StartupError, match=f"belongs to uid {ANOTHER_UID}, not to lokid's"):
        prepare_data_dir(data)
    info = data.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (ANOTHER_UID, 0o755)


def test_a_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="is not a folder"):
        prepare_data_dir(tmp_path / "file")


# -- the control socket (lokid.sockets.bind_unix) ------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextmanager
def control_socket(path: Path) -> Iterator[socket.socket]:
    """`bind_unix(path)`, its socket closed and its path's lock released at the end."""
    sock, lock = bind_unix(path)
    try:
        yield sock
    finally:
        sock.close()
        lock.release()


def connects(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_control_socket_is_0600_and_a_missing_folder_is_made_0700(tmp_path: Path) -> None:
    path = tmp_path / "new" / "l.sock"
    old_umask = os.umask(0)  # the folder's mode must not depend on the umask
    try:
        with control_socket(path):
            assert mode(path) == 0o600
            assert mode(path.parent) == 0o700
            assert mode(tmp_path / "new" / "l.sock.lock") == 0o600
    finally:
        os.umask(old_umask)


def test_an_existing_shared_folder_keeps_its_mode(tmp_path: Path) -> None:
    """Regression: the folder was chmod-ed 0700, even /tmp (its sticky bit lost)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with control_socket(shared / "l.sock"):
        assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
        assert mode(shared / "l.sock") == 0o600


def test_a_socket_folder_others_may_write_is_kept_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder given with --socket is the user's: its mode is not changed (it may be
    shared on purpose); the socket's 0600 and the peer check keep others out, and
    a folder where others could replace the socket is warned about."""
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with control_socket(loose / "l.sock"):
        assert stat.S_IMODE(loose.stat().st_mode) == 0o777
        assert mode(loose / "l.sock") == 0o600
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "is writable by other users" in warning.getMessage()


@as_root
def test_a_socket_folder_of_another_account_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, ANOTHER_UID, ANOTHER_UID)
    with pytest.raises(StartupError, match=f"belongs to uid {ANOTHER_UID}, not to us"):
        bind_unix(theirs / "l.sock")
    assert list(theirs.iterdir()) == []


def test_a_refusal_changes_nothing_on_disk(tmp_path: Path) -> None:
    """Nothing but the socket's lock file, which is left unlocked."""
    shared = tmp_path / "shared"
    (shared / "adir").mkdir(parents=True)
    shared.chmod(0o1777)
    with pytest.raises(StartupError, match="exists and is not a socket; refusing to replace it"):
        bind_unix(shared / "adir")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert (shared / "adir").is_dir()
    with open(shared / "adir.lock") as lock_file:  # released: another start may take it
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    with control_socket(path):
        assert connects(path)


def test_a_socket_someone_listens_on_is_not_taken_over(tmp_path: Path) -> None:
    """Regression: a second daemon on the same socket path silently replaced the first's."""
    path = tmp_path / "l.sock"
    first = socket.socket(socket.AF_UNIX)
    first.bind(str(path))
    first.listen()
    inode = path.lstat().st_ino
    try:
        with pytest.raises(
            StartupError, match=f"another process listens on the control socket {path}"
        ):
            bind_unix(path)
        assert path.lstat().st_ino == inode  # the first one's socket file is still there
        assert connects(path)
    finally:
        first.close()


def test_a_daemon_starting_on_the_path_holds_it_off(tmp_path: Path) -> None:
    """Regression: two daemons starting at once on one socket path could both find it
    free (a stale file, nobody listening yet); the second's unlink and bind took the
    path from the first. The first holds `<path>.lock` from before its check."""
    path = tmp_path / "l.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # what the first one is about to replace: nobody listens
    stale.close()
    inode = path.lstat().st_ino
    me = identity()
    assert me is not None
    with open(tmp_path / "l.sock.lock", "w") as held:  # the first daemon, mid-start
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(me.render() + "\n")
        held.flush()
        with pytest.raises(StartupError) as refused:
            bind_unix(path)
        assert path.lstat().st_ino == inode  # its file is not touched
    assert refused.value.message == (
        f"another lokid (pid {me.pid}) serves or is starting on the control socket {path} "
        f"(it holds {path}.lock); stop it, or choose another socket path (--socket, LOKI_SOCKET)"
    )


def test_the_lock_outlives_the_socket_and_the_next_daemon_takes_it(tmp_path: Path) -> None:
    """Held while the first one serves (its socket keeps working), and the file stays."""
    path = tmp_path / "l.sock"
    with control_socket(path):
        with pytest.raises(StartupError, match=f"pid {os.getpid()}\\) serves or is starting"):
            bind_unix(path)
        assert connects(path)
    assert (tmp_path / "l.sock.lock").exists()  # never deleted
    with control_socket(path):  # the stale socket file of the first is replaced
        assert connects(path)


def test_a_dead_holder_is_not_named(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    me = identity()
    assert me is not None
    with open(tmp_path / "l.sock.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{me.pid} {me.start_ticks + 1}\n")  # a reused pid
        held.flush()
        with pytest.raises(StartupError) as refused:
            SocketPathLock(path).acquire()
    assert refused.value.message.startswith(
        f"another lokid serves or is starting on the control socket {path} "
    )


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "l.sock.lock").symlink_to(target)
    with pytest.raises(StartupError, match="cannot open the control socket's lock file"):
        bind_unix(tmp_path / "l.sock")
    assert not target.exists()
    assert not (tmp_path / "l.sock").exists()


def test_the_port_fallback_stops_at_65535_and_says_so() -> None:
    """A dashboard port near the top looks at what is left, not past 65535."""
    held = []
    try:
        for port in (65534, 65535):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:
                sock.close()  # in use by someone else: as good for this test
            else:
                held.append(sock)
        with pytest.raises(StartupError) as refused:
            bind_tcp("127.0.0.1", 65534, what="dashboard", fallback=True)
        assert refused.value.message == "no free port for the dashboard in 65534-65535 on 127.0.0.1"
    finally:
        for sock in held:
            sock.close()


def test_a_lock_we_may_not_create_beside_a_listener_names_the_listener(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Say systemd's /run/lokid (read-only to us) and its socket: the news is the listener."""
    path = tmp_path / "l.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    real_open = os.open

    def no_lock_file(file: Any, flags: int, mode: int = 0o777) -> int:
        if str(file).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, flags, mode)

    monkeypatch.setattr(os, "open", no_lock_file)
    try:
        with pytest.raises(
            StartupError, match=f"another process listens on the control socket {path}"
        ):
            bind_unix(path)
        listener.close()  # nobody listens now: the folder is what is wrong
        with pytest.raises(StartupError) as refused:
            bind_unix(path)
    finally:
        listener.close()
    assert refused.value.message == (
        f"cannot open the control socket's lock file {path}.lock: Permission denied"
    )


@pytest.mark.parametrize(
    ("pieces", "status", "message"),
    [
        (
            [b"GET / HTTP/1.1\r\n\r\n"],
            400,
            "malformed HTTP request: Missing mandatory Host: header",
        ),
        ([b"GARBAGE\r\n\r\n"], 400, "malformed HTTP request: illegal request line"),
        (
            [b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n"],
            400,
            "malformed HTTP request: bad Content-Length",
        ),
        # over h11's limit while still incomplete
        (
            [b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000, b"\r\n\r\n"],
            431,
            "request head too large (over 16384 bytes)",
        ),
    ],
)
async def test_a_head_hypercorn_refuses_gets_the_error_body(
    pieces: list[bytes], status: int, message: str
) -> None:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    listener = HttpListener("t", hello_app, [sock], graceful_timeout=1)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.run)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            async with client:
                for piece in pieces:
                    await client.send_all(piece)
                    await trio.sleep(0.05)
                answer = b""
                while chunk := await client.receive_some():
                    answer += chunk
            nursery.cancel_scope.cancel()
    sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode())
    assert b"content-type: application/json" in head.lower()
    code = "HEADERS_TOO_LARGE" if status == 431 else "BAD_REQUEST"
    assert json.loads(body) == {"error": {"code": code, "message": message, "details": {}}}


async def test_a_control_peer_whose_credentials_cannot_be_read_is_dropped_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer gone before its SO_PEERCRED was read was a stranger (uid -1): a warning,
    a refused peer counted. It is a dropped connection, closed without an answer."""

    def gone(sock: socket.socket) -> tuple[int, int, int]:
        raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

    monkeypatch.setattr("lokid.actors.listener.peer_credentials", gone)
    with control_socket(tmp_path / "lokid.sock") as sock:
        listener = HttpListener("control", hello_app, [sock], check_peer=True)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(listener.run)
                client = trio.socket.socket(socket.AF_UNIX)
                await client.connect(str(tmp_path / "lokid.sock"))
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer = await client.recv(65536)
                except ConnectionResetError:  # closed with the request unread
                    answer = b""
                assert answer == b""  # closed, no answer
                client.close()
                stats = listener.statistics()
                assert (stats.connections_dropped, stats.peers_refused) == (1, 0)
                assert stats.running
                nursery.cancel_scope.cancel()


class ResettingListener:
    """A `trio.SocketListener` whose first accept fails for that connection only."""

    def __init__(self) -> None:
        self.accepts = 0

    async def accept(self) -> trio.SocketStream:
        self.accepts += 1
        if self.accepts == 1:
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_an_accept_failing_for_one_connection_goes_on_accepting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listener = HttpListener("t", hello_app, [loopback_socket()])
    fake = ResettingListener()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            accept_loop: Any = listener._accept_loop
            nursery.start_soon(accept_loop, fake, nursery, trio.Semaphore(1), None)
            await trio.sleep(1)
            assert fake.accepts == 2  # the slot was given back, the loop goes on
            assert listener.statistics().connections_dropped == 1
            nursery.cancel_scope.cancel()
    for sock in listener.sockets:
        sock.close()
