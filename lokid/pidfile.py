"""One daemon per data directory: an exclusive lock plus a pid file.

The lock (`flock` on `lokid.lock`, never deleted, so two daemons can never
lock two different inodes) is what excludes a second daemon; the kernel drops
it when the process dies, so a crash never leaves a stale lock. The pid file
(`lokid.pid`, "pid start_ticks") is what the CLI reads to find and signal
the daemon; it is written after the lock is taken and removed at clean exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from lokid.errors import AlreadyRunning, StartupError
from lokid.process import ProcessIdentity, identity, is_same_process

log = logging.getLogger("lokid")


class DaemonLock:
    def __init__(self, lock_path: Path, pid_path: Path) -> None:
        self.lock_path = lock_path
        self.pid_path = pid_path
        self._fd: int | None = None

    def acquire(self) -> ProcessIdentity:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StartupError(f"cannot open lock file {self.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_pid_file(self.pid_path)
            who = f" (pid {other.pid})" if other else ""
            raise AlreadyRunning(
                f"lokid is already running{who} on data dir {self.lock_path.parent}; "
                "stop it with `loki api stop` or use another --data-dir"
            ) from None
        self._fd = fd
        me = identity()
        assert me is not None
        tmp = self.pid_path.with_suffix(".pid.tmp")
        try:
            tmp.write_text(me.render() + "\n")
            tmp.replace(self.pid_path)
        except OSError as exc:  # a full or read-only disk: say so in one line
            os.close(fd)
            self._fd = None
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StartupError(
                f"cannot write the pid file {self.pid_path}: {exc.strerror} (free some space "
                "on the data dir's file system, or make it writable)"
            ) from None
        return me

    def release(self) -> None:
        if self._fd is None:
            return
        current = read_pid_file(self.pid_path)
        if current is not None and current.pid == os.getpid():
            try:
                self.pid_path.unlink(missing_ok=True)
            except OSError as exc:  # a data dir gone read-only: the lock goes anyway
                log.warning("could not remove the pid file %s: %s", self.pid_path, exc.strerror)
        os.close(self._fd)
        self._fd = None


def read_pid_file(path: Path) -> ProcessIdentity | None:
    try:
        return ProcessIdentity.parse(path.read_text())
    except OSError:
        return None


def running_daemon(pid_path: Path) -> ProcessIdentity | None:
    """The daemon recorded in the pid file, if that very process is still alive."""
    recorded = read_pid_file(pid_path)
    if recorded is None or not is_same_process(recorded):
        return None
    return recorded
