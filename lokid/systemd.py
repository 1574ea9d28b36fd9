"""The systemd protocols lokid speaks, without libsystemd: notify and socket activation.

* `Notifier` sends `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1` datagrams
  to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). With no
  `NOTIFY_SOCKET` every call is a no-op, so the daemon needs no special case
  when it runs outside systemd.
* `watchdog_interval()` reads `WATCHDOG_USEC` (honouring `WATCHDOG_PID`) and
  returns how often to ping: half the timeout, as sd_watchdog_enabled(3) advises.
* `inherited_sockets()` reads `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` and
  returns the passed sockets by name (`api`, `dashboard`, `control`);
  unnamed fds, and fds named after their unit (`lokid.socket`, what systemd
  does without `FileDescriptorName=`), take those names in that order.

Pure functions of the environment; the daemon decides when to call them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from lokid.errors import StartupError

SD_LISTEN_FDS_START = 3
LISTENER_NAMES = ("api", "dashboard", "control")


class Notifier:
    """A connected datagram socket to the service manager, or nothing."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = address
        self._socket: socket.socket | None = None
        if address:
            target = "\0" + address[1:] if address.startswith("@") else address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(target)
            except OSError:
                sock.close()
            else:
                self._socket = sock
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram; never raises (a missing manager must not stop the daemon)."""
        if self._socket is None:
            return False
        try:
            self._socket.send("\n".join(lines).encode())
        except OSError:
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between `WATCHDOG=1` pings, or None when no watchdog is asked for."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return micros / 1_000_000 / 2


def inherited_sockets(environ: Mapping[str, str] | None = None) -> dict[str, socket.socket]:
    """The listening sockets systemd passed us, keyed by name; {} when none were passed."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise StartupError(f"LISTEN_FDS={env.get('LISTEN_FDS')!r} is not a number") from None
    if count <= 0:
        return {}
    names = [n for n in env.get("LISTEN_FDNAMES", "").split(":") if n and not n.endswith(".socket")]
    if names and len(names) != count:
        raise StartupError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS is {count}")
    if not names:
        if count > len(LISTENER_NAMES):
            raise StartupError(f"{count} unnamed sockets passed; name them (FileDescriptorName=)")
        names = list(LISTENER_NAMES[:count])
    sockets: dict[str, socket.socket] = {}
    for offset, name in enumerate(names):
        if name not in LISTENER_NAMES:
            raise StartupError(
                f"passed socket named {name!r}; expected one of {', '.join(LISTENER_NAMES)}"
            )
        if name in sockets:
            raise StartupError(f"two passed sockets are named {name!r}")
        fd = SD_LISTEN_FDS_START + offset
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise StartupError(f"passed fd {fd} ({name}) is not a socket: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM:
            raise StartupError(f"passed fd {fd} ({name}) is not a stream socket")
        os.set_inheritable(fd, False)
        sockets[name] = sock
    return sockets


def clear_activation_environment() -> None:
    """So that processes we spawn do not think the sockets are theirs."""
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
