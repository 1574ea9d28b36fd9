"""One typed configuration object, loaded with the precedence of DESIGN.md §2.

    command-line flag  >  environment  >  TOML file  >  default

Every setting is a field of `Config` and has exactly one environment name and
one TOML key (the field name), so `loki config show` can say where each value
came from. Values are validated once, here; a bad value from any source is a
`ConfigError` naming the source, never a traceback later.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from lokid.cors import CorsPolicy
from lokid.errors import ConfigError
from lokid.ratelimit import RateLimit, parse_rate_limit

PROVIDERS = ("claude", "codex", "gemini", "aider", "cline", "opencode", "command")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})
# Upper bounds, so that a value the docs allow never overflows later (an event
# cutoff date before year 1, an id past SQLite's 64-bit INTEGER, a float gauge).
MAX_COUNT = 10**12
MAX_RETENTION_DAYS = 36_500  # a hundred years


@attrs.frozen
class Setting:
    """How one field is read from the environment and described."""

    env: str | None
    help: str


# field name -> (environment variable, description). Field order = display order.
SETTINGS: dict[str, Setting] = {
    "api_host": Setting("LOKI_API_HOST", "HTTP API listen address"),
    "api_port": Setting("LOKI_API_PORT", "HTTP API port"),
    "dashboard_host": Setting("LOKI_DASHBOARD_HOST", "Dashboard API listen address"),
    "dashboard_port": Setting(
        "LOKI_DASHBOARD_PORT", "Dashboard port; taken -> next free port; 0 = any free"
    ),
    "socket_path": Setting("LOKI_SOCKET", "Unix control socket (HTTP over the socket)"),
    "data_dir": Setting("LOKI_DATA_DIR", "Database, pid file and logs"),
    "allow_insecure_remote": Setting(
        "LOKI_ALLOW_INSECURE_REMOTE", "Allow a non-loopback listener while auth is off"
    ),
    "auth_enabled": Setting("LOKI_ENTERPRISE_AUTH", "Require bearer tokens"),
    "default_provider": Setting("LOKI_PROVIDER", "Provider used when a session names none"),
    "max_agents": Setting("LOKI_MAX_AGENTS", "Global cap on concurrent agent processes"),
    "shutdown_grace": Setting(
        "LOKI_SHUTDOWN_GRACE", "Seconds a graceful shutdown may take before work is cancelled"
    ),
    "log_level": Setting("LOKI_LOG_LEVEL", "debug, info, warning or error"),
    "sse_heartbeat": Setting(
        "LOKI_SSE_HEARTBEAT", "Seconds of silence before an SSE keep-alive comment (>= 0.5)"
    ),
    "event_retention_count": Setting(
        "LOKI_EVENT_RETENTION_COUNT", "Events kept in the store (the newest N)"
    ),
    "event_retention_days": Setting("LOKI_EVENT_RETENTION_DAYS", "Events older than this go"),
    "resume_on_start": Setting(
        "LOKI_RESUME_ON_START", "Resume sessions interrupted by a daemon restart, at start"
    ),
    "agent_grace": Setting(
        "LOKI_AGENT_GRACE", "Seconds between SIGTERM and SIGKILL when an agent is stopped"
    ),
    "agent_idle_timeout": Setting(
        "LOKI_AGENT_IDLE_TIMEOUT", "Seconds an agent run may print nothing before it is stopped"
    ),
    "agent_hard_timeout": Setting(
        "LOKI_AGENT_HARD_TIMEOUT", "Seconds one agent run may take at most"
    ),
    "retry_base": Setting(
        "LOKI_RETRY_BASE", "Seconds of the first retry backoff (doubles per failure, jittered)"
    ),
    "retry_cap": Setting("LOKI_RETRY_CAP", "Longest backoff between retries, seconds"),
    "max_sessions": Setting("LOKI_MAX_SESSIONS", "Sessions that may be active at once"),
    "rate_limit": Setting(
        "LOKI_RATE_LIMIT", "Requests per window per token or client, e.g. 100/60; off if unset"
    ),
    "cors_origins": Setting(
        "LOKI_CORS_ORIGINS", "Comma-separated origins allowed by CORS; off if unset"
    ),
    "registry_roots": Setting(
        "LOKI_REGISTRY_ROOTS", "Comma-separated folders registry discovery walks by default"
    ),
    "registry_interval": Setting(
        "LOKI_REGISTRY_INTERVAL", "Seconds between periodic syncs of the project registry"
    ),
}


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(([0-9]+\.?[0-9]*|\.[0-9]+)(e[+-]?[0-9]+)?|inf(inity)?|nan)", re.I)
"""What a setting written as text may be: ASCII digits, no `_` separators."""

ShownValue = str | int | float | bool | list[str] | None
"""A setting's value as `Config.show` gives it (what JSON can say)."""


def _port(value: Any) -> int:
    port = _int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port} is not a TCP port (0-65535)")
    return port


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer, not a boolean")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not _INTEGER.fullmatch(text):  # int() also takes "1_000", "٣", full-width digits
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _count(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ValueError(f"{number} must be at least 1")
    if number > MAX_COUNT:
        raise ValueError(f"{number} is above the maximum of {MAX_COUNT:,}")
    return number


def _positive_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    if isinstance(value, str) and not _DECIMAL.fullmatch(value.strip()):
        raise ValueError(f"{value!r} is not a number")  # float() takes "1_0", "٣"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    except OverflowError:  # an integer too large for a float (TOML has no limit)
        raise ValueError(f"{value!r} must be a positive, finite number") from None
    if not number > 0 or number == float("inf"):
        raise ValueError(f"{value!r} must be a positive, finite number")
    return number


def _retention_days(value: Any) -> float:
    days = _positive_float(value)
    if days > MAX_RETENTION_DAYS:
        raise ValueError(f"{days:.15g} is above the maximum of {MAX_RETENTION_DAYS:,} days")
    return days


def _heartbeat(value: Any) -> float:
    seconds = _positive_float(value)
    if seconds < 0.5:
        raise ValueError(f"{seconds:g} is below the minimum of 0.5 seconds")
    return seconds


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} must be a non-empty string")
    return value.strip()


def _path(value: Any) -> Path:
    return expand_user(_text(value))


def expand_user(text: str) -> Path:
    """`text` as a path with a leading `~` or `~user` expanded; ValueError if it cannot be."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~user of no such user, or no home directory to be found
        user = text[1:].split("/", 1)[0]
        whose = f"of user {user!r}" if user else "(HOME is unset)"
        raise ValueError(f"{text!r}: cannot find the home directory {whose}") from None


def _provider(value: Any) -> str:
    text = _text(value)
    if text not in PROVIDERS:
        raise ValueError(f"{text!r} is not one of {', '.join(PROVIDERS)}")
    return text


def _log_level(value: Any) -> str:
    text = _text(value).lower()
    if text not in ("debug", "info", "warning", "error"):
        raise ValueError(f"{text!r} is not one of debug, info, warning, error")
    return text


def _rate_limit(value: Any) -> RateLimit | None:
    text = str(value).strip()
    if text.lower() in ("", "off", "none", "false", "0"):
        return None
    return parse_rate_limit(text)


def _string_list(value: Any) -> list[str]:
    """A comma-separated string (environment, TOML) or a TOML list of strings."""
    if isinstance(value, str):
        return value.split(",")
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is neither a comma-separated string nor a list of strings")
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"list item {item!r} is not a string")
    return value


def _roots(value: Any) -> tuple[str, ...]:
    roots = tuple(item.strip() for item in _string_list(value) if item.strip())
    if not roots:
        raise ValueError("name at least one folder")
    return roots


def _cors_origins(value: Any) -> tuple[str, ...]:
    text = ", ".join(_string_list(value))
    return tuple(sorted(CorsPolicy.from_setting(text).origins))


PARSERS: dict[str, Callable[[Any], Any]] = {
    "api_host": _text,
    "api_port": _port,
    "dashboard_host": _text,
    "dashboard_port": _port,
    "socket_path": _path,
    "data_dir": _path,
    "allow_insecure_remote": _bool,
    "auth_enabled": _bool,
    "default_provider": _provider,
    "max_agents": _count,
    "shutdown_grace": _positive_float,
    "log_level": _log_level,
    "sse_heartbeat": _heartbeat,
    "event_retention_count": _count,
    "event_retention_days": _retention_days,
    "resume_on_start": _bool,
    "agent_grace": _positive_float,
    "agent_idle_timeout": _positive_float,
    "agent_hard_timeout": _positive_float,
    "retry_base": _positive_float,
    "retry_cap": _positive_float,
    "max_sessions": _count,
    "rate_limit": _rate_limit,
    "cors_origins": _cors_origins,
    "registry_roots": _roots,
    "registry_interval": _positive_float,
}


@attrs.frozen
class Config:
    """The effective configuration of one daemon (or CLI) process."""

    loki_home: Path
    api_host: str = "127.0.0.1"
    api_port: int = 8420
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 57374
    socket_path: Path | None = None  # None -> data_dir / "lokid.sock"
    data_dir: Path | None = None  # None -> loki_home / "lokid"
    allow_insecure_remote: bool = False
    auth_enabled: bool = False
    default_provider: str = "claude"
    max_agents: int = 10
    shutdown_grace: float = 10.0
    log_level: str = "info"
    sse_heartbeat: float = 15.0
    event_retention_count: int = 100_000
    event_retention_days: float = 7.0
    resume_on_start: bool = False
    agent_grace: float = 5.0
    agent_idle_timeout: float = 900.0
    agent_hard_timeout: float = 7200.0
    retry_base: float = 2.0
    retry_cap: float = 300.0
    max_sessions: int = 1000
    rate_limit: RateLimit | None = None
    cors_origins: tuple[str, ...] = ()
    registry_roots: tuple[str, ...] = (
        "~/git",
        "~/projects",
        "~/code",
        "~/dev",
        "~/workspace",
        "~/src",
    )
    registry_interval: float = 300.0
    config_file: Path | None = None
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def data_path(self) -> Path:
        return self.data_dir or self.loki_home / "lokid"

    @property
    def socket(self) -> Path:
        return self.socket_path or self.data_path / "lokid.sock"

    @property
    def database(self) -> Path:
        return self.data_path / "lokid.db"

    @property
    def pid_file(self) -> Path:
        return self.data_path / "lokid.pid"

    @property
    def lock_file(self) -> Path:
        return self.data_path / "lokid.lock"

    @property
    def held_dir(self) -> Path:
        """The agent pool's markers of agents a killed daemon never let run
        (docs/agent-pool.md). Named like every entry lokid makes in the data dir,
        `lokid*`: the data dir check (`pidfile.prepare_data_dir`) takes any other
        name for a file of someone else's and refuses to make the folder 0700."""
        return self.data_path / "lokid.held"

    @property
    def log_file(self) -> Path:
        """Where `loki api start` sends the output of a background daemon."""
        return self.data_path / "lokid.log"

    def show(self) -> list[tuple[str, ShownValue, str]]:
        """(key, value, source) rows for `loki config show`; values as JSON has them
        (a list, a boolean, a number, null), not Python's reprs (`shown_text`)."""
        rows: list[tuple[str, ShownValue, str]] = [
            ("loki_home", str(self.loki_home), "LOKI_HOME or default"),
            ("config_file", None if self.config_file is None else str(self.config_file), "search"),
        ]
        for name in SETTINGS:
            value = getattr(self, name)
            if name == "socket_path":
                value = self.socket
            elif name == "data_dir":
                value = self.data_path
            rows.append((name, _plain(value), self.sources.get(name, "default")))
        return rows


def _plain(value: Any) -> ShownValue:
    """A setting's value as JSON: paths and a rate limit as text, tuples as lists."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [str(item) for item in value]
    return str(value)  # a Path, a RateLimit ("100/60")


def shown_text(value: ShownValue) -> str:
    """A `show` value for the table: lists comma-separated, booleans and null in words."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value) or "-"
    return str(value)


def find_config_file(loki_home: Path) -> Path | None:
    """The first config file there is; ConfigError when a place cannot even be looked at
    (LOKI_HOME of another account, mode 0700): skipping it would run without its settings."""
    for candidate in (loki_home / "lokid.toml", Path("/etc/lokid/lokid.toml")):
        try:
            if candidate.is_file():
                return candidate
        except OSError as exc:
            raise ConfigError(
                f"cannot look for the config file {candidate}: {exc.strerror} "
                "(its folder belongs to another account? set LOKI_HOME to one of yours)"
            ) from None
    return None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(SETTINGS)}"
        )
    return data


def _loki_home(text: str | None) -> Path:
    """$LOKI_HOME, else ~/.loki."""
    try:
        return expand_user(text or "~/.loki")
    except ValueError as exc:
        if text:
            raise ConfigError(f"invalid LOKI_HOME from env LOKI_HOME: {exc}") from None
        raise ConfigError(
            "cannot find the home directory for the default LOKI_HOME (~/.loki); set LOKI_HOME"
        ) from None


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Build the effective `Config`; `flags` holds only the flags actually given."""
    env = os.environ if environ is None else environ
    loki_home = _loki_home(env.get("LOKI_HOME"))
    file_path = config_file if config_file is not None else find_config_file(loki_home)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if file_path is not None:
        layers.append((f"file {file_path}", read_toml(file_path)))
    env_values = {
        name: env[setting.env]
        for name, setting in SETTINGS.items()
        if setting.env is not None and setting.env in env
    }
    layers.append(("env", env_values))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for name, raw in layer.items():
            where = f"env {SETTINGS[name].env}" if source == "env" else source
            try:
                values[name] = PARSERS[name](raw)
            except ValueError as exc:
                raise ConfigError(f"invalid {name} from {where}: {exc}") from None
            sources[name] = where
    return Config(loki_home=loki_home, config_file=file_path, sources=sources, **values)
