"""`loki service install`: the units it renders, where it writes them, and systemd's verdict."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from lokid.config import Config
from lokid.service import (
    UNIT_NAMES,
    ServiceError,
    listen_address,
    lokid_command,
    reference_units,
    render_units,
    settings_for,
    unit_path,
)

from .cli_kit import Cli
from .daemon_proc import DaemonProcess

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
MISSING_ANALYZE = (
    "systemd-analyze is not installed (Debian: apt-get install systemd); "
    "the units are not checked by systemd"
)


def _units(folder: Path) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in UNIT_NAMES}


def _values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def _install(loki: Cli, home: Path, *args: str) -> str:
    return loki.ok(home, "service", "install", *args).out


# -- what install writes ---------------------------------------------------------------------


def test_system_units_run_this_installation(loki: Cli, tmp_path: Path) -> None:
    out = _install(loki, tmp_path / "home", "--unit-dir", str(tmp_path / "units"))
    units = _units(tmp_path / "units")
    service = units["lokid.service"]
    assert _values(service, "ExecStart") == [" ".join(lokid_command())]
    assert Path(lokid_command()[0]).parent == Path(sys.executable).absolute().parent
    assert _values(service, "Type") == ["notify"]
    assert _values(service, "NotifyAccess") == ["main"]
    assert _values(service, "Restart") == ["on-failure"]
    assert _values(service, "KillMode") == ["mixed"]
    assert _values(service, "ProtectSystem") == ["strict"]
    assert _values(service, "StateDirectory") == ["lokid"]
    assert "LOKI_HOME=/var/lib/lokid" in _values(service, "Environment")
    assert "LOKI_SOCKET=/run/lokid/lokid.sock" in _values(service, "Environment")
    assert _values(service, "MemoryDenyWriteExecute") == []  # node-based agents JIT
    assert _values(service, "WantedBy") == ["multi-user.target"]
    # Each listener is its own unit with its own fd name, all of them passed to the service.
    assert _values(service, "Sockets")[0].split() == [n for n in UNIT_NAMES if n.endswith("socket")]
    assert _values(units["lokid.socket"], "ListenStream") == ["127.0.0.1:8420"]
    assert _values(units["lokid.socket"], "FileDescriptorName") == ["api"]
    assert _values(units["lokid-dashboard.socket"], "ListenStream") == ["127.0.0.1:57374"]
    assert _values(units["lokid-dashboard.socket"], "FileDescriptorName") == ["dashboard"]
    assert _values(units["lokid-control.socket"], "ListenStream") == ["/run/lokid/lokid.sock"]
    assert _values(units["lokid-control.socket"], "FileDescriptorName") == ["control"]
    assert _values(units["lokid-control.socket"], "SocketMode") == ["0600"]
    for name in UNIT_NAMES[1:]:
        assert _values(units[name], "Service") == ["lokid.service"]
    assert _values(units["lokid.socket"], "Also") == ["lokid-dashboard.socket lokid-control.socket"]
    for name in UNIT_NAMES:
        assert f"wrote {tmp_path / 'units' / name}" in out
        assert (tmp_path / "units" / name).stat().st_mode & 0o777 == 0o644
    assert "systemctl daemon-reload && systemctl enable --now lokid.socket" in out


def test_system_units_run_as_the_chosen_account(loki: Cli, tmp_path: Path) -> None:
    nobody = "nobody"
    _install(loki, tmp_path / "home", "--unit-dir", str(tmp_path), "--run-as", nobody)
    service = (tmp_path / "lokid.service").read_text()
    assert _values(service, "User") == [nobody]
    # Its home stays writable under ProtectHome=read-only (agent CLIs keep state there).
    assert _values(service, "ProtectHome") == ["read-only"]
    home = os.path.expanduser(f"~{nobody}")
    assert _values(service, "ReadWritePaths") == [f"-{home}"]
    assert _values((tmp_path / "lokid-control.socket").read_text(), "SocketUser") == [nobody]


def test_user_units_use_the_users_paths(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("LOKI_API_PORT", "9100")
    out = _install(loki, tmp_path / ".loki", "--user")
    folder = tmp_path / "xdg" / "systemd" / "user"
    units = _units(folder)
    service = units["lokid.service"]
    assert "LOKI_HOME=%h/.loki" in _values(service, "Environment")
    assert "LOKI_SOCKET=%h/.loki/lokid/lokid.sock" in _values(service, "Environment")
    assert _values(service, "WantedBy") == ["default.target"]
    assert _values(service, "User") == []
    assert _values(service, "ProtectSystem") == []  # needs user namespaces in a user manager
    assert _values(service, "NoNewPrivileges") == ["yes"]
    assert _values(units["lokid.socket"], "ListenStream") == ["127.0.0.1:9100"]
    control = units["lokid-control.socket"]
    assert _values(control, "ListenStream") == ["%h/.loki/lokid/lokid.sock"]
    assert _values(control, "DirectoryMode") == ["0700"]
    assert "systemctl --user daemon-reload && systemctl --user enable --now lokid.socket" in out
    assert f"wrote {folder / 'lokid.service'}" in out


def test_user_units_outside_home_keep_absolute_paths(loki: Cli, tmp_path: Path) -> None:
    home = tmp_path / "loki home"  # a space, outside $HOME
    _install(loki, home, "--user", "--unit-dir", str(tmp_path / "units"))
    service = (tmp_path / "units" / "lokid.service").read_text()
    assert f'Environment="LOKI_HOME={home}"' in service.splitlines()


def test_dry_run_prints_and_writes_nothing(loki: Cli, tmp_path: Path) -> None:
    out = _install(loki, tmp_path / "home", "--unit-dir", str(tmp_path / "units"), "--dry-run")
    assert not (tmp_path / "units").exists()
    assert "dry run: nothing written" in out
    assert f"# {tmp_path / 'units' / 'lokid.service'} (new)" in out
    assert "FileDescriptorName=dashboard" in out


def test_existing_units_are_not_overwritten_without_force(loki: Cli, tmp_path: Path) -> None:
    units = tmp_path / "units"
    _install(loki, tmp_path / "home", "--unit-dir", str(units))
    again = _install(loki, tmp_path / "home", "--unit-dir", str(units))
    assert f"unchanged {units / 'lokid.service'}" in again

    (units / "lokid.socket").write_text("[Socket]\nListenStream=1234\n")
    before = {path.name: path.read_text() for path in units.iterdir()}
    refused = loki(tmp_path / "home", "service", "install", "--unit-dir", str(units))
    assert refused.code == 1
    assert "with different content; nothing written" in refused.err
    assert "--force" in refused.err
    assert {path.name: path.read_text() for path in units.iterdir()} == before

    forced = _install(loki, tmp_path / "home", "--unit-dir", str(units), "--force")
    assert f"overwrote {units / 'lokid.socket'}" in forced
    assert _values((units / "lokid.socket").read_text(), "FileDescriptorName") == ["api"]


# -- systemctl: never unless --enable --------------------------------------------------------


@pytest.fixture
def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `systemctl` first on PATH that logs its arguments; FAIL_ON=word makes it fail."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "systemctl.log"
    script = folder / "systemctl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        'case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && '
        '{ echo "Failed to connect to bus: No medium found" >&2; exit 1; } ;; esac\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("FAIL_ON", raising=False)
    return log


def test_systemctl_is_not_run_without_enable(
    loki: Cli, tmp_path: Path, fake_systemctl: Path
) -> None:
    _install(loki, tmp_path / "home", "--user", "--unit-dir", str(tmp_path / "units"))
    assert not fake_systemctl.exists()


def test_enable_reloads_and_enables_the_socket(
    loki: Cli, tmp_path: Path, fake_systemctl: Path
) -> None:
    out = _install(loki, tmp_path / "home", "--user", "--unit-dir", str(tmp_path / "u"), "--enable")
    assert fake_systemctl.read_text().splitlines() == [
        "--user daemon-reload",
        "--user enable --now lokid.socket",
    ]
    assert "running: systemctl --user enable --now lokid.socket" in out


def test_enable_reports_a_failing_systemctl(
    loki: Cli, tmp_path: Path, fake_systemctl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAIL_ON", "daemon-reload")
    result = loki(tmp_path / "home", "service", "install", "--unit-dir", str(tmp_path), "--enable")
    assert result.code == 1
    assert "`systemctl daemon-reload` failed (exit 1)" in result.err
    assert "Failed to connect to bus: No medium found" in result.err
    assert "the units are written" in result.err
    assert (tmp_path / "lokid.service").exists()
    assert fake_systemctl.read_text().splitlines() == ["daemon-reload"]  # and nothing after


def test_contradictory_options_are_refused(loki: Cli, tmp_path: Path) -> None:
    args = ("service", "install", "--unit-dir", str(tmp_path))
    assert "contradict" in loki(tmp_path, *args, "--enable", "--dry-run").err
    assert "--run-as is for system units" in loki(tmp_path, *args, "--user", "--run-as", "x").err
    assert "no such user" in loki(tmp_path, *args, "--run-as", "no-such-user-here").err


@pytest.mark.parametrize(
    ("where", "what", "value"),
    [
        (["--data-dir"], "the data dir", "/tmp/x\ny"),
        (["--data-dir"], "the data dir", "/tmp/x\x1b[2Jy"),
        (["--data-dir"], "the data dir", "/tmp/x\udcffy"),
        (["--socket"], "the control socket path", "/tmp/s\nExecStartPre=/bin/evil"),
        ([], "LOKI_HOME", "/tmp/h\ny"),
    ],
)
def test_a_path_a_unit_file_cannot_hold_is_refused(
    loki: Cli, tmp_path: Path, where: list[str], what: str, value: str
) -> None:
    """Regression: a newline in --data-dir split `Environment="LOKI_DATA_DIR=/tmp/x` and
    `ReadWritePaths=` over two lines (unit file injection)."""
    home = Path(value) if not where else tmp_path / "home"
    user = ["--user"] if not where else ["--run-as", "nobody"]
    args = [*where, value] if where else []
    units = tmp_path / "units"
    result = loki(home, *args, "service", "install", *user, "--unit-dir", str(units))
    assert result.code == 1
    assert result.err == (
        f"loki: {what} {value!r} holds a control character or bytes that are not UTF-8, "
        "which a unit file cannot hold; use a path without them\n"
    ), result.err
    assert not units.exists()


# -- rendering details -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("127.0.0.1", 8420, "127.0.0.1:8420"),
        ("localhost", 1, "127.0.0.1:1"),
        ("::1", 57374, "[::1]:57374"),
        ("0.0.0.0", 80, "0.0.0.0:80"),
    ],
)
def test_listen_address(host: str, port: int, expected: str) -> None:
    assert listen_address(host, port, what="x") == expected


@pytest.mark.parametrize(("host", "port"), [("127.0.0.1", 0), ("example.com", 80)])
def test_listen_address_refuses_what_systemd_cannot_bind(host: str, port: int) -> None:
    with pytest.raises(ServiceError):
        listen_address(host, port, what="x")


def test_unit_paths_escape_specifiers() -> None:
    home = Path("/home/ann")
    assert unit_path(home / ".loki", user=True, home=home) == "%h/.loki"
    assert unit_path(home / "100%", user=True, home=home) == "%h/100%%"
    assert unit_path(home / ".loki", user=False, home=home) == "/home/ann/.loki"
    assert unit_path(Path("/srv/50%"), user=True, home=home) == "/srv/50%%"


def test_without_a_lokid_script_it_runs_python_m_lokid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = tmp_path / "bin" / "python3"
    monkeypatch.setattr(sys, "executable", str(python))
    assert lokid_command() == [str(python), "-m", "lokid", "serve"]
    settings = settings_for(Config(loki_home=tmp_path / "h"), user=True)
    assert (
        render_units(settings)["lokid.service"].count(f"ExecStart={python} -m lokid serve\n") == 1
    )


def test_the_units_in_the_source_tree_are_the_reference_rendering() -> None:
    folder = REPO / "systemd"
    on_disk = {
        os.fspath(path.relative_to(folder)): path.read_text()
        for path in sorted(folder.rglob("lokid*"))
    }
    assert on_disk == reference_units(), "regenerate them: python -m lokid.service systemd"


# -- systemd's verdict -----------------------------------------------------------------------


def _verify(folder: Path, *, user: bool, runtime: Path) -> None:
    """`systemd-analyze [--user] verify` on every unit; any complaint about ours fails."""
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0"}
    units = [str(folder / name) for name in UNIT_NAMES]
    done = subprocess.run(
        [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=folder,
    )
    output = done.stdout + done.stderr
    complaints = [line for line in output.splitlines() if "lokid" in line]
    assert done.returncode == 0 and not complaints, output


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=MISSING_ANALYZE)
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_systemd_analyze_verifies_the_installed_units(
    loki: Cli, tmp_path: Path, user: bool
) -> None:
    units = tmp_path / "units"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    _install(loki, tmp_path / "home", *(["--user"] if user else []), "--unit-dir", str(units))
    _verify(units, user=user, runtime=runtime)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=MISSING_ANALYZE)
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_systemd_analyze_verifies_the_reference_units(tmp_path: Path, user: bool) -> None:
    """The source tree's units, with an ExecStart that exists here (verify checks it)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    prefix = "user/" if user else ""
    for name, text in reference_units().items():
        if name.startswith(prefix) and "/" not in name[len(prefix) :]:
            text = text.replace("ExecStart=/usr/local/bin/lokid", f"ExecStart={sys.executable}")
            text = text.replace("ExecStart=%h/.local/bin/lokid", f"ExecStart={sys.executable}")
            (tmp_path / name[len(prefix) :]).write_text(text)
    _verify(tmp_path, user=user, runtime=runtime)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=MISSING_ANALYZE)
def test_systemd_analyze_catches_a_broken_unit(loki: Cli, tmp_path: Path) -> None:
    """The check above is not vacuous: verify's warnings (exit 0) fail it too."""
    units = tmp_path / "units"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    _install(loki, tmp_path / "home", "--unit-dir", str(units))
    service = units / "lokid.service"
    service.write_text(service.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    with pytest.raises(AssertionError, match="protect system"):
        _verify(units, user=False, runtime=runtime)


# -- the configuration the units run with ----------------------------------------------------


def _environment(service: str) -> dict[str, str]:
    """The service's `Environment=` assignments as systemd reads them (quotes, `%%`)."""
    assignments = {}
    for value in _values(service, "Environment"):
        for word in shlex.split(value):
            name, _, text = word.partition("=")
            assignments[name] = text.replace("%%", "%")
    return assignments


def test_the_units_carry_the_settings_of_the_environment(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: only the listen address was taken from the environment; the daemon of
    the unit ran without LOKI_ENTERPRISE_AUTH, refused 0.0.0.0 and restarted in a loop."""
    for name, value in {
        "LOKI_API_HOST": "0.0.0.0",
        "LOKI_ENTERPRISE_AUTH": "yes",
        "LOKI_MAX_AGENTS": "2",
        "LOKI_SHUTDOWN_GRACE": "40",
        "LOKI_RATE_LIMIT": "100/1m",
        "LOKI_REGISTRY_ROOTS": '~/my "work",/srv/100%,C:\\x',
    }.items():
        monkeypatch.setenv(name, value)
    units = tmp_path / "units"
    out = _install(loki, tmp_path / "home", "--user", "--unit-dir", str(units))
    service = (units / "lokid.service").read_text()
    assert _environment(service) == {
        "LOKI_HOME": str(tmp_path / "home"),
        "LOKI_SOCKET": str(tmp_path / "home" / "lokid" / "lokid.sock"),
        "LOKI_API_HOST": "0.0.0.0",
        "LOKI_ENTERPRISE_AUTH": "true",
        "LOKI_MAX_AGENTS": "2",
        "LOKI_SHUTDOWN_GRACE": "40.0",
        "LOKI_RATE_LIMIT": "100/60",
        "LOKI_REGISTRY_ROOTS": '~/my "work",/srv/100%,C:\\x',
    }
    assert _values((units / "lokid.socket").read_text(), "ListenStream") == ["0.0.0.0:8420"]
    # systemd kills what still runs at TimeoutStopSec: room for shutdown_grace + 12 s.
    assert _values(service, "TimeoutStopSec") == ["52"]
    assert (
        "note: lokid.service runs with the settings of this configuration: LOKI_API_HOST, "
        "LOKI_ENTERPRISE_AUTH, LOKI_MAX_AGENTS, LOKI_SHUTDOWN_GRACE, LOKI_RATE_LIMIT, "
        "LOKI_REGISTRY_ROOTS"
    ) in out


def test_a_config_file_the_daemon_reads_itself_is_left_to_it(loki: Cli, tmp_path: Path) -> None:
    """User units: the daemon has the same LOKI_HOME, so the same lokid.toml, and an edit
    of it takes effect at its restart. A file it would not find (--config) is copied."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "lokid.toml").write_text('max_agents = 3\nlog_level = "debug"\n')
    units = tmp_path / "units"
    _install(loki, home, "--user", "--unit-dir", str(units))
    assert set(_environment((units / "lokid.service").read_text())) == {
        "LOKI_HOME",
        "LOKI_SOCKET",
    }

    other = tmp_path / "elsewhere.toml"
    other.write_text("max_agents = 4\nshutdown_grace = 2.5\n")
    loki.ok(
        home,
        "--config",
        str(other),
        "service",
        "install",
        "--user",
        "--unit-dir",
        str(units),
        "--force",
    )
    carried = _environment((units / "lokid.service").read_text())
    assert (carried["LOKI_MAX_AGENTS"], carried["LOKI_SHUTDOWN_GRACE"]) == ("4", "2.5")
    assert "LOKI_LOG_LEVEL" not in carried


def test_system_units_carry_the_settings_of_a_file_in_the_installers_home(
    loki: Cli, tmp_path: Path
) -> None:
    """The system units' daemon has LOKI_HOME=/var/lib/lokid: it would not read this file."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "lokid.toml").write_text(
        'cors_origins = ["https://a.example", "http://b.example:8080"]\nresume_on_start = true\n'
    )
    units = tmp_path / "units"
    _install(loki, home, "--run-as", "nobody", "--unit-dir", str(units))
    carried = _environment((units / "lokid.service").read_text())
    assert carried["LOKI_CORS_ORIGINS"] == "http://b.example:8080,https://a.example"
    assert carried["LOKI_RESUME_ON_START"] == "true"
    assert carried["LOKI_HOME"] == "/var/lib/lokid"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (
            'registry_roots = ["/srv/a,b"]',
            "registry_roots (from file {file}) cannot be passed to the unit as "
            "LOKI_REGISTRY_ROOTS='/srv/a,b': it would read back as another value",
        ),
        (
            'registry_roots = ["/srv/a\\nExecStartPre=/bin/evil"]',
            "registry_roots (from file {file}) '/srv/a\\nExecStartPre=/bin/evil' holds a "
            "control character or bytes that are not UTF-8, which a unit file cannot hold; "
            "use a value without them",
        ),
    ],
)
def test_a_setting_a_unit_cannot_carry_is_refused(
    loki: Cli, tmp_path: Path, toml: str, message: str
) -> None:
    config = tmp_path / "lokid.toml"
    config.write_text(toml + "\n")
    units = tmp_path / "units"
    result = loki(
        tmp_path / "home", "--config", str(config), "service", "install", "--unit-dir", str(units)
    )
    assert result.code == 1
    assert message.format(file=config) in result.err, result.err
    assert not units.exists()


def test_units_that_could_not_start_without_auth_are_refused(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOKI_DASHBOARD_HOST", "::")
    units = tmp_path / "units"
    result = loki(tmp_path / "home", "service", "install", "--user", "--unit-dir", str(units))
    assert result.code == 1
    assert result.err.startswith(
        "loki: refusing to install units serving the dashboard on :: without authentication"
    )
    assert not units.exists()
    monkeypatch.setenv("LOKI_ALLOW_INSECURE_REMOTE", "true")
    _install(loki, tmp_path / "home", "--user", "--unit-dir", str(units))
    assert _values((units / "lokid-dashboard.socket").read_text(), "ListenStream") == ["[::]:57374"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.e2e
@pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)",
)
def test_the_daemon_of_units_installed_from_the_environment_starts(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The units' command line, its Environment= only and its three listeners (as
    systemd would run it): it serves 0.0.0.0 with auth on and 2 agents at most."""
    assert SOCKET_ACTIVATE is not None
    home = Path(tempfile.mkdtemp(prefix="lokid-svc-"))  # short enough for the socket path
    api_port, dashboard_port = _free_port(), _free_port()
    for name, value in {
        "LOKI_API_HOST": "0.0.0.0",
        "LOKI_ENTERPRISE_AUTH": "true",
        "LOKI_MAX_AGENTS": "2",
        "LOKI_API_PORT": str(api_port),
        "LOKI_DASHBOARD_PORT": str(dashboard_port),
    }.items():
        monkeypatch.setenv(name, value)
    units = tmp_path / "units"
    _install(loki, home, "--user", "--unit-dir", str(units))
    service = (units / "lokid.service").read_text()
    argv = [SOCKET_ACTIVATE, "--fdname=api:dashboard:control"]
    for name in ("lokid.socket", "lokid-dashboard.socket", "lokid-control.socket"):
        argv += ["-l", _values((units / name).read_text(), "ListenStream")[0]]
    # systemd-socket-activate passes on only TERM, PATH, USER and HOME, like a service
    # manager; PYTHONPATH makes the unit's `lokid` run this checkout.
    environment = {**_environment(service), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    argv += [f"--setenv={name}={value}" for name, value in environment.items()]
    argv += shlex.split(_values(service, "ExecStart")[0])
    daemon = DaemonProcess(home)
    daemon.process = subprocess.Popen(
        argv,
        env={"PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        status = daemon.wait_ready()
        assert status["agents"]["total"] == 2
        assert status["listeners"]["api"] == f"http://0.0.0.0:{api_port}"
        answer = httpx.get(f"http://127.0.0.1:{api_port}/api/status", timeout=5)
        assert answer.status_code == 401  # auth is on
        code, err = daemon.terminate()
        assert code == 0, err
    finally:
        daemon.kill()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=MISSING_ANALYZE)
def test_systemd_analyze_verifies_carried_settings_that_need_escaping(
    loki: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOKI_REGISTRY_ROOTS", '~/my "work",/srv/100%,C:\\x')
    monkeypatch.setenv("LOKI_CORS_ORIGINS", "https://a.example")
    units = tmp_path / "units"
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    _install(loki, tmp_path / "home", "--user", "--unit-dir", str(units))
    _verify(units, user=True, runtime=runtime)
