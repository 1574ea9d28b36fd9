"""Start `loki serve` as a real subprocess on free ports with a temporary LOKI_HOME."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT = 20.0
WAIT = 30.0


def wait_until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll `check` (every 50 ms) until it returns something true; return that.

    For tests of a daemon in another process, where no event can be awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")


class DaemonProcess:
    def __init__(self, home: Path, *, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.data = home / "lokid"
        self.socket = self.data / "lokid.sock"
        self.env = {**os.environ, "LOKI_HOME": str(home), **(extra_env or {})}
        for key in ("LOKI_API_PORT", "LOKI_DASHBOARD_PORT", "LOKI_DATA_DIR", "LOKI_SOCKET"):
            if extra_env is None or key not in extra_env:
                self.env.pop(key, None)
        self.process: subprocess.Popen[bytes] | None = None
        self.status: dict[str, Any] = {}

    def start(self, *args: str, wait: bool = True, **popen: Any) -> DaemonProcess:
        argv = [
            sys.executable,
            "-m",
            "lokid",
            "serve",
            "--port",
            "0",
            "--dashboard-port",
            "0",
            *args,
        ]
        self.process = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            **popen,
        )
        if wait:
            self.wait_ready()
        return self

    def control(self) -> httpx.Client:
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://lokid", timeout=5
        )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                _, err = self.process.communicate()
                raise AssertionError(f"daemon exited {self.process.returncode}: {err.decode()}")
            if self.socket.exists():
                try:
                    with self.control() as client:
                        answer = client.get("/api/status")
                    if answer.status_code == 200 and answer.json()["phase"] == "running":
                        self.status = answer.json()
                        return self.status
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
        raise AssertionError("daemon did not become ready in time")

    @property
    def api_url(self) -> str:
        return str(self.status["listeners"]["api"])

    @property
    def dashboard_url(self) -> str:
        return str(self.status["listeners"]["dashboard"])

    def terminate(self, timeout: float = 20.0) -> tuple[int, str]:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("daemon did not exit after SIGTERM") from None
        return self.process.returncode, err.decode()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def run_cli(
    args: Sequence[str], home: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOKI_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "lokid", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members
