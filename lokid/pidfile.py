"""The data directory: private to lokid's account, and one daemon per data directory
(an exclusive lock plus a pid file).

`prepare_data_dir` makes the folder 0700 (DESIGN.md §2: the control socket,
by default in it, is "mode 0600 in a 0700 folder"; the folder also holds the
database) before anything is written into it; see its docstring and
docs/security.md for what happens to an existing folder with another mode.

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
import stat
from pathlib import Path

from lokid.errors import AlreadyRunning, StartupError
from lokid.process import ProcessIdentity, identity, is_same_process

log = logging.getLogger("lokid")


DATA_DIR_MODE = 0o700
OURS = "lokid"
"""What lokid names its files in the data directory starts with this (`lokid.db`,
`lokid.db-wal`, `lokid.lock`, `lokid.sock`, `lokid.log`, the folder `lokid.held`, ...):
`prepare_data_dir` takes any other name for someone else's file."""


def prepare_data_dir(path: Path) -> None:
    """Create the data directory 0700, or make an existing one 0700 (DESIGN.md §2).

    The folder holds the database (sessions, PRDs, agent output, the audit log,
    token hashes) and, by default, the control socket; its files are made
    with the umask (the database 0644), so the folder's mode is what keeps
    other local users out. An existing folder of ours whose mode lets others
    in (restored with `cp -r`, unpacked from an archive, made by `mkdir -p`)
    is made 0700, with a WARNING naming the old mode: refusing would only make
    its owner type the `chmod`. It is left unchanged and start-up refused when
    changing it could harm someone else: a folder of another account (root
    would also leave files there its owner cannot use), a shared folder (the
    sticky bit: `/tmp`), or one that holds files that are not lokid's (a data
    dir pointed at `$HOME` or `/var/lib` must not make them private). The
    check and the change use one open file descriptor, so they are about the
    same folder.
    """
    created = False
    try:
        path.mkdir(mode=DATA_DIR_MODE, parents=True)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot create data dir {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise StartupError(f"the data dir {path} is not a folder") from None
    except OSError as exc:
        raise StartupError(f"cannot open data dir {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        mode = stat.S_IMODE(info.st_mode)
        if info.st_uid != os.getuid():
            raise StartupError(
                f"the data dir {path} belongs to uid {info.st_uid}, not to lokid's account "
                f"(uid {os.getuid()}); run lokid as its owner, or choose a folder of this "
                "account (--data-dir, LOKI_DATA_DIR)"
            )
        if created and mode != DATA_DIR_MODE:  # the umask took owner bits off too (0277: 0500)
            os.fchmod(fd, DATA_DIR_MODE)
            return
        if not mode & 0o077:
            return
        strangers = sorted(name for name in os.listdir(fd) if not name.startswith(OURS))
        if mode & stat.S_ISVTX or strangers:
            if mode & stat.S_ISVTX:
                what = "is a shared folder (sticky bit)"
            else:
                named = ", ".join(repr(name) for name in strangers[:3])
                what = f"holds files that are not lokid's ({named}{', ...' * bool(strangers[3:])})"
            raise StartupError(
                f"the data dir {path} has mode {mode:04o} and {what}: lokid keeps its database "
                "there and makes the folder private (0700), which it will not do to this one; "
                "choose a folder of lokid's own (--data-dir, LOKI_DATA_DIR), or make it 0700"
            )
        os.fchmod(fd, DATA_DIR_MODE)
        log.warning(
            "the data dir %s had mode %04o (other users could read the database): made it %04o",
            path,
            mode,
            DATA_DIR_MODE,
        )
    except OSError as exc:
        raise StartupError(f"cannot check or change data dir {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


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
