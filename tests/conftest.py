from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cli_kit import Cli
from .daemon_proc import DaemonProcess


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Make `loki serve` subprocesses; whatever is still running at the end is killed."""
    made: list[DaemonProcess] = []

    def make(home: Path | None = None, **kwargs: Any) -> DaemonProcess:
        daemon = DaemonProcess(home or tmp_path / "home", **kwargs)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running daemon."""
    return daemon_factory().start()


@pytest.fixture
def loki(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """`loki ...` run in this process (see tests/cli_kit.py)."""
    return Cli(monkeypatch, capsys)
