"""`loki service install`: the systemd units of this installation, written where systemd reads them.

Four units, system or user flavour, rendered in code (no package data):

    lokid.service            Type=notify, watchdog, restart, hardening
    lokid.socket             the HTTP API listener, FileDescriptorName=api
    lokid-dashboard.socket   the Dashboard API listener, FileDescriptorName=dashboard
    lokid-control.socket     the Unix control socket, FileDescriptorName=control

Why three socket units: `FileDescriptorName=` names every fd of its unit, so
three listeners with three names need three units, and systemd passes the fds
of several socket units in no fixed order (it walks a hash set), so only the
names tell lokid which is which (`lokid.systemd.inherited_sockets`).
`lokid.socket` pulls in the other two (`Wants=`, `Also=`), so
`systemctl enable --now lokid.socket` is the one command an operator needs.

`render_units` is a pure function of `UnitSettings`; `settings_for` derives
those from the configuration and this installation (the `lokid` executable
next to `sys.executable`). The files under `systemd/` in the source tree are
`reference_units()`, regenerated with `python -m lokid.service systemd`.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import pwd
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from lokid.config import PARSERS, SETTINGS, Config, find_config_file
from lokid.errors import ConfigError, LokiError

SERVICE = "lokid.service"
API_SOCKET = "lokid.socket"
DASHBOARD_SOCKET = "lokid-dashboard.socket"
CONTROL_SOCKET = "lokid-control.socket"
UNIT_NAMES = (SERVICE, API_SOCKET, DASHBOARD_SOCKET, CONTROL_SOCKET)

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_LOKI_HOME = "/var/lib/lokid"  # StateDirectory=lokid
SYSTEM_SOCKET = "/run/lokid/lokid.sock"
MAX_SOCKET_PATH = 103  # bytes; sun_path is 108 with the terminating NUL, lokid keeps 104
SYSTEMCTL_TIMEOUT = 120.0
# Settings the installer places itself (system units: /run/lokid/lokid.sock and the state
# directory, whatever the installing shell had); every other one is carried (`carried_settings`).
PLACED_SETTINGS = frozenset({"socket_path", "data_dir"})
# TimeoutStopSec= is shutdown_grace + this (the hurry's 2 s, and up to 10 s for agents the
# kernel holds: docs/operations.md, "How long a stop takes"), and never below the minimum.
STOP_ALLOWANCE = 12
MIN_TIMEOUT_STOP = 30


class ServiceError(LokiError):
    """`loki service install` cannot do what was asked (the message says why)."""


@attrs.frozen
class UnitSettings:
    """Everything that varies between two renderings of the units.

    Paths are final unit-file text: `%` already escaped, `%h` already substituted
    for the home directory in user units.
    """

    user: bool
    exec_start: str
    loki_home: str
    api_listen: str
    dashboard_listen: str
    socket_path: str
    data_dir: str | None = None  # LOKI_DATA_DIR, when not under LOKI_HOME
    run_as: str | None = None  # system units: User=
    run_as_home: str | None = None  # system units: the one home that stays writable
    documentation: str | None = None
    # (LOKI_* variable, value as unit text): the configuration install ran with
    environment: tuple[tuple[str, str], ...] = ()
    timeout_stop: int = MIN_TIMEOUT_STOP  # seconds, TimeoutStopSec=


# -- rendering -----------------------------------------------------------------


def render_units(settings: UnitSettings) -> dict[str, str]:
    """Unit file name -> text."""
    return {
        SERVICE: _render_service(settings),
        API_SOCKET: _render_api_socket(settings),
        DASHBOARD_SOCKET: _render_dashboard_socket(settings),
        CONTROL_SOCKET: _render_control_socket(settings),
    }


def _render_service(s: UnitSettings) -> str:
    kind, flag = ("user", " --user") if s.user else ("system", "")
    lines = [
        f"# lokid as a {kind} service, written by `loki service install{flag}`.",
        f"# Change it with `systemctl{flag} edit lokid.service`: a drop-in survives a",
        "# re-install. docs/operations.md (section systemd) explains the choices.",
        "[Unit]",
        "Description=lokid - supervisor of autonomous coding-agent sessions",
    ]
    if s.documentation:
        lines.append(f"Documentation={s.documentation}")
    if not s.user:
        lines.append("After=network.target")
    lines += [
        "# A crash loop is not a service: give up after 5 failed starts in 2 minutes.",
        "StartLimitIntervalSec=120",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "# READY=1 only once the store is open and every listener accepts; then",
        "# STATUS= lines, and STOPPING=1 when a stop begins.",
        "Type=notify",
        "# Only lokid itself may notify, never an agent it runs.",
        "NotifyAccess=main",
        f"ExecStart={s.exec_start}",
        "SyslogIdentifier=lokid",
        "# The three listeners, passed as fds named api, dashboard and control. This",
        "# also starts them first when the service is started on its own.",
        f"Sockets={API_SOCKET} {DASHBOARD_SOCKET} {CONTROL_SOCKET}",
    ]
    if not s.user:
        if s.run_as:
            lines += [
                "# Agents run as this account: it needs the agent CLIs' logins, and write",
                "# access to the project folders.",
                f"User={s.run_as}",
            ]
        else:
            lines.append("# No User=: lokid and its agents run as root.")
    lines.append(_environment("LOKI_HOME", s.loki_home))
    if s.data_dir:
        lines.append(_environment("LOKI_DATA_DIR", s.data_dir))
    lines.append(_environment("LOKI_SOCKET", s.socket_path))
    if s.environment:
        lines += [
            "# The settings `loki service install` ran with: from its environment, and from",
            "# a config file this daemon does not read itself (a copy: re-install after a change).",
        ]
        lines += [_environment(name, value) for name, value in s.environment]
    if not s.user:
        lines += [
            "# /var/lib/lokid, created and given to User= by systemd: writable under",
            "# ProtectSystem=strict. The data dir (database, lock, pid file) is inside.",
            "StateDirectory=lokid",
            "StateDirectoryMode=0700",
        ]
    lines += [
        "# lokid pings (WATCHDOG=1) from its trio loop every WatchdogSec/2; a loop",
        "# frozen for WatchdogSec gets SIGABRT and, with Restart=, a restart.",
        "WatchdogSec=30",
        "Restart=on-failure",
        "RestartSec=2",
        "# Exit 2 is an invalid configuration: a restart cannot fix it.",
        "RestartPreventExitStatus=2",
        "# SIGTERM goes to lokid alone: it stops its agents itself (process group TERM,",
        "# grace, KILL) and flushes the store. Whatever is left at TimeoutStopSec gets",
        "# SIGKILL: shutdown_grace (10 s by default) + 12 s for a hurried stop, at least 30.",
        "KillMode=mixed",
        f"TimeoutStopSec={s.timeout_stop}",
        "# Event streams, WebSockets and agent pipes are all file descriptors.",
        "LimitNOFILE=65536",
        "",
    ]
    lines += _system_hardening(s) if not s.user else _user_hardening()
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if s.user else 'multi-user.target'}",
    ]
    return "\n".join(lines) + "\n"


def _system_hardening(s: UnitSettings) -> list[str]:
    lines = [
        "# -- hardening: only what running agents survive --------------------------",
        "# No privilege gain through setuid binaries or file capabilities (sudo in an",
        "# agent fails). A setuid bubblewrap would fail too; Debian's is not setuid.",
        "NoNewPrivileges=yes",
        "# The whole file system is read-only but /dev, /proc, /sys, the",
        "# StateDirectory, the private /tmp and the ReadWritePaths= below. Agents that",
        "# work in folders outside them (say /srv/projects) need a ReadWritePaths= line.",
        "ProtectSystem=strict",
        "# /home, /root and /run/user are read-only: agents can read other users'",
        "# files but not change them. The agents' own account keeps a writable home",
        "# (ReadWritePaths= below): the agent CLIs keep their logins and caches there",
        "# (~/.claude, ~/.codex, ~/.npm), and projects usually live there too.",
        "# Stricter: ReadWritePaths= only the project folders and the CLIs' state",
        "# folders. Projects under other users' homes: add them to ReadWritePaths=.",
        "ProtectHome=read-only",
    ]
    writable = []
    if s.run_as_home:
        writable.append("-" + s.run_as_home)
    if s.data_dir:
        writable.append(s.data_dir)
    if writable:
        lines.append(f"ReadWritePaths={' '.join(_quote(path) for path in writable)}")
    lines += [
        "# Private /tmp and /var/tmp, removed when the service stops.",
        "PrivateTmp=yes",
        "# Only pseudo devices (null, zero, random, tty, ptmx) in /dev. Remove it if",
        "# agents need hardware (a GPU, /dev/kvm).",
        "PrivateDevices=yes",
        "# /proc/sys, /sys and kernel modules, logs, clock and hostname are off limits.",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "# Other users' processes are invisible in /proc (our own agents are not).",
        "ProtectProc=invisible",
        "# No new setuid/setgid files, no personality(2) tricks, no realtime",
        "# scheduling, no 32-bit system call ABI.",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "SystemCallArchitectures=native",
        "# Unix and IP sockets, and netlink (node's os.networkInterfaces() needs it).",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "# Left out on purpose: MemoryDenyWriteExecute= (node-based agent CLIs JIT",
        "# compile), RestrictNamespaces= and SystemCallFilter=@system-service (the",
        "# bubblewrap sandbox creates namespaces and mounts), PrivateUsers= and",
        "# ProcSubset=pid (agents read /proc/cpuinfo and friends).",
    ]
    return lines


def _user_hardening() -> list[str]:
    return [
        "# -- hardening: only what running agents survive --------------------------",
        "# No privilege gain through setuid binaries or file capabilities (sudo in an",
        "# agent fails). A setuid bubblewrap would fail too; Debian's is not setuid.",
        "NoNewPrivileges=yes",
        "# No new setuid/setgid files, no personality(2) tricks, no realtime",
        "# scheduling, no 32-bit system call ABI (seccomp: fine in a user manager).",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "SystemCallArchitectures=native",
        "# Left out on purpose: ProtectSystem=, ProtectHome=, PrivateTmp= and the",
        "# other mount options need a user namespace in a user manager (they fail",
        "# where unprivileged user namespaces are off), and an agent of this user",
        "# must write in this user's project folders anyway. MemoryDenyWriteExecute=",
        "# is out too: node-based agent CLIs JIT compile.",
    ]


def _socket_unit(description: str, listen: str, name: str, extra: Sequence[str]) -> list[str]:
    return [
        "[Unit]",
        f"Description={description}",
        *extra,
        "",
        "[Socket]",
        f"ListenStream={listen}",
        f"FileDescriptorName={name}",
        f"Service={SERVICE}",
        "Backlog=1024",
    ]


def _render_api_socket(s: UnitSettings) -> str:
    lines = [
        "# Socket activation of lokid: this unit passes the HTTP API listener as the",
        "# fd named `api`, and pulls in lokid-dashboard.socket and lokid-control.socket.",
        "# Three units because FileDescriptorName= names every fd of its unit.",
        "# Enable this one: `systemctl"
        + (" --user" if s.user else "")
        + " enable --now lokid.socket`.",
        *_socket_unit(
            "lokid HTTP API listener",
            s.api_listen,
            "api",
            [f"Wants={DASHBOARD_SOCKET} {CONTROL_SOCKET}"],
        ),
        "",
        "[Install]",
        "WantedBy=sockets.target",
        f"Also={DASHBOARD_SOCKET} {CONTROL_SOCKET}",
    ]
    return "\n".join(lines) + "\n"


def _render_dashboard_socket(s: UnitSettings) -> str:
    lines = [
        "# The Dashboard API listener, passed to lokid as the fd named `dashboard`.",
        "# A socket-activated dashboard port is fixed: no `next free port` fallback.",
        *_socket_unit(
            "lokid Dashboard API listener",
            s.dashboard_listen,
            "dashboard",
            [f"PartOf={API_SOCKET}"],
        ),
        "",
        "[Install]",
        "WantedBy=sockets.target",
    ]
    return "\n".join(lines) + "\n"


def _render_control_socket(s: UnitSettings) -> str:
    lines = [
        "# The control socket (HTTP over a Unix socket), passed as the fd named `control`.",
        "# lokid answers only its own uid and root on it; the file mode says the same.",
        *_socket_unit(
            "lokid control socket",
            s.socket_path,
            "control",
            [f"PartOf={API_SOCKET}"],
        ),
        "SocketMode=0600",
    ]
    if s.user:
        lines.append("DirectoryMode=0700")
    else:
        lines += [
            "# /run/lokid is root's (0755, created by systemd); the socket is the agents'",
            "# account's, 0600.",
            "DirectoryMode=0755",
        ]
        if s.run_as:
            lines.append(f"SocketUser={s.run_as}")
    lines += ["", "[Install]", "WantedBy=sockets.target"]
    return "\n".join(lines) + "\n"


def _check_unit_text(what: str, value: str | None, *, instead: str = "a path") -> None:
    """Refuse text a unit file cannot hold as it is: a newline would start a line of its
    own (`Environment=`, `ReadWritePaths=` injection), other control characters would be
    taken as C escapes or cut the line, and bytes that are not UTF-8 cannot be written.
    Escaping them per systemd.syntax(7) differs per directive; such paths are rare."""
    if value is None:
        return
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise ServiceError(
            f"{what} {value!r} holds a control character or bytes that are not UTF-8, "
            f"which a unit file cannot hold; use {instead} without them"
        )


def _environment(name: str, value: str) -> str:
    assignment = f"{name}={value}"
    return f"Environment={_quote(assignment)}"


def _quote(word: str) -> str:
    """One word of a unit-file command line or list (`%` must already be escaped)."""
    if word and not any(c.isspace() or c in "\"'\\" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_path(path: Path, *, user: bool, home: Path | None = None) -> str:
    """A path as unit-file text: `%` escaped, and `%h/...` for the home folder in user units."""
    text = os.fspath(path)
    if user:
        base = Path.home() if home is None else home
        try:
            rest = path.relative_to(base)
        except ValueError:
            pass
        else:
            return "%h" if rest == Path() else "%h/" + os.fspath(rest).replace("%", "%%")
    return text.replace("%", "%%")


def listen_address(host: str, port: int, *, what: str) -> str:
    """`ListenStream=` text for host:port; systemd wants an IP address, not a name."""
    if port <= 0 or port > 65535:
        raise ServiceError(f"the {what} port must be fixed for socket activation, not {port}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ServiceError(
            f"the {what} address {host!r} is not an IP address (systemd resolves no names)"
        ) from None
    if isinstance(address, ipaddress.IPv6Address):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


# -- settings ------------------------------------------------------------------


def lokid_command() -> list[str]:
    """The command line that runs this installation's daemon.

    The `lokid` script next to `sys.executable` (a virtualenv's bin/, or
    /usr/local/bin), not resolved through symlinks: a venv's python is a
    symlink to the base interpreter, and only the venv path sees the venv.
    Without the script, `python -m lokid serve` with this same interpreter.
    """
    python = Path(sys.executable).absolute()
    script = python.parent / "lokid"
    if script.is_file() and os.access(script, os.X_OK):
        return [os.fspath(script)]
    return [os.fspath(python), "-m", "lokid", "serve"]


def _exec_start(argv: Sequence[str], *, user: bool) -> str:
    return " ".join(_quote(unit_path(Path(arg), user=user)) for arg in argv[:1]) + "".join(
        " " + _quote(arg.replace("%", "%%")) for arg in argv[1:]
    )


def carried_settings(config: Config, *, unit_home: Path) -> list[tuple[str, str]]:
    """(LOKI_* variable, value) of every setting `config` did not take from its default,
    for `Environment=` lines: the daemon systemd starts has none of the installing
    shell's environment, and may not find its config file (system units look in
    /var/lib/lokid and /etc/lokid). Settings of a config file that daemon reads
    itself are left to it, so that an edit of the file takes effect at its restart.

    No setting holds a secret (tokens live in the database), so a unit file that
    anyone may read is fine.
    """
    own_file = _config_file_found(unit_home)
    carried = []
    for name, setting in SETTINGS.items():
        source = config.sources.get(name, "default")
        if name in PLACED_SETTINGS or setting.env is None or source == "default":
            continue
        if own_file is not None and source == f"file {own_file}":
            continue
        text = _setting_text(getattr(config, name))
        what = f"{name} (from {source})"
        _check_unit_text(what, text, instead="a value")
        if PARSERS[name](text) != getattr(config, name):
            raise ServiceError(
                f"{what} cannot be passed to the unit as {setting.env}={text!r}: "
                f"it would read back as another value (a comma inside a list entry?)"
            )
        carried.append((setting.env, text))
    return carried


def _config_file_found(loki_home: Path) -> Path | None:
    """The config file a daemon with this LOKI_HOME reads; None if it cannot be known."""
    try:
        return find_config_file(loki_home)
    except ConfigError:
        return None


def _setting_text(value: Any) -> str:
    """A setting's value as its environment variable says it (`lokid.config.PARSERS`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)  # text, an integer, a RateLimit ("100/60")


def _refuse_insecure_remote(config: Config) -> None:
    """What the daemon refuses at start (`Daemon._refuse_insecure_remote`) is refused here,
    before a unit that could only fail and restart is written."""
    if config.auth_enabled or config.allow_insecure_remote:
        return
    for what, host in (("HTTP API", config.api_host), ("dashboard", config.dashboard_host)):
        if not _is_loopback(host):
            raise ServiceError(
                f"refusing to install units serving the {what} on {host} without "
                "authentication: lokid would refuse to start. Enable auth "
                "(LOKI_ENTERPRISE_AUTH=true), bind to 127.0.0.1, or set "
                "LOKI_ALLOW_INSECURE_REMOTE=true if you really mean it"
            )


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host)
    except ValueError:
        return False  # listen_address refuses it first
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def default_run_as() -> str:
    """The account a system unit runs lokid as: who ran `sudo`, else whoever we are."""
    sudo_user = os.environ.get("SUDO_USER")
    if os.getuid() == 0 and sudo_user and sudo_user != "root":
        return sudo_user
    return pwd.getpwuid(os.getuid()).pw_name


def _documentation() -> str | None:
    guide = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
    return guide.as_uri().replace("%", "%%") if guide.is_file() else None


def settings_for(
    config: Config,
    *,
    user: bool,
    command: Sequence[str] | None = None,
    run_as: str | None = None,
    data_dir: Path | None = None,
    socket_path: Path | None = None,
) -> UnitSettings:
    """The settings of this installation.

    User units: LOKI_HOME, the data dir and the control socket of `config`
    (what the CLI of this user finds without flags). System units: LOKI_HOME
    is /var/lib/lokid (StateDirectory=lokid), the control socket
    /run/lokid/lokid.sock, unless `data_dir` / `socket_path` say otherwise.
    Ports and addresses come from `config` in both, and every other setting
    `config` did not take from its default (`carried_settings`).
    """
    argv = list(command) if command else lokid_command()
    if not os.path.isabs(argv[0]):
        raise ServiceError(f"the lokid executable must be an absolute path, not {argv[0]!r}")
    api = listen_address(config.api_host, config.api_port, what="HTTP API")
    dashboard = listen_address(config.dashboard_host, config.dashboard_port, what="dashboard")
    _refuse_insecure_remote(config)
    if user:
        data = config.data_dir
        control = config.socket
        unit_home = config.loki_home
        home_text = unit_path(config.loki_home, user=True)
        run_as = run_as_home = None
    else:
        data = data_dir
        control = socket_path or Path(SYSTEM_SOCKET)
        unit_home = Path(SYSTEM_LOKI_HOME)
        home_text = SYSTEM_LOKI_HOME
        run_as = run_as or default_run_as()
        try:
            account = pwd.getpwnam(run_as)
        except KeyError:
            raise ServiceError(f"no such user: {run_as!r} (--run-as)") from None
        if account.pw_uid == 0:
            run_as = None
        run_as_home = account.pw_dir
    for what, value in (
        ("the lokid command", " ".join(argv)),
        ("LOKI_HOME", os.fspath(config.loki_home) if user else None),
        ("the data dir", None if data is None else os.fspath(data)),
        ("the control socket path", os.fspath(control)),
        ("--run-as", run_as),
        ("the home of --run-as", run_as_home),
    ):
        _check_unit_text(what, value)
    if not control.is_absolute():
        raise ServiceError(f"the control socket path must be absolute, not {control}")
    if len(os.fsencode(control)) > MAX_SOCKET_PATH:
        raise ServiceError(f"control socket path {control} is too long (max 103 bytes)")
    if data is not None and not data.is_absolute():
        raise ServiceError(f"the data dir must be an absolute path, not {data}")
    environment = carried_settings(config, unit_home=unit_home)
    return UnitSettings(
        user=user,
        exec_start=_exec_start(argv, user=user),
        loki_home=home_text,
        api_listen=api,
        dashboard_listen=dashboard,
        socket_path=unit_path(control, user=user),
        data_dir=unit_path(data, user=user) if data is not None else None,
        run_as=run_as,
        run_as_home=unit_path(Path(run_as_home), user=False) if run_as_home else None,
        documentation=_documentation(),
        environment=tuple((name, value.replace("%", "%%")) for name, value in environment),
        timeout_stop=max(MIN_TIMEOUT_STOP, math.ceil(config.shutdown_grace) + STOP_ALLOWANCE),
    )


def reference_units() -> dict[str, str]:
    """The units under `systemd/` in the source tree: relative name -> text.

    System units for a dedicated `lokid` account whose home is /var/lib/lokid
    and lokid in /usr/local/bin; user units for `pip install --user` (~/.local/bin).
    """
    defaults = Config(loki_home=Path("/nonexistent"))
    api = listen_address(defaults.api_host, defaults.api_port, what="HTTP API")
    dashboard = listen_address(defaults.dashboard_host, defaults.dashboard_port, what="dashboard")
    system = UnitSettings(
        user=False,
        exec_start="/usr/local/bin/lokid",
        loki_home=SYSTEM_LOKI_HOME,
        api_listen=api,
        dashboard_listen=dashboard,
        socket_path=SYSTEM_SOCKET,
        run_as="lokid",
        run_as_home=SYSTEM_LOKI_HOME,
    )
    user = UnitSettings(
        user=True,
        exec_start="%h/.local/bin/lokid",
        loki_home="%h/.loki",
        api_listen=api,
        dashboard_listen=dashboard,
        socket_path="%h/.loki/lokid/lokid.sock",
    )
    units = dict(render_units(system))
    units.update({f"user/{name}": text for name, text in render_units(user).items()})
    return units


# -- writing -------------------------------------------------------------------


def default_unit_dir(*, user: bool) -> Path:
    if not user:
        return SYSTEM_UNIT_DIR
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.fspath(Path.home() / ".config")
    return Path(config_home) / "systemd" / "user"


@attrs.frozen
class Planned:
    path: Path
    text: str
    state: str  # "new", "unchanged", "changed"


def plan(units: dict[str, str], unit_dir: Path) -> list[Planned]:
    planned = []
    for name, text in units.items():
        path = unit_dir / name
        try:
            current = path.read_text()
        except FileNotFoundError:
            state = "new"
        except OSError as exc:
            raise ServiceError(f"cannot read {path}: {exc.strerror}") from None
        else:
            state = "unchanged" if current == text else "changed"
        planned.append(Planned(path, text, state))
    return planned


def write_units(planned: Sequence[Planned], *, force: bool) -> None:
    """Write what is new or changed; refuse (writing nothing) to overwrite without `force`."""
    changed = [p.path for p in planned if p.state == "changed"]
    if changed and not force:
        names = ", ".join(os.fspath(path) for path in changed)
        raise ServiceError(
            f"{names} {'exists' if len(changed) == 1 else 'exist'} with different content; "
            "nothing written (use --force to overwrite, or --dry-run to see the new text)"
        )
    for item in planned:
        if item.state == "unchanged":
            continue
        try:
            item.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = item.path.with_name(f".{item.path.name}.tmp")
            temporary.write_text(item.text)
            temporary.chmod(0o644)
            os.replace(temporary, item.path)
        except OSError as exc:
            denied = isinstance(exc, PermissionError)
            hint = " (run it with sudo, or install user units with --user)" if denied else ""
            raise ServiceError(f"cannot write {item.path}: {exc.strerror}{hint}") from None


def _systemctl(args: Sequence[str], *, user: bool) -> None:
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        raise ServiceError("systemctl not found; the units are written, enable them by hand")
    argv = [systemctl, *(["--user"] if user else []), *args]
    shown = " ".join(["systemctl", *argv[1:]])
    print(f"running: {shown}")
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(f"`{shown}` did not finish in {SYSTEMCTL_TIMEOUT:g} s") from None
    except OSError as exc:
        raise ServiceError(f"cannot run `{shown}`: {exc.strerror}") from None
    if done.stdout.strip():
        print(done.stdout.rstrip())
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip() or "(no output)"
        raise ServiceError(
            f"`{shown}` failed (exit {done.returncode}): {output}\n"
            "the units are written; fix the cause and run it again"
        )


def next_steps(*, user: bool) -> list[str]:
    flag = " --user" if user else ""
    return [
        f"systemctl{flag} daemon-reload && systemctl{flag} enable --now lokid.socket",
        f"systemctl{flag} enable lokid.service   # optional: start at boot, not on first use",
    ]


# -- the command ---------------------------------------------------------------


def install_command(args: argparse.Namespace, config: Config) -> int:
    """`loki service install [--user] [--dry-run] [--unit-dir DIR] [--force] [--enable]`."""
    user: bool = args.user
    if args.enable and args.dry_run:
        raise ServiceError("--enable and --dry-run contradict each other")
    if user and args.run_as:
        raise ServiceError("--run-as is for system units; user units run as their user")
    command = None
    if args.exec:
        executable = Path(args.exec).absolute()
        if not (executable.is_file() and os.access(executable, os.X_OK)):
            raise ServiceError(f"--exec {executable}: not an executable file")
        command = [os.fspath(executable)]
    socket_path = Path(args.cfg_socket_path).absolute() if args.cfg_socket_path else None
    settings = settings_for(
        config,
        user=user,
        command=command,
        run_as=args.run_as,
        data_dir=Path(args.cfg_data_dir).absolute() if args.cfg_data_dir else None,
        socket_path=socket_path,
    )
    unit_dir = Path(args.unit_dir).absolute() if args.unit_dir else default_unit_dir(user=user)
    planned = plan(render_units(settings), unit_dir)
    if args.dry_run:
        for item in planned:
            print(f"# {item.path} ({item.state})")
            print(item.text)
        print("dry run: nothing written")
        return 0
    write_units(planned, force=args.force)
    for item in planned:
        verb = {"new": "wrote", "changed": "overwrote", "unchanged": "unchanged"}[item.state]
        print(f"{verb} {item.path}")
    if settings.environment:
        names = ", ".join(name for name, _ in settings.environment)
        print(f"note: {SERVICE} runs with the settings of this configuration: {names}")
    if not user:
        account = settings.run_as or "root (choose another account with --run-as)"
        print(f"note: lokid and its agents run as {account}")
        print(
            f"note: the CLI finds this daemon with LOKI_SOCKET={socket_path or SYSTEM_SOCKET}"
            " (or socket_path in /etc/lokid/lokid.toml)"
        )
    if args.unit_dir and unit_dir != default_unit_dir(user=user):
        print(f"note: {unit_dir} is not where systemd looks by default")
    if args.enable:
        _systemctl(["daemon-reload"], user=user)
        _systemctl(["enable", "--now", API_SOCKET], user=user)
        print("enabled and started lokid.socket (lokid starts on the first connection)")
        return 0
    print("next:")
    for line in next_steps(user=user):
        print(f"  {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lokid.service DIR`: write the reference units (the source tree's systemd/)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m lokid.service DIR", file=sys.stderr)
        return 2
    root = Path(args[0])
    for name, text in reference_units().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
