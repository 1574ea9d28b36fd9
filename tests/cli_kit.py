"""Run `loki ...` in this process against a test daemon, capturing what it prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from lokid.cli import main


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


class Cli:
    """`loki ...` in this process, against the daemon whose home is `home`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self.monkeypatch = monkeypatch
        self.capsys = capsys
        for key in ("LOKI_API_PORT", "LOKI_DASHBOARD_PORT", "LOKI_DATA_DIR", "LOKI_SOCKET"):
            monkeypatch.delenv(key, raising=False)

    def __call__(self, home: Path, *args: str) -> Result:
        self.monkeypatch.setenv("LOKI_HOME", str(home))
        self.capsys.readouterr()
        code = main(list(args))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def ok(self, home: Path, *args: str) -> Result:
        result = self(home, *args)
        assert result.code == 0, (args, result)
        return result

    def json(self, home: Path, *args: str) -> Any:
        return json.loads(self.ok(home, *args, "--json").out)

    def fails(self, home: Path, *args: str, words: tuple[str, ...] = ()) -> Result:
        result = self(home, *args)
        assert result.code == 1, (args, result)
        for word in words:
            assert word in result.err, (word, result)
        return result
