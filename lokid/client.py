"""A small client for the control socket (HTTP over a Unix socket), used by the CLI."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx

from lokid.errors import LokiError

STOPPING_COMMENT = ": closed: shutdown"
"""The last line of an event stream the daemon ended because it is stopping."""


class DaemonNotRunning(LokiError):
    """Nothing answers on the control socket."""


class DaemonNotAnswering(LokiError):
    """The control socket accepts connections, but no answer came in time."""


class DaemonHungUp(LokiError):
    """The control socket took the connection, then closed or reset it without an
    answer: a daemon that is stopping (not one to start a second daemon beside)."""


class SocketRefused(LokiError):
    """This user may not look at or connect to the control socket (EACCES): the
    daemon may well run, as another account, so "not running" would mislead."""


class ApiCallFailed(LokiError):
    """The daemon answered with an error body."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{message} ({status} {code})", details=details)
        self.status = status
        self.code = code

    @property
    def field(self) -> str | None:
        """`details.field` of a 400/422: the request field the daemon refused."""
        field = self.details.get("field")
        return field if isinstance(field, str) else None


class ControlClient:
    def __init__(self, socket_path: Path, *, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://lokid",
            timeout=timeout,
        )

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check_socket(self) -> None:
        try:
            exists = self.socket_path.exists()
        except PermissionError:  # a folder on the way is another account's (0700)
            raise self._refused("cannot look into its folder") from None
        if not exists:
            raise DaemonNotRunning(
                f"lokid is not running (no control socket at {self.socket_path})"
            )

    def _refused(self, what: str) -> SocketRefused:
        return SocketRefused(
            f"this user (uid {os.getuid()}) may not use lokid's control socket "
            f"{self.socket_path}: {what} (Permission denied). lokid may be running as "
            "another account: run loki as that account or as root"
        )

    def _failed(self, exc: httpx.TransportError, seconds: float | None) -> LokiError:
        """What an httpx transport error means for the reader, in one line."""
        if isinstance(exc, httpx.TimeoutException):
            return DaemonNotAnswering(
                f"lokid did not answer on {self.socket_path} within {seconds:g} s "
                "(stopped, or too busy?)"
            )
        if isinstance(exc, httpx.ConnectError):
            if isinstance(_os_error_of(exc), PermissionError):
                return self._refused("it does not let this user connect")
            return DaemonNotRunning(
                f"lokid is not running (nothing answers on {self.socket_path}: {exc})"
            )
        return DaemonHungUp(
            f"lokid closed the connection on {self.socket_path} without a whole answer "
            f"(stopping?): {str(exc) or type(exc).__name__}"
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self._check_socket()
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._failed(exc, kwargs.get("timeout", self.timeout)) from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "UNKNOWN", "message": response.text[:200], "details": {}}
            raise ApiCallFailed(
                response.status_code, error["code"], error["message"], error.get("details", {})
            )
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def stream_events(self, params: dict[str, str]) -> Iterator[dict[str, Any]]:
        """Follow `/api/events`, resuming with Last-Event-ID when the stream ends.

        Ends when the daemon ended the stream because it is stopping: a
        reconnect would only meet a stopping daemon (503) or none at all.
        The answer's head must come within `timeout`; the stream itself may then
        be quiet for as long as it likes (the daemon's keep-alives are its own).
        """
        self._check_socket()
        last_id: int | None = None
        stopping: list[str] = []
        while not stopping:
            headers = {} if last_id is None else {"Last-Event-ID": str(last_id)}
            if last_id is not None:
                params = {k: v for k, v in params.items() if k != "history"}
            try:
                with self._http.stream(
                    "GET", "/api/events", params=params, headers=headers
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        error = response.json()["error"]
                        raise ApiCallFailed(
                            response.status_code, error["code"], error["message"], error["details"]
                        )
                    _no_read_timeout(response)
                    for event in parse_sse(_noting_stop(response.iter_lines(), stopping)):
                        if isinstance(event.get("id"), int):
                            last_id = event["id"]
                        yield event
            except httpx.TransportError as exc:
                raise self._failed(exc, self.timeout) from None


def _no_read_timeout(response: httpx.Response) -> None:
    """Wait for the rest of `response` without a read timeout.

    httpx has one timeout for the whole request; httpcore reads the request's
    `timeout` extension again when the body is first read, so clearing `read`
    now bounds the wait for the head only."""
    timeouts = response.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = None


def _os_error_of(exc: BaseException) -> OSError | None:
    """The OSError an httpx error was raised from (httpx and httpcore wrap it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _noting_stop(lines: Iterable[str], stopping: list[str]) -> Iterator[str]:
    """`lines` as they are; the stopping daemon's last comment is appended to `stopping`."""
    for line in lines:
        if line == STOPPING_COMMENT:
            stopping.append(line)
        yield line


def parse_sse(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The `data:` payloads of an event stream, decoded (comments and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
