"""Configuration precedence (flag > env > file > default) and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from lokid.config import SETTINGS, load_config
from lokid.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_follow_the_design(tmp_path: Path) -> None:
    config = load_config({}, environ={"LOKI_HOME": str(tmp_path)})
    assert (config.api_host, config.api_port) == ("127.0.0.1", 8420)
    assert config.dashboard_port == 57374
    assert config.data_path == tmp_path / "lokid"
    assert config.socket == tmp_path / "lokid" / "lokid.sock"
    assert config.database == tmp_path / "lokid" / "lokid.db"
    assert config.auth_enabled is False
    assert config.max_agents == 10
    assert all(source == "default" for _, _, source in config.show()[2:])


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    file = write(
        tmp_path / "lokid.toml", "api_port = 1111\ndashboard_port = 2222\nmax_agents = 3\n"
    )
    env = {"LOKI_HOME": str(tmp_path), "LOKI_API_PORT": "3333", "LOKI_DASHBOARD_PORT": "4444"}
    config = load_config({"api_port": 5555}, environ=env)
    assert config.config_file == file  # found in LOKI_HOME without --config
    assert config.api_port == 5555
    assert config.dashboard_port == 4444
    assert config.max_agents == 3
    assert config.sources["api_port"] == "flag"
    assert config.sources["dashboard_port"] == "env LOKI_DASHBOARD_PORT"
    assert config.sources["max_agents"] == f"file {file}"
    assert "api_host" not in config.sources


def test_explicit_config_file_is_used(tmp_path: Path) -> None:
    file = write(tmp_path / "other.toml", 'api_host = "::1"\n')
    config = load_config({}, environ={"LOKI_HOME": str(tmp_path)}, config_file=file)
    assert config.api_host == "::1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LOKI_API_PORT": "http"},
            "invalid api_port from env LOKI_API_PORT: 'http' is not an integer",
        ),
        ({"LOKI_API_PORT": "70000"}, "70000 is not a TCP port"),
        ({"LOKI_ENTERPRISE_AUTH": "maybe"}, "'maybe' is not a boolean"),
        ({"LOKI_MAX_AGENTS": "0"}, "0 must be at least 1"),
        ({"LOKI_PROVIDER": "gpt"}, "'gpt' is not one of claude"),
        ({"LOKI_SHUTDOWN_GRACE": "inf"}, "must be a positive, finite number"),
        # What int() and float() take but a setting must not: separators, other digits
        ({"LOKI_API_PORT": "8_4_2_0"}, "'8_4_2_0' is not an integer"),
        ({"LOKI_MAX_AGENTS": "\uff15"}, "'\uff15' is not an integer"),  # a full-width 5
        ({"LOKI_MAX_AGENTS": "\u0663"}, "'\u0663' is not an integer"),  # an Arabic-Indic 3
        ({"LOKI_AGENT_GRACE": "1_0"}, "'1_0' is not a number"),
        # Bounds: each of these crashed the daemon at start (a date or SQLite overflow).
        (
            {"LOKI_EVENT_RETENTION_DAYS": "1000000"},
            "invalid event_retention_days from env LOKI_EVENT_RETENTION_DAYS: "
            "1000000 is above the maximum of 36,500 days",
        ),
        ({"LOKI_EVENT_RETENTION_DAYS": "1e10"}, "10000000000 is above the maximum"),
        (
            {"LOKI_EVENT_RETENTION_COUNT": "99999999999999999999"},
            "invalid event_retention_count from env LOKI_EVENT_RETENTION_COUNT: "
            "99999999999999999999 is above the maximum of 1,000,000,000,000",
        ),
        ({"LOKI_MAX_AGENTS": str(10**30)}, "LOKI_MAX_AGENTS: .* is above the maximum"),
        ({"LOKI_MAX_SESSIONS": str(10**13)}, "LOKI_MAX_SESSIONS: .* is above the maximum"),
    ],
)
def test_bad_values_name_their_source(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({}, environ={"LOKI_HOME": str(tmp_path), **env})


@pytest.mark.parametrize("word", ["1", "true", "YES", "on"])
def test_auth_env_accepts_true_words(tmp_path: Path, word: str) -> None:
    config = load_config({}, environ={"LOKI_HOME": str(tmp_path), "LOKI_ENTERPRISE_AUTH": word})
    assert config.auth_enabled is True


def test_bad_toml_and_unknown_keys_are_clear_errors(tmp_path: Path) -> None:
    broken = write(tmp_path / "a.toml", "api_port = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config({}, environ={}, config_file=broken)
    unknown = write(tmp_path / "b.toml", "api_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) api_prot"):
        load_config({}, environ={}, config_file=unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, environ={}, config_file=tmp_path / "missing.toml")
    wrong_type = write(tmp_path / "c.toml", "auth_enabled = 3\n")
    with pytest.raises(ConfigError, match="auth_enabled from file"):
        load_config({}, environ={}, config_file=wrong_type)


def test_every_setting_has_a_parser_and_a_field(tmp_path: Path) -> None:
    from lokid.config import PARSERS, Config

    fields = {f.name for f in Config.__attrs_attrs__}
    assert set(SETTINGS) == set(PARSERS)
    assert set(SETTINGS) <= fields


def test_rate_limit_and_cors_origins_are_parsed_and_checked(tmp_path: Path) -> None:
    env = {
        "LOKI_HOME": str(tmp_path),
        "LOKI_RATE_LIMIT": "100/1m",
        "LOKI_CORS_ORIGINS": "https://A.example:443, http://localhost:3000,",
    }
    config = load_config({}, environ=env)
    assert config.rate_limit is not None
    assert (config.rate_limit.limit, config.rate_limit.window) == (100, 60.0)
    assert config.cors_origins == ("http://localhost:3000", "https://a.example")
    off = load_config({}, environ={"LOKI_HOME": str(tmp_path), "LOKI_RATE_LIMIT": "off"})
    assert off.rate_limit is None and off.cors_origins == ()
    with pytest.raises(ConfigError, match="LOKI_RATE_LIMIT"):
        load_config({}, environ={**env, "LOKI_RATE_LIMIT": "100 per minute"})
    with pytest.raises(ConfigError, match="never answers arbitrary origins"):
        load_config({}, environ={**env, "LOKI_CORS_ORIGINS": "*"})


def test_the_largest_allowed_values_are_accepted(tmp_path: Path) -> None:
    from lokid.config import MAX_COUNT, MAX_RETENTION_DAYS

    env = {
        "LOKI_HOME": str(tmp_path),
        "LOKI_EVENT_RETENTION_DAYS": str(MAX_RETENTION_DAYS),
        "LOKI_EVENT_RETENTION_COUNT": str(MAX_COUNT),
        "LOKI_MAX_AGENTS": str(MAX_COUNT),
    }
    config = load_config({}, environ=env)
    assert (config.event_retention_days, config.event_retention_count) == (36_500, 10**12)
    assert config.max_agents == 10**12


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("event_retention_days = 1e6", "event_retention_days from file .*: 1000000 is above"),
        ("event_retention_count = 99999999999999999999", "event_retention_count from file"),
        (f"agent_grace = {10**400}", "agent_grace from file .* must be a positive, finite"),
    ],
)
def test_out_of_bounds_toml_values_are_config_errors(
    tmp_path: Path, toml: str, message: str
) -> None:
    file = write(tmp_path / "lokid.toml", toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config({}, environ={"LOKI_HOME": str(tmp_path)}, config_file=file)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "lokid.toml"
    file.write_bytes(b"\xff\xfe = 1")
    with pytest.raises(ConfigError, match=r"lokid\.toml is not valid UTF-8: invalid start byte"):
        load_config({}, environ={"LOKI_HOME": str(tmp_path)})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('cors_origins = ["http://a.com", 5]', "cors_origins from file .*: list item 5 is not a"),
        ('registry_roots = ["~/git", 1]', "registry_roots from file .*: list item 1 is not a"),
        ("registry_roots = 5", "registry_roots from file .*: 5 is neither a comma-separated"),
        ("cors_origins = {a = 1}", "cors_origins from file .* is neither a comma-separated"),
    ],
)
def test_list_settings_take_strings_only(tmp_path: Path, toml: str, message: str) -> None:
    """Regression: a TypeError traceback (cors_origins), or a root named "1"."""
    write(tmp_path / "lokid.toml", toml + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config({}, environ={"LOKI_HOME": str(tmp_path)})


def test_list_settings_take_a_toml_list_or_a_comma_list(tmp_path: Path) -> None:
    write(
        tmp_path / "lokid.toml", 'registry_roots = ["~/a", " /b "]\ncors_origins = "http://a.com"\n'
    )
    config = load_config({}, environ={"LOKI_HOME": str(tmp_path)})
    assert config.registry_roots == ("~/a", "/b")
    assert config.cors_origins == ("http://a.com",)


@pytest.mark.parametrize("variable", ["LOKI_HOME", "LOKI_DATA_DIR", "LOKI_SOCKET"])
def test_a_path_of_no_such_user_is_a_config_error(tmp_path: Path, variable: str) -> None:
    env = {"LOKI_HOME": str(tmp_path), variable: "~nosuchuser/x"}
    with pytest.raises(ConfigError, match=f"from env {variable}: .* of user 'nosuchuser'"):
        load_config({}, environ=env)


def test_show_gives_values_as_json_has_them(tmp_path: Path) -> None:
    """Not Python's reprs ("('http://a.com',)", "True", "None") inside JSON strings."""
    env = {
        "LOKI_HOME": str(tmp_path),
        "LOKI_CORS_ORIGINS": "http://a.com",
        "LOKI_ENTERPRISE_AUTH": "yes",
        "LOKI_RATE_LIMIT": "100/60",
    }
    shown = {key: value for key, value, _ in load_config({}, environ=env).show()}
    assert shown["cors_origins"] == ["http://a.com"]
    assert shown["auth_enabled"] is True
    assert shown["max_agents"] == 10
    assert shown["rate_limit"] == "100/60"
    assert shown["config_file"] is None
    assert shown["socket_path"] == str(tmp_path / "lokid" / "lokid.sock")
    bare = {key: value for key, value, _ in load_config({}, environ={"LOKI_HOME": "/x"}).show()}
    assert (bare["rate_limit"], bare["cors_origins"]) == (None, [])
