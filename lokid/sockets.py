"""Listening sockets: TCP with the dashboard's "next free port" rule, and the control socket.

lokid binds its sockets itself (or takes them from systemd) and hands them to
the listeners, so that a listener restarted by its supervisor keeps the same
port, and socket activation needs no special path in the listeners.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from lokid.errors import StartupError
from lokid.process import ProcessIdentity, identity, is_same_process

log = logging.getLogger("lokid")

BACKLOG = 1024
PROBE_TIMEOUT = 1.0  # seconds to wait for a connection to an existing control socket
PORT_FALLBACK_ATTEMPTS = 100  # how far past a taken dashboard port we look


def bind_tcp(host: str, port: int, *, what: str, fallback: bool = False) -> socket.socket:
    """Bind and listen on host:port; with `fallback`, a taken port moves to the next one."""
    attempts = PORT_FALLBACK_ATTEMPTS if fallback and port != 0 else 1
    last_error: OSError | None = None
    last = min(port + attempts, 65536) - 1
    for candidate in range(port, last + 1):
        try:
            return _bind_one(host, candidate)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise StartupError(
                    f"cannot listen for the {what} on {host}:{candidate}: {exc.strerror}"
                ) from None
            last_error = exc
    assert last_error is not None
    if attempts == 1:
        raise StartupError(
            f"cannot listen for the {what} on {host}:{port}: the port is in use "
            "(another lokid? choose another port)"
        )
    raise StartupError(f"no free port for the {what} in {port}-{last} on {host}")


def _bind_one(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve listen address {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def bind_unix(path: Path) -> tuple[socket.socket, SocketPathLock]:
    """The control socket, mode 0600: only lokid's account (and root) can connect.

    Its folder must belong to us. By default it is the data dir, which
    `lokid.pidfile.prepare_data_dir` has made 0700 (DESIGN.md §2). A folder given
    with `--socket` is created with mode 0700 when missing; an existing one is used
    as it is, never chmod-ed: it may be shared (`/tmp`, `/run`), and the socket's
    own mode is what keeps other users out. A socket file already
    at `path` is replaced only when nothing listens on it (left by a daemon that
    crashed): `socket_path` is independent of the data directory, so the data
    directory lock does not say that no other lokid serves on it. That check and
    the bind are made under the path's own lock (`SocketPathLock`), which the
    caller holds until it has removed the socket file at exit. Every refusal
    comes before anything on disk is changed, but for the lock file.
    """
    if len(os.fsencode(path)) >= 104:
        raise StartupError(
            f"control socket path {path} is too long for a Unix socket (max 103 bytes)"
        )
    _socket_folder(path.parent)
    lock = SocketPathLock(path)
    lock.acquire()
    try:
        sock = _bind_unix_locked(path)
        info = os.lstat(path)
    except BaseException:
        lock.release()
        raise
    lock.bound = (info.st_dev, info.st_ino)
    return sock, lock


def _bind_unix_locked(path: Path) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot create the control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    sock.set_inheritable(False)
    return sock


class SocketPathLock:
    """One daemon per control socket path: an exclusive `flock` on `<path>.lock`.

    "Nothing listens, unlink the stale file, bind" is not atomic: two daemons
    (two data dirs, so two data-dir locks) started at once on one socket path
    could both find it free, and the second's unlink and bind would take the
    path from the first (whose exit would then remove the second's socket).
    Taken before that check and released only after the socket file is removed
    at exit, the lock makes the path one daemon's at a time. Like `lokid.lock`
    the file is never deleted (two daemons could otherwise lock two inodes of
    one name), the kernel drops the lock when its process dies, and it holds
    "pid start_ticks" of its holder, for the refusal's message only.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self._fd: int | None = None
        self.bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    def acquire(self) -> None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            who = f" (pid {holder.pid})" if holder else ""
            raise StartupError(
                f"another lokid{who} serves or is starting on the control socket "
                f"{self.socket_path} (it holds {self.path}); stop it, or choose another "
                "socket path (--socket, LOKI_SOCKET)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd = fd
        _record_holder(fd)

    def _open(self) -> int:
        """Our own regular file at `self.path` (created 0600), never through a symlink."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and _listening(
                self.socket_path
            ):
                # e.g. systemd's /run/lokid: its listener is the news, not the folder's mode
                raise _listening_refusal(self.socket_path) from None
            raise StartupError(
                f"cannot open the control socket's lock file {self.path}: {exc.strerror}"
            ) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            os.close(fd)
            raise StartupError(
                f"{self.path} is not a regular file of ours (uid {info.st_uid}); "
                "refusing to use it as the control socket's lock"
            )
        return fd

    def remove_socket(self) -> None:
        """Remove the socket file at exit, only if it is still the one we bound.

        Our data dir may have been removed under us (`rm -rf`, locks and all) and
        a new daemon started on it: the socket at the path is then its own, and
        removing it by name would cut that daemon off. Compared by (st_dev,
        st_ino), with `lstat` right before the `unlink`.
        """
        try:
            info = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not check %s: %s", self.socket_path, exc.strerror)
            return
        if (info.st_dev, info.st_ino) != self.bound:
            log.warning(
                "%s is no longer the socket this daemon bound (another daemon's?): left in place",
                self.socket_path,
            )
            return
        try:
            self.socket_path.unlink(missing_ok=True)
        except OSError as exc:  # a data dir gone read-only: exit cleanly anyway
            log.warning("could not remove %s: %s", self.socket_path, exc.strerror)

    def release(self) -> None:
        """Drop the lock; the file stays (see the class docstring)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _record_holder(fd: int) -> None:
    me = identity()
    try:
        os.ftruncate(fd, 0)
        if me is not None:
            os.pwrite(fd, (me.render() + "\n").encode(), 0)
    except OSError as exc:  # a full disk: the lock holds anyway, only the name is lost
        log.warning("could not record our pid in the control socket's lock: %s", exc.strerror)


def _lock_holder(fd: int) -> ProcessIdentity | None:
    """The process recorded in the lock file, if it is still alive (not a reused pid)."""
    try:
        recorded = ProcessIdentity.parse(os.pread(fd, 64, 0).decode(errors="replace"))
    except OSError:
        return None
    return recorded if recorded is not None and is_same_process(recorded) else None


def _socket_folder(folder: Path) -> None:
    """Check (or create, mode 0700) the control socket's folder; never change its mode."""
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(
            f"cannot create the control socket folder {folder}: {exc.strerror}"
        ) from None
    try:
        info = folder.stat()
    except OSError as exc:
        raise StartupError(
            f"cannot use the control socket folder {folder}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise StartupError(f"the control socket folder {folder} is not a folder")
    if info.st_uid != os.getuid():
        raise StartupError(
            f"the control socket folder {folder} belongs to uid {info.st_uid}, not to us"
        )
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        log.warning(
            "the control socket folder %s is writable by other users: they could replace "
            "the socket; a folder of mode 0700 (or with the sticky bit) is safer",
            folder,
        )


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file at `path` that nothing listens on; refuse anything else."""
    try:
        existing = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"cannot check the control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(existing.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    if _listening(path):
        raise _listening_refusal(path)
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot replace the stale socket {path}: {exc.strerror}") from None


def _listening_refusal(path: Path) -> StartupError:
    return StartupError(
        f"another process listens on the control socket {path} (another lokid?); "
        "stop it, or choose another socket path (--socket, LOKI_SOCKET)"
    )


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket `path` (bounded wait)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # a stale file (or gone meanwhile)
    except TimeoutError:
        return True  # its backlog is full: a listener that does not accept now
    except OSError as exc:
        raise StartupError(
            f"cannot tell whether a process listens on the control socket {path}: "
            f"{exc.strerror}; refusing to replace it"
        ) from None
    finally:
        probe.close()
    return True


def is_loopback_socket(sock: socket.socket) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    host = sock.getsockname()[0]
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def socket_url(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED).

    Raises `OSError` when they cannot be read (the peer is gone): the listener then
    drops the connection; it never guesses credentials (see lokid/actors/listener.py).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
